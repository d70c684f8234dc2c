"""Continuous-batching generation engine (rank 0).

Every step advances each running sequence by one token (decode), runs the next chunk of the prompts being
read (chunked prefill, within a per-step token budget), admits waiting requests while KV blocks and the
budget allow, and retires the sequences that finished. Requests therefore join and leave the running batch at
token granularity, whatever their prompt lengths and sampling parameters. A prompt starts from the blocks an
earlier one with the same beginning left in the cache (prefix caching). When the blocks run out, the newest
sequence is preempted: its blocks go back, and it is read again (prompt and tokens so far) when there is room.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
import os
import secrets
import threading
import time
from collections.abc import Callable

import numpy as np
import torch

from preprocessing.params import InvalidRequest, SamplingParams
from triton_backend.cache.blocks import BlockPool
from triton_backend.transfer import upload

from .generation import EngineBusy, Generation, new_generation, validate
from .grammar import GUIDE_TYPE, Grammars, prefetch
from .outputs import Scored, StepOutputs, compute, failure
from .sampling import RowSampler
from .sequence import Sequence

__all__ = ["Engine", "EngineBusy", "EngineStats", "Generation"]

LOG = logging.getLogger(__name__)

# Prompt tokens per step on CPU unless PREFILL_TOKENS says otherwise (CUDA: 2048, server.load_engine). With the
# CPU decode kernel a step of 8 decodes took about 1.4 ms on the ``long`` preset, and a 256-token chunk beside
# them opened a gap of 4.2-4.5x that; 128 keeps it at 1.7-1.9x (tools/bench_cache.py --scenario chunked).
CPU_PREFILL_TOKENS = 128
CUDA_PREFILL_TOKENS = 2048  # PREFILL_TOKENS's default on CUDA


@dataclasses.dataclass
class _Chunk:
    row: Sequence
    length: int  # tokens this step runs for the row
    sample: bool  # the chunk ends the row's pending tokens: its last logits give the next token


@dataclasses.dataclass
class _Launched:
    """A step on its way through the model: what it runs, and what its outputs are for."""

    chunks: list[_Chunk]
    scored: list[Sequence]  # one per ``Scored`` of the step, in order
    sampled: list[Sequence]  # one per sampled row, in order
    outputs: StepOutputs | None = None  # already there when the step ran in this process


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
    prompt_chunks: int = 0  # parts of prompts run in a step (a prompt over the step budget runs in several)
    preemptions: int = 0  # sequences sent back to wait because the KV blocks ran out
    peak_running: int = 0  # most sequences in the running batch at once

    def summary(self) -> str:
        steps = max(self.steps, 1)
        return (f"{self.requests_finished} requests, {self.tokens_generated} tokens in {self.steps} steps "
                f"({self.prefills} with prompts): {self.rows_decoded / steps:.1f} rows and "
                f"{self.step_seconds / steps * 1e3:.1f} ms per step, {self.step_seconds:.1f} s busy")


def unrecoverable(err: BaseException) -> bool:
    """Whether the device is unusable after ``err``: a CUDA error other than running out of memory (a device-side
    assert, an illegal address) is sticky, failing every later call in the process, so the job must end (at every
    TP size) rather than fail each step behind a green health check. Out of memory is survivable."""
    if isinstance(err, torch.OutOfMemoryError):
        return False
    if isinstance(err, getattr(torch, "AcceleratorError", ())):  # torch >= 2.8 raises CUDA errors as this
        return True
    return isinstance(err, RuntimeError) and "CUDA error" in str(err)  # older torch: a RuntimeError saying so


class Engine:
    """Owns the model and its KV cache; thread-safe ``submit`` from any number of serving threads.

    ``gpt`` is a ``CachedGPT`` or, with tensor parallelism, a ``protocol.Leader`` over one: only the engine
    thread runs it, so every collective is issued from one thread in one order. With pipeline stages it is a
    ``pipeline.PipelineLeader``: steps are launched into it and their outputs collected later, and the running
    sequences are split in ``gpt.microbatches`` groups whose steps are in the pipeline at once (a group's next
    step is scheduled when its previous one's tokens are back). With ``failures_fatal`` a
    failed step stops the engine (``fatal`` is set): ranks may disagree after it, so the job must end. An
    exception anywhere else on the engine thread (a step hook, admission, a listener) always does.
    """

    HEARTBEAT_S = 5.0

    def __init__(self, gpt, vocab_size: int, eos_id: int, max_queue: int = 1024,
                 prefill_tokens: int = CPU_PREFILL_TOKENS,
                 failures_fatal: bool = False, tokenizer=None, max_request_s: float = 0.0,
                 cpus: set[int] | None = None, prefix_caching: bool = True, reserve_context: bool = False):
        self.gpt = gpt
        self.tokenizer = tokenizer  # needed for stop words, bad words, streaming text and guides
        self.grammars = Grammars(tokenizer) if tokenizer is not None else None
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
        self.prefill_tokens = prefill_tokens  # prompt tokens per step: longer prompts run over several steps
        self.token_cost_in_keys = 2 * gpt.arch.hidden_size  # see ``_chunk``
        self.blocks = BlockPool(gpt.cache.num_blocks, gpt.cache.block_size, prefix_caching)
        if self.blocks.num_blocks < self.blocks.blocks_for(self.context):  # preemption could never make room
            raise ValueError(f"a KV cache of {self.blocks.num_blocks} blocks cannot hold one {self.context}-token "
                             f"sequence")
        self.max_slots = gpt.max_slots
        self.microbatches = getattr(gpt, "microbatches", 1)  # steps in flight at once (pipeline stages)
        self._in_flight: collections.deque[_Launched] = collections.deque()
        self._last_group = -1  # the group whose step was launched last
        self._released: list[int] = []  # sequences retired since the last launch (their copies at the last stage)
        # The slot layout this cache replaced, kept as the benchmarks' baseline (tools/bench_cache.py): every
        # sequence takes blocks for the whole context when it is admitted.
        self.reserve_context = reserve_context
        self.cpus = cpus  # cores the engine thread runs on (None: wherever the OS puts it)
        self.stats = EngineStats()
        self._waiting: collections.deque[Generation] = collections.deque()
        self._running: list[Sequence] = []  # in the order they were admitted
        self._slots = list(range(self.max_slots - 1, -1, -1))  # rows of the ranks' block tables no sequence holds
        self._preempted: collections.deque[Sequence] = collections.deque()  # resumed before new requests
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
            return self._wake.wait_for(lambda: self.fatal is not None or not self._busy(),
                                       grace_s)

    def validate(self, prompt: list[int], params: SamplingParams) -> None:
        """Every rule a request must meet before it may reach the model (raises ``InvalidRequest``)."""
        validate(prompt, params, self.vocab_size, self.context, self.tokenizer)

    def submit(self, prompt: list[int], params: SamplingParams, listener=None, track_text: bool = False) -> Generation:
        """Queue a request; ``listener(generation)`` runs on the engine thread after every new token. Its guide
        compiles here, on the caller's thread (or comes from the cache), never on the engine's."""
        self.validate(prompt, params)
        guide = None
        if params.guided_decoding_guide_type:
            if self.grammars is None:
                raise InvalidRequest(GUIDE_TYPE, params.guided_decoding_guide_type,
                                     "needs the tokenizer, which this engine was not given")
            guide = self.grammars.guide(params.guided_decoding_guide_type, params.guided_decoding_guide)
        generation = new_generation(prompt, params, self.tokenizer, listener, track_text)
        generation.guide = guide
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
        """Running and waiting sequences, the share of KV blocks held, requests cancelled so far, the prefix
        cache's looked-up and found prompt tokens."""
        with self._wake:
            running, waiting = len(self._running), len(self._waiting) + len(self._preempted)
            used = self.blocks.in_use()
        return {"running": running, "waiting": waiting, "kv_blocks_used": used,
                "kv_usage": used / self.blocks.num_blocks, "cancelled": self.stats.requests_cancelled,
                "prefix_queried_tokens": self.blocks.queried_tokens, "prefix_hit_tokens": self.blocks.hit_tokens}

    def expert_tokens(self, wait_s: float = 0.0) -> dict[int, list[int]]:
        """Tokens routed to each expert so far, per MoE layer (empty for a dense model). Pipeline stages after the
        first send theirs back with a step or a heartbeat (``pipeline.PipelineLeader``): when steps ran since,
        an idle engine is woken to heartbeat at once, and this waits up to ``wait_s`` for the fresh tallies."""
        tally = getattr(self.gpt, "expert_tokens", None)
        if tally is None:
            return {}
        tallies = tally()
        if getattr(self.gpt, "tallies_stale", False):
            with self._wake:
                self._wake.notify_all()
            deadline = time.monotonic() + wait_s
            while self.gpt.tallies_stale and time.monotonic() < deadline and self.fatal is None:
                time.sleep(0.02)
            tallies = tally()
        return tallies

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
                if self.fatal is None:
                    self._settle()
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

    def _settle(self) -> None:
        """Collect the steps still in the pipeline (their tokens are not kept): every stage then ends idle."""
        while self._in_flight:
            if self._in_flight.popleft().outputs is None:
                self.gpt.collect()

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
        """Wait for work, retire abandoned requests, admit and launch one step, collect the oldest step in flight
        when no other may be launched; False when the engine must stop."""
        with self._wake:
            if not (self._stopping or self._busy() or self._in_flight):
                self._wake.wait(self.HEARTBEAT_S)
            if self._stopping:
                return False
            self._end_abandoned()
            chunks = []
            if len(self._in_flight) < self.microbatches and self._busy():
                for group in self._free_groups():  # the first with work (another may hold the blocks it needs)
                    chunks = self._schedule(group)
                    if chunks:
                        break
        if not chunks and not self._in_flight:
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
            if chunks:
                self._launch(chunks)
            if self._in_flight and (len(self._in_flight) >= self.microbatches or not chunks):
                self._collect()
        except Exception as err:  # a failed step fails its rows, and the server only when it must
            LOG.exception("engine step failed")
            if isinstance(err, torch.OutOfMemoryError) and torch.cuda.is_available():
                torch.cuda.empty_cache()  # give back what the failed step held, for the steps to come
            self._in_flight.clear()
            for row in list(self._running):
                row.in_flight = False
                self._retire(row, error=failure(err))
            if self.failures_fatal or unrecoverable(err):
                self.fatal = err
                return False
        finally:
            self.stats.step_seconds += time.monotonic() - self.step_started
            self.step_started = None
        return True

    def _free_groups(self) -> list[int]:
        """The groups of sequences with no step in flight, the one after the last launched first (round robin)."""
        busy = {launched.chunks[0].row.group for launched in self._in_flight}
        order = [(self._last_group + 1 + i) % self.microbatches for i in range(self.microbatches)]
        return [g for g in order if g not in busy]

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
            if not self._busy():
                self._wake.notify_all()  # for ``drain``
        for row in [r for r in [*self._running, *self._preempted] if abandoned(r.generation)]:
            cancelled = row.generation.cancelled
            self._retire(row, reason="cancelled" if cancelled else None, error=None if cancelled else over_age,
                         locked=True)

    def stalled(self, limit_s: float) -> bool:
        """True when the step in progress has run longer than ``limit_s`` (a collective that hangs)."""
        started = self.step_started
        return started is not None and time.monotonic() - started > limit_s

    def _busy(self) -> bool:
        return bool(self._waiting or self._running or self._preempted)

    def _drain(self, message: str) -> None:
        for row in [*self._running, *self._preempted]:
            self._retire(row, error=message)
        with self._wake:
            self._stopping = True
            waiting, self._waiting = list(self._waiting), collections.deque()
        for generation in waiting:
            generation.error = message
            generation._done.set()
            generation._notify()

    def _schedule(self, group: int = 0) -> list[_Chunk]:
        """What the next step of ``group`` runs (called under the lock): the next token of every decoding sequence,
        then the next chunks of prompts being read, then new sequences (resumed ones first) while the step's
        prompt budget, ``max_slots`` (a share of it per group) and the KV blocks allow. Blocks for all of it are
        taken here; when they run out, the group's newest sequences are preempted (never one in flight)."""
        while True:
            members = [r for r in self._running if r.group == group]
            decoding = [r for r in members if r.pending() == 1]
            if self._reserve(decoding, [1] * len(decoding), members):
                break
        chunks = [_Chunk(r, 1, True) for r in decoding]
        budget = self.prefill_tokens
        for row in [r for r in members if r.pending() > 1]:
            n = self._grow(row, self._chunk(row, budget))
            if n:
                chunks.append(_Chunk(row, n, n == row.pending()))
                budget -= n
        share = -(-self.max_slots // self.microbatches)
        while budget > 0 and len(self._running) < self.max_slots and len(members) < share \
                and (self._preempted or self._waiting):
            resumed = bool(self._preempted)
            row = self._preempted[0] if resumed else self._new_row(self._waiting[0])
            row.start_from_cache(self.blocks)
            n = self._grow(row, self._chunk(row, budget))
            if not n:
                row.release(self.blocks)
                break
            if not resumed:
                self.blocks.count_lookup(len(row.generation.prompt), row.computed)
            (self._preempted if resumed else self._waiting).popleft()
            row.group = group
            row.slot = self._slots.pop()  # its table is new to the ranks: ``tabled`` is 0 (``Sequence.release``)
            self._running.append(row)  # counted as running from here on (load, drain)
            members.append(row)
            chunks.append(_Chunk(row, n, n == row.pending()))
            budget -= n
        if not chunks and members:  # prompts that hold every block and none can go on: make room
            self._preempt(members[-1])
            return self._schedule(group)
        self.stats.peak_running = max(self.stats.peak_running, len(self._running))
        return chunks

    def _new_row(self, generation: Generation) -> Sequence:
        p = generation.params
        end_id = self.eos_id if p.end_id is None else p.end_id
        seed = p.seed if p.seed is not None else secrets.randbits(63)
        return Sequence(generation, RowSampler(p, generation.prompt, end_id, seed, self._bad_sequences(p.bad_words),
                                               generation.guide))

    def _chunk(self, row: Sequence, budget: int) -> int:
        """Prompt tokens of ``row`` to run this step: at most ``budget``, and fewer deep into a long prompt, so that
        no chunk costs more than a first chunk of ``prefill_tokens`` (a step with a chunk stays a few decode
        steps long, whatever the prompt's length; ``tools/bench_cache.py``, chunked).

        Cost model: a chunk of n tokens after c others costs n (c + n + K) (query, key) pairs' worth, K the cost of
        a token's projections and MLP in pairs. Counting multiply-adds, K would be 6 h (``h`` the hidden size:
        12 h^2 per token, 2 h per pair); measured on CPU, where masked attention runs on SDPA's unfused path, a
        pair costs three times that, so K = 2 h (``tools/bench_cache.py`` chunked: deep chunks then cost what
        the first one does).
        """
        computed, n = row.computed, min(row.pending(), budget)
        k = self.token_cost_in_keys
        limit = self.prefill_tokens * (self.prefill_tokens + k)
        if n * (computed + n + k) > limit:
            b = computed + k
            n = max(1, (math.isqrt(b * b + 4 * limit) - b) // 2)
        return n

    def _grow(self, row: Sequence, n: int) -> int:
        return row.grow(self.blocks, n, reserve=self.context if self.reserve_context else 0)

    def _reserve(self, rows: list[Sequence], counts: list[int], members: list[Sequence]) -> bool:
        """Blocks for the decode tokens of ``rows``; False when the newest of ``members`` was preempted for lack of
        them (start over)."""
        for row, n in zip(rows, counts):
            if self._grow(row, n) < n:
                self._preempt(members[-1])
                return False
        return True

    def _preempt(self, row: Sequence) -> None:
        """Send ``row`` back to wait: its blocks go back (its full ones stay findable), its tokens are kept and
        read again when it resumes, its sampling state too."""
        row.release(self.blocks)
        self._leave(row)
        self._preempted.appendleft(row)
        self.stats.preemptions += 1

    def _bad_sequences(self, bad_words: tuple[str, ...]) -> tuple[tuple[int, ...], ...]:
        """Token sequences of each bad word, as written and after a space (how it appears mid-text)."""
        sequences = {tuple(self.tokenizer.encode(v, leading=False)) for w in bad_words for v in (w, " " + w)}
        return tuple(s for s in sequences if s)

    def _launch(self, chunks: list[_Chunk]) -> None:
        """Start one forward pass over every chunk, packed into one row (``kv_cache.plan``); it yields the next
        token of each sequence whose pending tokens it finishes, and the log-probs of the prompt positions being
        scored. In this process (no pipeline) the outputs are there at once; through a pipeline they are
        collected later (``_collect``)."""
        tokens, positions, lengths, slots, keeps, table_lengths, entries, last = [], [], [], [], [], [], [], []
        scored: list[tuple[Sequence, Scored]] = []
        sampled: list[Sequence] = []
        for c in chunks:
            r = c.row
            start = len(tokens)
            tokens += r.tokens(r.computed, r.computed + c.length)
            positions += range(r.computed, r.computed + c.length)
            lengths.append(c.length)
            # its block table as an edit of what the ranks hold (cache/tables.py): the blocks taken since
            slots.append(r.slot)
            keeps.append(r.tabled)
            table_lengths.append(len(r.blocks))
            entries += r.blocks[r.tabled:]
            r.tabled = len(r.blocks)
            if r.scoring():  # position q's logits give prompt token q + 1's log-prob
                first = len(r.generation.prompt_logprobs)
                count = min(r.computed + c.length, len(r.generation.prompt) - 1) - first
                if count > 0:
                    scored.append((r, Scored(r.sampler, len(last), count, first)))
                    last += range(start + first - r.computed, start + first - r.computed + count)
            if c.sample and r.generation.params.max_tokens > 0:  # max_tokens 0: scored only, nothing to sample
                sampled.append(r)
                last.append(len(tokens) - 1)
        device = self.gpt.device  # pragma: no mutate
        arrays = [np.asarray(x, dtype=np.int64)
                  for x in (tokens, positions, last, lengths, slots, keeps, table_lengths, entries)]
        whole = upload(np.concatenate(arrays), device)  # pragma: no mutate
        step = list(whole.split([len(x) for x in arrays]))  # one upload
        host = (arrays[1], arrays[3], *arrays[4:])  # what the step plans from: no read back from the device
        launched = _Launched(chunks, [r for r, _ in scored], sampled)
        for c in chunks:
            c.row.in_flight = True
        if hasattr(self.gpt, "launch"):
            released, self._released = self._released, []
            self.gpt.launch(step, [(r.id, s) for r, s in scored], [(r.id, r.sampler) for r in sampled], released,
                            self.vocab_size, host=host)
        else:
            prefetch([r.sampler.guide for r in sampled if r.sampler.guide is not None], self.vocab_size)
            logits = self.gpt.step(*step, host=host)
            launched.outputs = compute(logits, [s for _, s in scored], [r.sampler for r in sampled], self.vocab_size)
        self._in_flight.append(launched)
        self._last_group = chunks[0].row.group

    def _collect(self) -> None:
        """The oldest step in flight's outputs, applied: the cache holds its tokens, its sequences advance."""
        launched = self._in_flight.popleft()
        out = launched.outputs if launched.outputs is not None else self.gpt.collect()
        chunks = launched.chunks
        for c in chunks:
            c.row.in_flight = False
            if not c.row.generation.done:  # retired while in flight (cancelled): its blocks are gone already
                c.row.computed += c.length
                c.row.publish(self.blocks)
        self.stats.steps += 1
        prompts = sum(c.length > 1 or not c.row.sampler.generated for c in chunks)
        self.stats.prefills += bool(prompts)
        self.stats.prompt_chunks += prompts
        self.stats.rows_decoded += len(launched.sampled)
        self.stats.max_rows_in_step = max(self.stats.max_rows_in_step, len(launched.sampled))
        self.stats.steps_sampled_again += out.sampled_again
        for row, (logprobs, top) in zip(launched.scored, out.scores):
            g = row.generation
            g.prompt_logprobs += logprobs
            if top is not None:
                g.prompt_top += top
        for c in chunks:
            g = c.row.generation
            if c.sample and g.params.max_tokens == 0 and not g.done:
                self._retire(c.row, reason="length")
        self._advance(launched.sampled, out)

    def _advance(self, rows: list[Sequence], out: StepOutputs) -> None:
        for row, token, logprob, top, error in zip(rows, out.tokens, out.logprobs, out.tops, out.errors):
            g, s = row.generation, row.sampler
            if g.done:  # retired while its step was in flight
                continue
            if error is not None:
                self._retire(row, error=error)
                continue
            if token == s.end_id:
                self._retire(row, reason="stop")
                continue
            s.accept(token)
            g.tokens.append(token)
            if g.first_token_at is None:
                g.first_token_at = time.monotonic()
            if top is not None:
                g.top.append(top)
            g.logprobs.append(logprob)
            self.stats.tokens_generated += 1
            if g.tracker is not None and g.tracker.add(token):
                self._retire(row, reason="stop")
            elif s.guide is not None and (failed := s.guide.error()):
                self._retire(row, error=str(failed))
            elif s.guide is not None and s.guide.complete():  # the grammar takes nothing more
                self._retire(row, reason="stop")
            elif len(g.tokens) >= g.params.max_tokens:
                self._retire(row, reason="length")
            else:
                g._notify()

    def _retire(self, row: Sequence, reason: str | None = None, error: str | None = None,
                locked: bool = False) -> None:
        if locked:
            self._free(row)
        else:
            with self._wake:
                self._free(row)
        g = row.generation
        g.finish_reason, g.error, g.finished_at = reason, error, time.monotonic()
        self._finish(g)

    def _leave(self, row: Sequence) -> None:
        """``row`` stops running: its slot is free for the next sequence admitted."""
        self._running.remove(row)
        self._slots.append(row.slot)
        row.slot = -1

    def _free(self, row: Sequence) -> None:
        if row in self._running:
            self._leave(row)
        if row in self._preempted:
            self._preempted.remove(row)
        row.release(self.blocks)
        if hasattr(self.gpt, "launch"):
            self._released.append(row.id)  # the pipeline's last stage drops its copy of the sampler
        if not self._busy():
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
