"""Decode steps in static shapes, replayed as CUDA graphs on CUDA.

On a GPU an eager decode step of a small model is launch overhead: a few hundred kernels of microseconds each,
each launched from Python. A CUDA graph records the kernels of one step once and replays them with one call.
A graph needs fixed shapes and fixed tensor addresses, so a decode-only step (every sequence advancing by one
token) is padded to a bucket of rows (the next power of two); block tables are padded to the longest context's
blocks. Every bucket is captured at start, before the server is ready, all in one memory pool, the ranks of a
job agreeing on each (``capture_all``): all replay, or all run eagerly. Steps with a prompt chunk, and steps
past the largest bucket, run the eager path.

The static step is ``FunctionalGPT.run`` with FlexAttention over the pool (``flex_paged.py``): each row reads its
own blocks in place through its table, whatever its length, so the graph's memory does not grow with the
context. The step's ``BlockMask`` is made once per bucket over tensors the graph refills from the step's tables
(the mask's block lists and which blocks each row holds). Padding rows hold no block (they see nothing) and
write their keys to a scratch block the cache keeps for this.

Why not ``torch.compile(mode="reduce-overhead")``: it needs the same static shapes and a forward dynamo traces
whole; this records the eager kernels as they are (the tensor-parallel all-reduces included: NCCL collectives
can be captured; the attention is FlexAttention's compiled kernel), with one compile (the attention's) per
bucket. On CPU there is nothing to replay: ``capture=False`` runs the same static step eagerly, which is how the
tests on this machine hold it to the eager path's tokens.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import torch

from triton_backend.transfer import staged, upload

from . import flex_paged

LOG = logging.getLogger(__name__)


def bucket(n: int) -> int:
    """The power of two at or above ``n`` (at least 1)."""
    return 1 << max(0, n - 1).bit_length()


def reserve_bytes(arch, max_rows: int, tensor_parallel: int, dtype: torch.dtype, blocks: int,
                  context_blocks: int) -> int:
    """Memory the static decode steps take beside the KV cache, which the cache's budget leaves free (an estimate
    with room to spare: twice what its parts add up to). Every bucket's inputs (tables of ``context_blocks`` per
    row) and mask (two int32 tables of the cache's ``blocks`` per row); the graphs' shared pool holds one step's
    activations at the largest bucket: a layer's (the pool reuses them layer after layer) and the logits. No
    copy of the keys: the attention reads the cache in place."""
    rows = bucket(max_rows)
    element = torch.empty((), dtype=dtype).element_size()
    per_row = (8 * arch.hidden_size + 3 * max(arch.ffn_hidden_size, arch.moe_ffn_hidden_size or 0)) \
        * element // tensor_parallel + arch.padded_vocab_size // tensor_parallel * (element + 4)
    per_bucket_row = 2 * (blocks + 1) * 4 + (context_blocks + 6) * 8
    return 2 * (rows * per_row + sum(DecodeGraphs.bucket_sizes(rows)) * per_bucket_row)


@dataclasses.dataclass
class StaticInputs:
    """One bucket's inputs, in tensors whose addresses stay fixed (a graph reads them where it was recorded)."""

    tokens: torch.Tensor  # [B]
    positions: torch.Tensor  # [B]
    tables: torch.Tensor  # [B, M]: block ids, padded with the scratch block
    counts: torch.Tensor  # [B]: the valid entries of each row's table (0 for a padding row)
    write_blocks: torch.Tensor  # [B]
    write_offsets: torch.Tensor  # [B]
    hidden: torch.Tensor | None = None  # [B, h]: the previous stage's hidden states (a pipeline stage after the first)

    @classmethod
    def empty(cls, rows: int, blocks: int, scratch: int, device, hidden: tuple[int, torch.dtype] | None = None
              ) -> StaticInputs:
        zeros = [torch.zeros(rows, dtype=torch.long, device=device) for _ in range(4)]
        full = torch.full((rows, blocks), scratch, dtype=torch.long, device=device)
        states = None if hidden is None else torch.zeros(rows, hidden[0], dtype=hidden[1], device=device)
        return cls(zeros[0], zeros[1], full, zeros[2], torch.full((rows,), scratch, dtype=torch.long, device=device),
                   zeros[3], states)

    def fill(self, host: dict[str, np.ndarray]) -> None:
        for name, value in host.items():
            target = getattr(self, name)
            target.copy_(staged(value, target.device), non_blocking=True)

    def fill_tables(self, batch, slots: np.ndarray) -> None:
        """Rows 0 .. n - 1 of the bucket's table from ``batch`` (a ``BatchTables``): the tables of ``slots`` [n],
        gathered on the device (past each row's count, stale entries: its mask never reads them)."""
        n = len(slots)
        self.tables[:n].copy_(batch.rows(upload(slots, self.tables.device), self.tables.shape[1]))


def static_inputs(positions: np.ndarray, tables: np.ndarray, table_lengths: np.ndarray, rows: int, blocks: int,
                  block_size: int, scratch: int, table: bool = True) -> dict[str, np.ndarray]:
    """Host arrays of a decode step's bucket: ``positions`` [n] (one token per sequence), sequence i's block table
    the next ``table_lengths[i]`` entries of ``tables``; rows ``n .. rows`` are padding. ``table``: with the
    [rows, blocks] table (without it, the caller fills the bucket's table from the device)."""
    n = len(positions)
    counts, write_blocks, write_offsets, pos = (np.zeros(rows, np.int64), np.full(rows, scratch, np.int64),
                                                np.zeros(rows, np.int64), np.zeros(rows, np.int64))
    pos[:n] = positions
    counts[:n] = table_lengths
    write_blocks[:n] = tables[np.cumsum(table_lengths) - table_lengths + positions // block_size]
    write_offsets[:n] = positions % block_size
    out = {"positions": pos, "counts": counts, "write_blocks": write_blocks, "write_offsets": write_offsets}
    if table:
        out["tables"] = np.full((rows, blocks), scratch, dtype=np.int64)
        out["tables"][:n][np.arange(blocks)[None, :] < table_lengths[:, None]] = tables
    return out


def static_mask(cache, inputs: StaticInputs, window: int | None) -> flex_paged.PagedMask:
    """A bucket's FlexAttention mask, over tensors of its own that ``refill_mask`` rewrites from ``inputs``."""
    start, count = flex_paged.decode_spans(inputs.positions, inputs.counts, cache.block_size, window)
    return flex_paged.PagedMask.build(inputs.tables, start, count, inputs.counts, inputs.positions[:, None],
                                      cache.total_blocks, cache.block_size, window, flex_paged.Q_TILE)


def refill_mask(mask: flex_paged.PagedMask, cache, inputs: StaticInputs, window: int | None) -> None:
    """The step's tables into the bucket's mask (in the graph: device work only)."""
    start, count = flex_paged.decode_spans(inputs.positions, inputs.counts, cache.block_size, window)
    mask.refill(inputs.tables, start, count, inputs.counts)


def static_attend(cache, inputs: StaticInputs, mask: flex_paged.PagedMask):
    """``attend(attention, q, k, v)`` for ``FunctionalGPT.run`` over a bucket: writes each row's key and value,
    then attends over the row's own blocks in place (FlexAttention, ``mask``)."""

    def attend(attention, q, k, v):
        q, k = attention.rotate(q, k, inputs.positions[None])
        attention.store(cache, inputs.write_blocks, inputs.write_offsets, k, v)
        keys, values = cache.flat(attention.layer_index)
        return flex_paged.decode(q, keys, values, mask, attention.softmax_scale)

    return attend


class DecodeGraphs:
    """Runs decode-only steps through static buckets: captured as CUDA graphs when ``capture``, else eagerly.

    A pipeline stage has graphs of its own: after the first it reads the previous stage's hidden states from a
    static input, before the last it gives its hidden states instead of logits (each stage captures its part of
    the step; the exchange between stages stays outside the graphs)."""

    def __init__(self, fast, cache, max_rows: int, max_blocks: int, capture: bool, hidden_size: int = 0,
                 dtype: torch.dtype = torch.float32, window: int | None = None):
        if cache.scratch is None or not cache.group_major:
            raise ValueError("static decode steps need a group-major cache with a scratch block")
        self.fast, self.cache, self.window = fast, cache, window
        self.max_rows, self.max_blocks = bucket(max_rows), max_blocks
        self.capture = capture
        self.device = cache.keys[0].device
        self.buckets: dict[int, tuple] = {}  # rows -> (graph or None, inputs, mask, logits)
        self.pool = None  # the graphs' shared memory pool
        self.hidden = None if fast.first else (hidden_size, dtype)  # a later pipeline stage's input
        for layer in fast.layers:  # inside a capture nothing may come from the host: rotary tables move now
            if layer.attention.rotary is not None:
                layer.attention.rotary.inv_freq = layer.attention.rotary.inv_freq.to(self.device)

    @staticmethod
    def bucket_sizes(max_rows: int) -> list[int]:
        """The buckets of rows for ``max_rows`` sequences at once: 1, 2, 4 .. the power of two at or above it."""
        return [1 << i for i in range(bucket(max_rows).bit_length())]

    def sizes(self) -> list[int]:
        return self.bucket_sizes(self.max_rows)

    def capture_all(self, agree=lambda ok: ok) -> bool:
        """Make every bucket now (captured on CUDA), at start, so that no capture happens under traffic; after each
        bucket ``agree(ok)`` gives the job's verdict (``CachedGPT.prepare``: every rank's, in one
        collective), so that the ranks stop together, before any of them runs another bucket's warm-up, whose
        collectives a stopped rank would never join. Returns whether every bucket was made on every rank."""
        for rows in self.sizes():
            try:
                if rows not in self.buckets:
                    self._make(rows)
                ok = True
            except Exception as err:  # any failure: the server then runs every step eagerly, which always works
                LOG.warning("the decode step of %d rows could not be captured: %s: %s", rows, type(err).__name__, err)
                ok = False
            if not agree(ok):
                return False
        return True

    def run(self, tokens: torch.Tensor, positions: np.ndarray, tables: np.ndarray, table_lengths: np.ndarray,
            rows: torch.Tensor, hidden: torch.Tensor | None = None, batch: tuple | None = None
            ) -> torch.Tensor | None:
        """The logits of packed ``rows`` for a decode step (one token per sequence at ``positions``), or None when
        the step is past the largest bucket (the caller runs it eagerly). A pipeline stage after the first takes
        ``hidden``; one before the last returns the step's hidden states (a copy: the next replay reuses the
        buffer while a send may still read it). ``batch``: (``BatchTables``, each sequence's slot), the device
        copy of the tables, gathered from instead of uploading them."""
        n = len(positions)
        size = bucket(n)
        if size > self.max_rows or int(table_lengths.max()) > self.max_blocks:
            return None
        graph, inputs, mask, logits = self.buckets.get(size) or self._make(size)
        inputs.fill(static_inputs(positions, tables, table_lengths, size, self.max_blocks, self.cache.block_size,
                                  self.cache.scratch, table=batch is None))
        if batch is not None:
            inputs.fill_tables(*batch)
        inputs.tokens[:n].copy_(tokens)
        inputs.tokens[n:].zero_()
        if inputs.hidden is not None:
            inputs.hidden[:n].copy_(hidden)
            inputs.hidden[n:].zero_()
        if graph is None:
            logits = self._forward(inputs, mask)
        else:
            graph.replay()
        return logits.index_select(0, rows) if self.fast.last else logits[:n].clone()

    def _forward(self, inputs: StaticInputs, mask: flex_paged.PagedMask) -> torch.Tensor:
        refill_mask(mask, self.cache, inputs, self.window)
        return self.fast.run(inputs.tokens, inputs.positions, static_attend(self.cache, inputs, mask),
                             hidden=inputs.hidden)

    def _make(self, rows: int) -> tuple:
        inputs = StaticInputs.empty(rows, self.max_blocks, self.cache.scratch, self.device, self.hidden)
        mask = static_mask(self.cache, inputs, self.window)
        if not self.capture:
            entry = (None, inputs, mask, None)
        else:
            # warm up on a side stream (allocations, lazy initialisation, the attention's compilation), then
            # record; the padding inputs only touch the scratch block
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):
                    self._forward(inputs, mask)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            # thread_local: the engine thread captures while the server's other threads may use CUDA
            with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
                logits = self._forward(inputs, mask)
            self.pool = graph.pool()
            entry = (graph, inputs, mask, logits)
            LOG.info("captured the decode step of %d rows as a CUDA graph", rows)
        self.buckets[rows] = entry
        return entry
