"""The engine (rank 0) and Triton's serving side (``frontend.py``) in two processes, joined by one socket.

Why two processes: in one, the engine thread and PyTriton's threads share a GIL. Every torch operator
releases it and must take it back, and whenever a serving thread held it meanwhile, the engine waited; the
serving threads in turn waited for the engine's Python between operators. On 2 cores at 16 streams the engine
thread was woken 750-1,000 times a second, and a served step took 10-12 ms against 9.6 in-process.

The serving side keeps the engine's interface (``submit``, ``cancel``, ``load``, step hooks), so the PyTriton
callables in ``binding.py`` run unchanged over a ``RemoteEngine``. Messages, pickled over a socketpair
(``multiprocessing.connection``, a well-kept framing rather than our own):

    serving -> engine   ("submit", key, prompt, params) | ("cancel", key) | ("serving",) | ("experts",)
    engine -> serving   ("step", [update, ...], load) after each engine pass that changed something
                        | ("refused", key, message) | ("experts", tallies) | ("stop",)

An update is ``(key, new tokens, their log-probs, first_token_at, done, finish_reason, error, finished_at)``:
one message per engine step for all generations, not one per token. Times are ``time.monotonic()``, which is
one clock for every process of the machine. Requests are validated on both sides: on the serving side so that
an invalid one is refused at once with the same message as before, on the engine side because rank 0 must
never trust what it is about to broadcast.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import itertools
import logging
import queue
import threading
import time
from multiprocessing.connection import Connection

from preprocessing.params import InvalidRequest
from triton_backend.engine.generation import EngineBusy, Generation, new_generation, validate

LOG = logging.getLogger(__name__)


class EngineHost:
    """Rank 0's end: submits what the serving process sends, and sends back what each engine pass changed.

    The engine thread never writes to the socket itself: a serving process that reads slowly would stall every
    sequence. It puts each pass's message in a bounded outbox that a sender thread empties. Only when the serving
    process has not taken ``handover_steps`` messages does the engine wait, and after ``handover_timeout_s`` it
    fails (the engine's failure ends the job, as a stuck rank does).
    """

    def __init__(self, engine, conn: Connection, serving: threading.Event | None = None, handover_steps: int = 256,
                 handover_timeout_s: float = 60.0):
        self.engine, self.conn = engine, conn
        self.serving = serving or threading.Event()  # set once the serving process has Triton up
        self.gone = threading.Event()  # the serving process closed its end (exited or crashed)
        self.handover_timeout_s = handover_timeout_s
        self._outbox: queue.Queue = queue.Queue(maxsize=handover_steps)
        self._live: dict[int, Generation] = {}  # key -> generation, for cancellations
        self._changed: dict[int, Generation] = {}  # filled by listeners, emptied by ``_flush`` (engine thread)
        self._sent: dict[int, tuple[int, int]] = {}  # key -> tokens, prompt log-probs sent so far (engine thread)
        self._last_load: dict | None = None
        # A guide not compiled yet compiles on a thread of its own, so that other requests (and cancellations)
        # are not held behind it; a cancellation that comes first is kept for when it is filed.
        self._compiling: set[int] = set()
        self._cancelled_early: set[int] = set()
        self._lock = threading.Lock()
        self._compiler = concurrent.futures.ThreadPoolExecutor(2, "guide-compile")
        engine.add_step_hook(self._flush)
        self._thread = threading.Thread(target=self._receive, name="engine-link", daemon=True)
        self._thread.start()
        self._sender = threading.Thread(target=self._send_outbox, name="engine-link-send", daemon=True)
        self._sender.start()

    def stop_serving(self) -> None:
        """Ask the serving process to stop Triton and exit (after the messages before it)."""
        try:
            self._send(("stop",))
        except TimeoutError:
            LOG.warning("the serving process takes no messages; it will be killed")

    def _send(self, message) -> None:
        """Queue ``message`` for the serving process; raises ``TimeoutError`` when it has stopped taking them."""
        if self.gone.is_set():
            return
        try:
            self._outbox.put(message, timeout=self.handover_timeout_s)
        except queue.Full:
            raise TimeoutError(f"the serving process has not read the engine's last {self._outbox.maxsize} "
                               f"messages in {self.handover_timeout_s:g} s") from None

    def _send_outbox(self) -> None:
        while True:
            message = self._outbox.get()
            if self.gone.is_set():
                continue  # dropped: nobody reads them, and the engine must not wait for room
            try:
                self.conn.send(message)
            except OSError:  # the serving process is gone; the server's watch loop ends the job
                self.gone.set()

    def _receive(self) -> None:
        while True:
            try:
                message = self.conn.recv()
            except (EOFError, OSError):
                self.gone.set()
                return
            if message[0] == "submit":
                key, prompt, params = message[1:]
                if self._compiles(params):
                    with self._lock:
                        self._compiling.add(key)
                    self._compiler.submit(self._submit, key, prompt, params)
                else:
                    self._submit(key, prompt, params)
            elif message[0] == "cancel":
                with self._lock:
                    generation = self._live.get(message[1])
                    if generation is None and message[1] in self._compiling:
                        self._cancelled_early.add(message[1])
                if generation is not None:
                    self.engine.cancel(generation)
            elif message[0] == "serving":
                self.serving.set()
            elif message[0] == "experts":  # the metrics' poll: read off the routers' tallies, not the engine thread
                try:
                    self._send(("experts", self.engine.expert_tokens()))
                except TimeoutError:
                    LOG.warning("the serving process takes no messages; the expert tallies were not sent")

    def _compiles(self, params) -> bool:
        """Whether submitting this request compiles a guide (it has one, not in the cache yet)."""
        grammars = getattr(self.engine, "grammars", None)
        kind = params.guided_decoding_guide_type
        return bool(kind) and grammars is not None and not grammars.has(kind, params.guided_decoding_guide)

    def _submit(self, key: int, prompt: list[int], params) -> None:
        try:
            generation = self.engine.submit(prompt, params, listener=functools.partial(self._changed_cb, key))
        except (InvalidRequest, EngineBusy) as err:
            with self._lock:
                self._compiling.discard(key)
                self._cancelled_early.discard(key)
            try:
                self._send(("refused", key, str(err)))
            except TimeoutError:  # the engine fails on its own next hand-over and ends the job
                LOG.warning("the serving process takes no messages; a refusal was not sent")
            return
        with self._lock:
            self._live[key] = generation
            self._compiling.discard(key)
            cancelled = key in self._cancelled_early
            self._cancelled_early.discard(key)
        if cancelled:
            self.engine.cancel(generation)
        if generation.done:  # finished before it was filed: ``_flush`` may have passed already
            self._live.pop(key, None)

    def _changed_cb(self, key: int, generation: Generation) -> None:  # engine thread
        self._changed[key] = generation

    def _flush(self) -> None:  # engine thread, after each pass of its loop
        changed, self._changed = self._changed, {}
        load = self.engine.load()
        if not changed and load == self._last_load:
            return
        self._last_load = load
        updates = []
        for key, g in changed.items():
            done, (sent, scored) = g.done, self._sent.get(key, (0, 0))
            n, m = len(g.tokens), len(g.prompt_logprobs)
            # What is new since the last update; the alternatives exist only when asked (else both lists are empty).
            scores = (g.logprobs[sent:n], g.top[sent:n], g.prompt_logprobs[scored:m], g.prompt_top[scored:m])
            updates.append((key, g.tokens[sent:n], scores, g.first_token_at, done, g.finish_reason, g.error,
                            g.finished_at))
            if done:
                self._sent.pop(key, None)
                self._live.pop(key, None)
            else:
                self._sent[key] = (n, m)
        self._send(("step", updates, load))


@dataclasses.dataclass
class RemoteGeneration(Generation):
    key: int = -1


class RemoteEngine:
    """The serving process's end: the engine's serving interface, over the link to rank 0.

    Generations are mirrored: a receiving thread applies each pass's updates, then calls the listeners and the
    step hooks as the engine thread would have (text trackers, for streaming and stop words, run here).
    """

    def __init__(self, conn: Connection, vocab_size: int, context: int, tokenizer):
        self.conn, self.vocab_size, self.context, self.tokenizer = conn, vocab_size, context, tokenizer
        self.stopped = threading.Event()  # rank 0 asked to stop, or is gone
        self._keys = itertools.count()
        self._live: dict[int, RemoteGeneration] = {}
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._load = {"running": 0, "waiting": 0, "kv_blocks_used": 0, "kv_usage": 0.0, "cancelled": 0,
                      "prefix_queried_tokens": 0, "prefix_hit_tokens": 0}
        self._experts: dict = {}  # the MoE routers' tallies, as of the last poll
        self._step_hooks = []
        self._thread = threading.Thread(target=self._receive, name="engine-link", daemon=True)
        self._thread.start()

    # -- the engine's serving interface -------------------------------------------------------------------
    def submit(self, prompt: list[int], params, listener=None, track_text: bool = False) -> Generation:
        validate(prompt, params, self.vocab_size, self.context, self.tokenizer)
        generation = new_generation(prompt, params, self.tokenizer, listener, track_text, kind=RemoteGeneration)
        generation.key = next(self._keys)
        with self._lock:  # with the receiving thread's end: a generation filed here is failed there
            if self.stopped.is_set():
                raise EngineBusy("the server is shutting down and takes no new requests")
            self._live[generation.key] = generation
        self._send(("submit", generation.key, generation.prompt, params))
        return generation

    def cancel(self, generation: Generation) -> None:
        if not generation.done:
            generation.cancelled = True
            self._send(("cancel", generation.key))

    def load(self) -> dict:
        return dict(self._load)

    def expert_tokens(self) -> dict:
        """Tokens routed to each expert per MoE layer, as of the previous call (each call asks rank 0 for the
        next: the metrics poll every half second, and nothing waits on rank 0)."""
        self._send(("experts",))
        return dict(self._experts)

    def add_step_hook(self, hook) -> None:
        self._step_hooks.append(hook)

    def serving(self) -> None:
        """Tell rank 0 that Triton is up (a SIGTERM from now on drains)."""
        self._send(("serving",))

    # -- the link ---------------------------------------------------------------------------------------
    def _send(self, message) -> None:
        try:
            with self._send_lock:
                self.conn.send(message)
        except OSError:  # rank 0 is gone: the receiving thread fails what is in flight
            self.stopped.set()

    def _receive(self) -> None:
        try:
            while True:
                message = self.conn.recv()
                if message[0] == "step":
                    self._apply(message[1])
                    self._load = message[2]
                elif message[0] == "refused":
                    self._finish(message[1], None, message[2])
                elif message[0] == "experts":
                    self._experts = message[1]
                    continue  # no generation changed: the step hooks have nothing to do
                elif message[0] == "stop":
                    return
                for hook in self._step_hooks:
                    hook()
        except (EOFError, OSError):
            LOG.error("the engine (rank 0) is gone")
        finally:
            with self._lock:
                self.stopped.set()
                keys = list(self._live)
            for key in keys:
                self._finish(key, None, "the server is shutting down")
            for hook in self._step_hooks:
                hook()

    def _apply(self, updates) -> None:
        for key, tokens, (logprobs, top, prompt_logprobs, prompt_top), first_token_at, done, reason, error, \
                finished_at in updates:
            with self._lock:
                g = self._live.get(key)
            if g is None:
                continue
            g.tokens += tokens
            g.logprobs += logprobs
            g.top += top
            g.prompt_logprobs += prompt_logprobs
            g.prompt_top += prompt_top
            if g.tracker is not None:
                for token in tokens:
                    g.tracker.add(token)
            g.first_token_at = first_token_at
            if done:
                self._finish(key, reason, error, finished_at)
            elif tokens:
                g._notify()

    def _finish(self, key: int, reason, error, finished_at: float | None = None) -> None:
        with self._lock:
            g = self._live.pop(key, None)
        if g is None:
            return
        g.finish_reason, g.error, g.finished_at = reason, error, finished_at or time.monotonic()
        g._done.set()
        g._notify()
