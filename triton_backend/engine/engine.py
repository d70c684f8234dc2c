"""Continuous-batching generation engine (rank 0).

Every step admits waiting requests into free KV-cache slots (prefill), then advances every running sequence
by one token (decode), and retires the ones that finished. Requests therefore join and leave the running
batch at token granularity, whatever their prompt lengths and sampling parameters.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable

import torch

from preprocessing.params import SamplingParams

from .generation import EngineBusy, Generation, new_generation, validate
from .sampling import RowSampler, sample

__all__ = ["Engine", "EngineBusy", "EngineStats", "Generation"]

LOG = logging.getLogger(__name__)


@dataclasses.dataclass
class _Running:
    generation: Generation
    slot: int
    sampler: RowSampler


@dataclasses.dataclass
class EngineStats:
    steps: int = 0  # forward passes
    prefills: int = 0  # passes that ran prompts (beside the running sequences' next tokens)
    max_rows_in_step: int = 0
    requests_finished: int = 0
    requests_failed: int = 0
    requests_cancelled: int = 0
    tokens_generated: int = 0
    rows_decoded: int = 0  # sequences advanced, summed over steps: / steps is the mean batch
    step_seconds: float = 0.0  # time spent in steps (prefill and decode), the rest is idle
    steps_sampled_again: int = 0  # steps whose sampling failed and were sampled row by row (a request's fault)

    def summary(self) -> str:
        steps = max(self.steps, 1)
        return (f"{self.requests_finished} requests, {self.tokens_generated} tokens in {self.steps} steps "
                f"({self.prefills} with prompts): {self.rows_decoded / steps:.1f} rows and "
                f"{self.step_seconds / steps * 1e3:.1f} ms per step, {self.step_seconds:.1f} s busy")


def _failure(err: BaseException) -> str:
    """The error a request gets when the engine failed it (a step, or its own sampling)."""
    return f"generation failed: {type(err).__name__}: {err}"


class Engine:
    """Owns the model and its KV cache; thread-safe ``submit`` from any number of serving threads.

    ``gpt`` is a ``CachedGPT`` or, with tensor parallelism, a ``protocol.Leader`` over one: only the engine
    thread runs it, so every collective is issued from one thread in one order. With ``failures_fatal`` a
    failed step stops the engine (``fatal`` is set): ranks may disagree after it, so the job must end. An
    exception anywhere else on the engine thread (a step hook, admission, a listener) always does.
    """

    HEARTBEAT_S = 5.0

    def __init__(self, gpt, vocab_size: int, eos_id: int, max_queue: int = 1024, prefill_tokens: int = 4096,
                 failures_fatal: bool = False, tokenizer=None, max_request_s: float = 0.0,
                 cpus: set[int] | None = None):
        self.gpt = gpt
        self.tokenizer = tokenizer  # needed for stop words, bad words and streaming text
        self.failures_fatal = failures_fatal
        self.fatal: BaseException | None = None
        self.step_started: float | None = None  # monotonic time the running step began (for watchdogs)
        self.vocab_size = vocab_size
        self.eos_id = eos_id
        self.context = gpt.max_len
        self.max_queue = max_queue
        # A request older than this is ended with an error (0: no limit): the backstop for clients that went
        # away without a cancellation reaching the engine (an HTTP stream whose connection dropped).
        self.max_request_s = max_request_s
        self.prefill_tokens = prefill_tokens
        self.cpus = cpus  # cores the engine thread runs on (None: wherever the OS puts it)
        self.stats = EngineStats()
        self._waiting: collections.deque[Generation] = collections.deque()
        self._running: list[_Running] = []
        self._free_slots = list(range(gpt.cache.max_slots))[::-1]  # popped from the end: slot 0 first
        self._wake = threading.Condition()
        self._stopping = False
        self._closing = False  # draining: no new requests, those in flight go on
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        self.ended = threading.Event()  # set when the engine thread ends, however it ends
        # Called on the engine thread after every step (and pass of its loop): listeners may collect what
        # changed and hand it on once per step rather than once per token.
        self._step_hooks: list[Callable[[], None]] = []

    # -- serving side -------------------------------------------------------------------------------------
    def start(self) -> Engine:
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify_all()
        self._thread.join(timeout)

    def drain(self, grace_s: float) -> bool:
        """Refuse new requests and wait up to ``grace_s`` for those in flight; True when none is left."""
        with self._wake:
            self._closing = True
            return self._wake.wait_for(lambda: self.fatal is not None or not (self._waiting or self._running),
                                       grace_s)

    def validate(self, prompt: list[int], params: SamplingParams) -> None:
        """Every rule a request must meet before it may reach the model (raises ``InvalidRequest``)."""
        validate(prompt, params, self.vocab_size, self.context, self.tokenizer)

    def submit(self, prompt: list[int], params: SamplingParams, listener=None, track_text: bool = False) -> Generation:
        """Queue a request; ``listener(generation)`` runs on the engine thread after every new token."""
        self.validate(prompt, params)
        generation = new_generation(prompt, params, self.tokenizer, listener, track_text)
        with self._wake:
            if self._stopping or self._closing:
                raise EngineBusy("the server is shutting down and takes no new requests")
            if len(self._waiting) >= self.max_queue:
                raise EngineBusy(f"{len(self._waiting)} requests are already waiting; retry later")
            self._waiting.append(generation)
            self._wake.notify()
        return generation

    def add_step_hook(self, hook: Callable[[], None]) -> None:
        """Run ``hook()`` on the engine thread after every step, once listeners have seen its tokens."""
        self._step_hooks.append(hook)

    def cancel(self, generation: Generation) -> None:
        """Stop ``generation`` (its client went away): it leaves the queue or its slot before the next step."""
        with self._wake:
            if not generation.done:
                generation.cancelled = True
                self._wake.notify()

    def load(self) -> dict:
        """Running and waiting sequences, the share of KV-cache slots in use, requests cancelled so far."""
        with self._wake:
            running, waiting = len(self._running), len(self._waiting)
        return {"running": running, "waiting": waiting, "kv_slots_used": running / self.gpt.cache.max_slots,
                "cancelled": self.stats.requests_cancelled}

    # -- engine thread ------------------------------------------------------------------------------------
    def _loop(self) -> None:
        try:
            if self.cpus:
                os.sched_setaffinity(0, self.cpus)  # this thread only (Linux): see server.engine_cpus
            self._serve_steps()
        except BaseException as err:  # a step hook, admission, a listener: nothing may end this thread silently
            LOG.exception("the engine thread failed outside a step")
            self.fatal = err
        finally:
            try:
                self._drain("the server is shutting down" if self.fatal is None else
                            f"the engine failed: {self.fatal}")
                self._after_step()
                if hasattr(self.gpt, "shutdown"):
                    self.gpt.shutdown()
            except BaseException as err:
                LOG.exception("the engine thread failed while stopping")
                self.fatal = self.fatal or err
            finally:
                self.ended.set()

    def alive(self) -> bool:
        """False once the engine thread has ended (stopped, or failed: then ``fatal`` says why)."""
        return not self.ended.is_set()

    def _serve_steps(self) -> None:
        while True:
            going = self._serve_once()
            self._after_step()  # after every pass of the loop, whatever it did
            if not going:
                return

    def _after_step(self) -> None:
        for hook in self._step_hooks:
            hook()

    def _serve_once(self) -> bool:
        """Wait for work, retire abandoned requests, admit and run one step; False when the engine must stop."""
        with self._wake:
            if not (self._stopping or self._waiting or self._running):
                self._wake.wait(self.HEARTBEAT_S)
            if self._stopping:
                return False
            self._end_abandoned()
            if not (self._waiting or self._running):
                idle = True
            else:
                idle, admitted = False, self._admit()
        if idle:
            if hasattr(self.gpt, "heartbeat"):
                try:
                    self.gpt.heartbeat()
                except Exception as err:  # a follower is gone or stuck: the job cannot go on
                    LOG.error("heartbeat failed: %s", err)
                    self.fatal = err
                    return False
            return True
        self.step_started = time.monotonic()
        try:
            self._step(admitted)
        except Exception as err:  # a failed step fails its rows, and the server only when it must
            LOG.exception("engine step failed")
            if isinstance(err, torch.OutOfMemoryError) and torch.cuda.is_available():
                torch.cuda.empty_cache()  # give back what the failed step held, for the steps to come
            for row in {id(r): r for r in admitted + self._running}.values():
                self._retire(row, error=_failure(err))
            if self.failures_fatal:
                self.fatal = err
                return False
        finally:
            self.stats.step_seconds += time.monotonic() - self.step_started
            self.step_started = None
        return True

    def _sample_each(self, rows: list[_Running], logits: torch.Tensor):
        """Sample row by row after the whole step failed: the rows that fail again end with an error, the others
        get the token the step would have given them (their uniform draws are kept, see ``RowSampler``)."""
        self.stats.steps_sampled_again += 1
        kept, tokens, logprobs = [], [], []
        for i, row in enumerate(rows):
            try:
                (token,), (logprob,) = sample(logits[i : i + 1], [row.sampler], self.vocab_size)
            except Exception as err:
                self._retire(row, error=_failure(err))
            else:
                kept.append(row)
                tokens.append(token)
                logprobs.append(logprob)
        return kept, tokens, logprobs

    def _end_abandoned(self) -> None:
        """Retire cancelled and over-age requests, waiting or running (called under the lock, between steps)."""
        limit = time.monotonic() - self.max_request_s if self.max_request_s else None
        over_age = f"the request ran longer than the server's limit of {self.max_request_s:g} s"

        def abandoned(g: Generation) -> bool:
            return g.cancelled or (limit is not None and g.submitted < limit)

        if any(abandoned(g) for g in self._waiting):
            kept = collections.deque()
            for g in self._waiting:
                if not abandoned(g):
                    kept.append(g)
                    continue
                g.finished_at = time.monotonic()
                g.finish_reason, g.error = ("cancelled", None) if g.cancelled else (None, over_age)
                self._finish(g)
            self._waiting = kept
            if not (self._running or self._waiting):
                self._wake.notify_all()  # for ``drain``
        for row in [r for r in self._running if abandoned(r.generation)]:
            cancelled = row.generation.cancelled
            self._retire(row, reason="cancelled" if cancelled else None, error=None if cancelled else over_age,
                         locked=True)

    def stalled(self, limit_s: float) -> bool:
        """True when the step in progress has run longer than ``limit_s`` (a collective that hangs)."""
        started = self.step_started
        return started is not None and time.monotonic() - started > limit_s

    def _drain(self, message: str) -> None:
        for row in list(self._running):
            self._retire(row, error=message)
        with self._wake:
            self._stopping = True
            waiting, self._waiting = list(self._waiting), collections.deque()
        for generation in waiting:
            generation.error = message
            generation._done.set()
            generation._notify()

    def _admit(self) -> list[_Running]:
        """Move waiting requests into free slots, within the prefill token budget (called under the lock)."""
        admitted, budget = [], self.prefill_tokens
        while self._waiting and self._free_slots:
            budget -= len(self._waiting[0].prompt)  # prompts are packed: the budget is their total length
            if admitted and budget < 0:
                break
            generation = self._waiting.popleft()
            p = generation.params
            end_id = self.eos_id if p.end_id is None else p.end_id
            seed = p.seed if p.seed is not None else secrets.randbits(63)
            sampler = RowSampler(p, generation.prompt, end_id, seed, self._bad_sequences(p.bad_words))
            admitted.append(_Running(generation, self._free_slots.pop(), sampler))
        self._running.extend(admitted)  # counted as running from here on (load, drain), prefilled next
        return admitted

    def _bad_sequences(self, bad_words: tuple[str, ...]) -> tuple[tuple[int, ...], ...]:
        """Token sequences of each bad word, as written and after a space (how it appears mid-text)."""
        sequences = {tuple(self.tokenizer.encode(v)) for w in bad_words for v in (w, " " + w)}
        return tuple(s for s in sequences if s)

    def _step(self, admitted: list[_Running]) -> None:
        """One forward pass: the next token of every running sequence and the whole prompt of each admitted one,
        packed into one row (``kv_cache.plan``), so admitting requests does not cost a pass of its own."""
        fresh = {id(r) for r in admitted}
        decoding = [r for r in self._running if id(r) not in fresh]
        tokens = [r.sampler.generated[-1] for r in decoding]
        positions = [len(r.generation.prompt) + len(r.sampler.generated) - 1 for r in decoding]
        slots = [r.slot for r in decoding]
        last = list(range(len(decoding)))
        for r in admitted:
            prompt = r.generation.prompt
            tokens += prompt
            positions += range(len(prompt))
            slots += [r.slot] * len(prompt)
            last.append(len(tokens) - 1)
        device = self.gpt.device  # pragma: no mutate
        logits = self.gpt.forward(*(torch.tensor(x, dtype=torch.long).to(device)  # pragma: no mutate
                                    for x in (tokens, positions, slots, last)))
        self.stats.steps += 1
        self.stats.prefills += bool(admitted)
        self.stats.rows_decoded += len(last)
        self.stats.max_rows_in_step = max(self.stats.max_rows_in_step, len(last))
        self._advance(decoding + admitted, logits)

    def _advance(self, rows: list[_Running], logits: torch.Tensor) -> None:
        try:
            tokens, logprobs = sample(logits, [r.sampler for r in rows], self.vocab_size)
        except Exception:  # one request's parameters broke sampling: that request alone must fail
            LOG.exception("sampling a step failed; sampling its rows one by one")
            rows, tokens, logprobs = self._sample_each(rows, logits)
        for row, token, logprob in zip(rows, tokens, logprobs):
            g, s = row.generation, row.sampler
            if token == s.end_id:
                self._retire(row, reason="stop")
                continue
            s.accept(token)
            g.tokens.append(token)
            if g.first_token_at is None:
                g.first_token_at = time.monotonic()
            g.logprobs.append(logprob)
            self.stats.tokens_generated += 1
            if g.tracker is not None and g.tracker.add(token):
                self._retire(row, reason="stop")
            elif len(g.tokens) >= g.params.max_tokens:
                self._retire(row, reason="length")
            else:
                g._notify()

    def _retire(self, row: _Running, reason: str | None = None, error: str | None = None,
                locked: bool = False) -> None:
        if locked:
            self._free(row)
        else:
            with self._wake:
                self._free(row)
        g = row.generation
        g.finish_reason, g.error, g.finished_at = reason, error, time.monotonic()
        self._finish(g)

    def _free(self, row: _Running) -> None:
        if row in self._running:
            self._running.remove(row)
        if row.slot not in self._free_slots:
            self._free_slots.append(row.slot)
        if not (self._running or self._waiting):
            self._wake.notify_all()  # for ``drain``

    def _finish(self, g: Generation) -> None:
        if g.error:
            self.stats.requests_failed += 1
        elif g.cancelled:
            self.stats.requests_cancelled += 1
        else:
            self.stats.requests_finished += 1
        g._done.set()
        g._notify()
