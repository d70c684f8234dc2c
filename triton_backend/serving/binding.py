"""The ``megatron_gpt`` model as PyTriton sees it: its tensors and the callable that feeds the engine.

PyTriton can only fail a whole batch, so a row that breaks a rule gets its message in the ``ERROR`` output
instead and the other rows of the batch are served; postprocessing turns ``ERROR`` into a per-request
error response of the ensemble.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import time
from typing import TYPE_CHECKING

import numpy as np

from preprocessing.params import SCALARS, WORD_LISTS, InvalidRequest, from_tensors
from triton_backend.engine.generation import EngineBusy
from triton_backend.serving import scores
from triton_backend.serving.metrics import STATS, request_timing, stats_row

if TYPE_CHECKING:  # the serving process runs without torch: it is given an engine_link.RemoteEngine
    from triton_backend.engine.engine import Engine

MODEL_NAME = "megatron_gpt"


class StreamError(Exception):
    """A stream refused or failed, raised in its callable: PyTriton sends the request's error as
    ``traceback.format_exception(None, err, err.__traceback__)``. Seen without its traceback, that is
    ``StreamError: <message>``, not a Python traceback that names this server's files. (The server's log keeps
    the whole traceback.) Why not the ``ERROR`` output that unary requests use: an error answered by
    postprocessing leaves the ensemble_stream request in flight inside Triton 2.51, for good.
    """

    __module__ = "builtins"  # not printed as triton_backend.serving.binding.StreamError

    @property
    def __traceback__(self):
        return None

    @__traceback__.setter
    def __traceback__(self, _tb):  # Python's own unwinding sets it below this attribute (in C): kept for logs
        pass


def tensors():
    """Input and output specs of megatron_gpt (internal upper-case names, see model_repository/ensemble)."""
    from pytriton.model_config import Tensor

    inputs = [
        Tensor(name="INPUT_IDS", dtype=np.int32, shape=(-1,)),
        Tensor(name="INPUT_LENGTH", dtype=np.int32, shape=(1,)),
    ]
    inputs += [
        Tensor(name=name.upper(), dtype=bytes if spec.dtype is np.object_ else spec.dtype, shape=(1,),
               optional=not spec.required)
        for name, spec in SCALARS.items()
    ]
    inputs += [Tensor(name=name.upper(), dtype=bytes, shape=(-1,), optional=True) for name in WORD_LISTS]
    inputs.append(Tensor(name="STREAM", dtype=np.bool_, shape=(1,), optional=True))
    outputs = [
        Tensor(name="OUTPUT_IDS", dtype=np.int32, shape=(-1,)),
        Tensor(name="OUTPUT_LENGTH", dtype=np.int32, shape=(1,)),
        Tensor(name="FINISH_REASON", dtype=bytes, shape=(1,)),
        Tensor(name="CUM_LOG_PROB", dtype=np.float32, shape=(1,)),
        Tensor(name="OUTPUT_LOG_PROBS", dtype=np.float32, shape=(-1,)),
        Tensor(name="ERROR", dtype=bytes, shape=(1,)),
        Tensor(name="TEXT_LIMIT", dtype=np.int32, shape=(1,)),
        Tensor(name="ENGINE_STATS", dtype=np.float32, shape=(len(STATS),)),
        Tensor(name="SCORES", dtype=bytes, shape=(1,)),  # log-probs with their tokens' text, as JSON (scores.py)
    ]
    return inputs, outputs


def parse_row(request, row: int):
    """Prompt ids and ``SamplingParams`` of one row (raises ``InvalidRequest``)."""
    length = int(request["INPUT_LENGTH"][row][0])
    ids = request["INPUT_IDS"][row]
    if not 0 < length <= len(ids):
        raise InvalidRequest("INPUT_LENGTH", length, f"must be between 1 and the length of INPUT_IDS ({len(ids)})")
    values = {name.upper(): request[name.upper()][row][0] for name in SCALARS if name.upper() in request}
    values |= {name.upper(): request[name.upper()][row] for name in WORD_LISTS if name.upper() in request}
    return ids[:length].tolist(), from_tensors(values, upper=True)


def _submit_row(engine: Engine, request, row: int):
    """Submit one row, or return the message of the rule it breaks."""
    try:
        if "STREAM" in request and bool(request["STREAM"][row][0]):
            raise InvalidRequest("stream", True, "the unary 'ensemble' does not stream; send streaming requests "
                                                 "to 'ensemble_stream'")
        return engine.submit(*parse_row(request, row))
    except (InvalidRequest, EngineBusy) as err:
        return str(err)


def _outputs(rows, tokenizer=None) -> dict:
    """Stack the rows of one request into its output tensors (ids and log-probs right-padded).

    PyTriton cannot send zero-size tensors, so ids and log-probs are at least one wide; OUTPUT_LENGTH says
    how much is real and postprocessing trims.
    """
    width = max([len(g.tokens) for g in rows if not isinstance(g, str)] + [1])
    ids = np.zeros((len(rows), width), np.int32)
    logprobs = np.zeros((len(rows), width), np.float32)
    length = np.zeros((len(rows), 1), np.int32)
    cum = np.zeros((len(rows), 1), np.float32)
    reason = np.full((len(rows), 1), b"", dtype=object)
    error = np.full((len(rows), 1), b"", dtype=object)
    limit = np.full((len(rows), 1), -1, np.int32)
    stats = np.array([stats_row()] * len(rows), np.float32)
    scored = np.full((len(rows), 1), b"", dtype=object)
    for i, g in enumerate(rows):
        if isinstance(g, str) or g.error:
            error[i, 0] = (g if isinstance(g, str) else g.error).encode()
            continue
        n = len(g.tokens)
        ids[i, :n], length[i, 0], reason[i, 0] = g.tokens, n, g.finish_reason.encode()
        if g.tracker is not None and g.tracker.stop_at is not None:
            limit[i, 0] = g.tracker.stop_at
        stats[i] = stats_row(*request_timing(g), len(g.prompt), n)
        if g.params.return_log_probs:
            logprobs[i, :n] = g.logprobs
            cum[i, 0] = float(np.sum(g.logprobs, dtype=np.float64))
        scored[i, 0] = scores.encode(scores.scores(g, tokenizer))
    return {
        "OUTPUT_IDS": ids, "OUTPUT_LENGTH": length, "FINISH_REASON": reason,
        "CUM_LOG_PROB": cum, "OUTPUT_LOG_PROBS": logprobs, "ERROR": error, "TEXT_LIMIT": limit,
        "ENGINE_STATS": stats, "SCORES": scored,
    }


def make_infer(engine: Engine, timeout_s: float = 600.0):
    """A PyTriton callable over a list of requests (the dynamic batcher's batch) that shares ``engine``."""

    def infer(requests):
        pending = [[_submit_row(engine, r, row) for row in range(len(r["INPUT_IDS"]))] for r in requests]
        deadline = time.monotonic() + timeout_s  # one for the whole batch, which waits as long as its slowest row
        for rows in pending:
            for i, g in enumerate(rows):
                if not isinstance(g, str) and not g.wait(max(0.0, deadline - time.monotonic())):
                    engine.cancel(g)  # the slot must not stay taken by a result nobody will read
                    rows[i] = f"no result within {timeout_s:g} s"
        return [_outputs(rows, engine.tokenizer) for rows in pending]

    return infer


# -- streaming: megatron_gpt_stream (decoupled) ------------------------------------------------------------
STREAM_MODEL_NAME = "megatron_gpt_stream"


def stream_tensors():
    """megatron_gpt_stream: the same inputs; each response carries what is new since the last one."""
    from pytriton.model_config import Tensor

    inputs, _ = tensors()
    inputs.append(Tensor(name="TEXT_INPUT", dtype=bytes, shape=(1,), optional=True))  # prepended when asked
    outputs = [
        Tensor(name="OUTPUT_IDS", dtype=np.int32, shape=(-1,)),  # the new ids (at least one wide)
        Tensor(name="NUM_INPUT_TOKENS", dtype=np.int32, shape=(1,)),
        Tensor(name="LOG_PROBS_LENGTH", dtype=np.int32, shape=(1,)),  # valid entries of OUTPUT_LOG_PROBS
        Tensor(name="OUTPUT_LENGTH", dtype=np.int32, shape=(1,)),  # running total
        Tensor(name="FINISH_REASON", dtype=bytes, shape=(1,)),  # empty until the final response
        Tensor(name="CUM_LOG_PROB", dtype=np.float32, shape=(1,)),  # running total
        Tensor(name="OUTPUT_LOG_PROBS", dtype=np.float32, shape=(-1,)),  # the new tokens' values
        Tensor(name="TEXT_DELTA", dtype=bytes, shape=(1,)),  # the prompt first when exclude_input_in_output=false
        Tensor(name="ERROR", dtype=bytes, shape=(1,)),
        Tensor(name="TEXT_LIMIT", dtype=np.int32, shape=(1,)),
        Tensor(name="ENGINE_STATS", dtype=np.float32, shape=(len(STATS),)),
        Tensor(name="CANCEL_KEY", dtype=bytes, shape=(1,)),  # how postprocessing names it to cancel it
        Tensor(name="SCORES", dtype=bytes, shape=(1,)),  # the new positions' (the prompt's in the first response)
    ]
    return inputs, outputs


class _StreamState:
    """What one stream has sent; ``delta`` runs on the thread that calls the engine's listeners (the engine
    thread, or in the server the serving process's link thread), where the generation is consistent."""

    def __init__(self, params, prompt_tokens: int, prefix: str, key: str, clock=time.monotonic, tokenizer=None):
        self.params, self.prompt_tokens, self.key, self.clock = params, prompt_tokens, key, clock
        self.tokenizer = tokenizer
        self.prompt_scored = False  # the prompt's scores go out once, with the first token (or the end)
        self.tokens = self.chars = 0
        self.cum = 0.0  # running sum of the sent tokens' log-probs (the listener runs once per token)
        self.prefix = prefix  # sent before the first text: the prompt, when exclude_input_in_output is false
        # Coalescing: the monotonic time before which the listener holds this stream's tokens back (set by the
        # stream's coroutine when it sends). Holding them there means no delta to compute, no hand-over and no
        # wake-up of the event loop until a response is due.
        self.due = 0.0  # nothing sent yet: the first token goes out at once (TTFT)

    def due_now(self, g) -> bool:
        """In the listener: whether what changed goes out now (the end never waits)."""
        return g.done or self.clock() >= self.due

    def delta(self, g) -> dict | None:
        done = g.done
        end = g.tracker.stable_length(done)
        text = (g.tracker.final_text if done else g.tracker.text)[self.chars : end]
        new, logprobs = g.tokens[self.tokens :], g.logprobs[self.tokens :]
        if not (done or text or new):
            return None
        first = self.tokens == 0 and bool(new)
        scored = scores.scores(g, self.tokenizer, self.tokens, prompt=not self.prompt_scored)
        self.prompt_scored = True
        self.tokens, self.chars = len(g.tokens), max(self.chars, end)
        self.cum += sum(logprobs)
        ttft, itl = request_timing(g)
        return {"text": text, "ids": list(new), "logprobs": list(logprobs), "total": len(g.tokens),
                "cum": self.cum, "done": done,
                "reason": g.finish_reason or "", "error": g.error,
                "ttft": ttft if first else -1.0, "itl": itl if done else -1.0,
                "input_tokens": self.prompt_tokens if first else 0, "scores": scored}


def _merge(a: dict, b: dict) -> dict:
    """Coalesce two deltas of one stream (the client fell behind): one response instead of two."""
    return {**b, "text": a["text"] + b["text"], "ids": a["ids"] + b["ids"], "logprobs": a["logprobs"] + b["logprobs"],
            "ttft": max(a["ttft"], b["ttft"]), "input_tokens": a["input_tokens"] + b["input_tokens"],
            "scores": scores.merge(a["scores"], b["scores"])}


def _stream_outputs(d: dict, state: _StreamState) -> dict:
    asked = state.params.return_log_probs
    text, state.prefix = state.prefix + d["text"], ""
    out = {
        "OUTPUT_IDS": np.array([d["ids"] or [0]], np.int32),
        "NUM_INPUT_TOKENS": np.array([[state.prompt_tokens]], np.int32),
        "LOG_PROBS_LENGTH": np.array([[len(d["ids"]) if asked else 0]], np.int32),
        "OUTPUT_LENGTH": np.array([[d["total"]]], np.int32),
        "FINISH_REASON": np.array([[d["reason"].encode() if d["done"] else b""]], dtype=object),
        "CUM_LOG_PROB": np.array([[d["cum"] if asked else 0.0]], np.float32),
        "OUTPUT_LOG_PROBS": np.array([(d["logprobs"] if asked else []) or [0.0]], np.float32),
        "TEXT_DELTA": np.array([[text.encode("utf-8")]], dtype=object),
        "ERROR": np.array([[b""]], dtype=object),
        "TEXT_LIMIT": np.array([[-1]], np.int32),
        "ENGINE_STATS": np.array([stats_row(d["ttft"], d["itl"], d["input_tokens"], len(d["ids"]))], np.float32),
        "CANCEL_KEY": np.array([[state.key.encode()]], dtype=object),
        "SCORES": np.array([[scores.encode(d["scores"])]], dtype=object),
    }
    return out


# Each streamed response costs about a millisecond of server CPU across PyTriton, Triton and postprocessing,
# and on a small box that CPU is taken from the engine. So the streams share a budget of responses per second:
# with n streams live, each waits about n / budget seconds (at most COALESCE_MAX_S) after sending, and
# everything generated meanwhile goes out in one response. The first token is never held back.
COALESCE_MAX_S = 0.5


def coalesce_wait_s(live: int, responses_per_s: float) -> float:
    """How long a stream holds its next response when ``live`` streams are in flight (0: send at once)."""
    if responses_per_s <= 0 or live <= 2:
        return 0.0
    return min(COALESCE_MAX_S, live / responses_per_s)


class _Deliveries:
    """Hands the streams' deltas to their event loop once per engine step, not once per token.

    Each hand-over (``call_soon_threadsafe``) writes to the loop's wake-up pipe and wakes the loop thread, which
    then competes for the GIL with the thread delivering the step: at 16 streams that was 16 times a step.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._pending: dict = {}  # loop -> [callback]

    def put(self, loop, callback) -> None:
        """In a listener: ``callback()`` on ``loop`` after this step."""
        with self._lock:
            self._pending.setdefault(loop, []).append(callback)

    def flush(self) -> None:
        """After each step, as a step hook (``add_step_hook`` of the engine or its ``RemoteEngine``)."""
        with self._lock:
            pending, self._pending = self._pending, {}
        for loop, callbacks in pending.items():
            with contextlib.suppress(RuntimeError):  # the loop closed (PyTriton stopping): nobody waits
                loop.call_soon_threadsafe(_run_all, callbacks)


def _run_all(callbacks) -> None:
    for callback in callbacks:
        callback()


def make_stream_infer(engine: Engine, control=None, responses_per_s: float = 0.0, clock=time.monotonic):
    """A decoupled ``async def`` generator: many streams in flight on one instance.

    PyTriton runs a decoupled model's callable as an async generator on one event loop per instance; only that
    form keeps every stream of an instance in flight at once (a unary callable is served one request at a time).

    ``control`` (a ``control.ControlChannel``) maps each stream's CANCEL_KEY to its generation, so that a client's
    cancellation reaches the engine. ``responses_per_s`` is the coalescing budget (0: off), timed by ``clock``
    (seconds; tests pass one that counts engine steps).
    """
    import asyncio
    import itertools

    live = [0]  # streams in flight on this event loop
    deliveries = _Deliveries()
    engine.add_step_hook(deliveries.flush)
    keys = itertools.count()

    async def infer(requests):
        live[0] += 1
        try:
            async for response in _stream(requests):
                yield response
        finally:
            live[0] -= 1

    async def _stream(requests):
        request = requests[0]  # max_batch_size 1: one request of one row per call
        key = f"stream-{next(keys)}"
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        try:
            if "STREAM" in request and not bool(request["STREAM"][0][0]):
                raise InvalidRequest("stream", False, "ensemble_stream always streams; send unary requests to "
                                                      "'ensemble'")
            ids, params = parse_row(request, 0)
            prefix = b""
            if not params.exclude_input_in_output and "TEXT_INPUT" in request:
                prefix = request["TEXT_INPUT"][0][0]
            state = _StreamState(params, len(ids), prefix.decode("utf-8", errors="replace"), key, clock,
                                 engine.tokenizer)

            def listener(g):
                if state.due_now(g) and (d := state.delta(g)) is not None:
                    deliveries.put(loop, functools.partial(queue.put_nowait, d))

            generation = engine.submit(ids, params, listener=listener, track_text=True)
        except (InvalidRequest, EngineBusy) as err:
            raise StreamError(str(err)) from None
        if control is not None:
            control.register(key, generation)
        try:
            while True:
                d = await queue.get()
                while not queue.empty():  # handed over in the same step (rare: the engine holds tokens back)
                    d = _merge(d, queue.get_nowait())
                if d["error"]:
                    raise StreamError(d["error"])
                # The next response waits (see coalesce_wait_s), except the last: the client's next request may
                # be waiting on it, and its slot would stay empty meanwhile.
                state.due = clock() + coalesce_wait_s(live[0], responses_per_s)
                yield [_stream_outputs(d, state)]
                if d["done"]:
                    return
        finally:  # also when PyTriton closes the generator early: the slot must not stay taken
            if control is not None:
                control.unregister(key)
            engine.cancel(generation)

    return infer
