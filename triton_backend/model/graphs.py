"""Decode steps in static shapes, replayed as CUDA graphs on CUDA.

On a GPU an eager decode step of a small model is launch overhead: a few hundred kernels of microseconds each,
each launched from Python. A CUDA graph records the kernels of one step once and replays them with one call.
A graph needs fixed shapes and fixed tensor addresses, so a decode-only step (every sequence advancing by one
token) is padded to a bucket: rows to the next power of two, block tables to the next power of two of blocks.
Each bucket is captured the first time a step needs it (lazily: most servers see a few buckets) and all share one
memory pool. Steps with a prompt chunk, and buckets past the largest, run the eager path.

The static step is ``FunctionalGPT.run`` with an attention that gathers each row's blocks (padded with a scratch
block the cache keeps for this) into one [rows, groups, blocks * block_size, head_dim] view and runs one SDPA
with a mask of the keys each row may see: fixed shapes, unlike the eager decode's (row, block) pairs, whose
count changes every step. Padding rows read and write only the scratch block.

Why not ``torch.compile(mode="reduce-overhead")``: it needs the same static shapes and a forward dynamo traces
whole; this records the eager kernels as they are (the tensor-parallel all-reduces included: NCCL collectives
can be captured), with no compile step at start. On CPU there is nothing to replay: ``capture=False`` runs the
same static step eagerly, which is how the tests on this machine hold it to the eager path's tokens.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import torch
import torch.nn.functional as F

LOG = logging.getLogger(__name__)


def bucket(n: int) -> int:
    """The power of two at or above ``n`` (at least 1)."""
    return 1 << max(0, n - 1).bit_length()


@dataclasses.dataclass
class StaticInputs:
    """One bucket's inputs, in tensors whose addresses stay fixed (a graph reads them where it was recorded)."""

    tokens: torch.Tensor  # [B]
    positions: torch.Tensor  # [B]
    tables: torch.Tensor  # [B, M]: block ids, padded with the scratch block
    seen: torch.Tensor  # [B]: keys each row may see (position + 1)
    write_blocks: torch.Tensor  # [B]
    write_offsets: torch.Tensor  # [B]
    hidden: torch.Tensor | None = None  # [B, h]: the previous stage's hidden states (a pipeline stage after the first)

    @classmethod
    def empty(cls, rows: int, blocks: int, scratch: int, device, hidden: tuple[int, torch.dtype] | None = None
              ) -> StaticInputs:
        zeros = [torch.zeros(rows, dtype=torch.long, device=device) for _ in range(3)]
        full = torch.full((rows, blocks), scratch, dtype=torch.long, device=device)
        states = None if hidden is None else torch.zeros(rows, hidden[0], dtype=hidden[1], device=device)
        return cls(zeros[0], zeros[1], full, torch.ones(rows, dtype=torch.long, device=device),
                   torch.full((rows,), scratch, dtype=torch.long, device=device), zeros[2], states)

    def fill(self, host: dict[str, np.ndarray]) -> None:
        for name, value in host.items():
            getattr(self, name).copy_(torch.from_numpy(value), non_blocking=True)


def static_inputs(positions: np.ndarray, tables: np.ndarray, table_lengths: np.ndarray, rows: int, blocks: int,
                  block_size: int, scratch: int) -> dict[str, np.ndarray]:
    """Host arrays of a decode step's bucket: ``positions`` [n] (one token per sequence), sequence i's block table
    the next ``table_lengths[i]`` entries of ``tables``; rows ``n .. rows`` are padding."""
    n = len(positions)
    table = np.full((rows, blocks), scratch, dtype=np.int64)
    table[:n][np.arange(blocks)[None, :] < table_lengths[:, None]] = tables
    seen, write_blocks, write_offsets, pos = (np.ones(rows, dtype=np.int64), np.full(rows, scratch, np.int64),
                                              np.zeros(rows, np.int64), np.zeros(rows, np.int64))
    pos[:n] = positions
    seen[:n] = positions + 1
    write_blocks[:n] = table[np.arange(n), positions // block_size]
    write_offsets[:n] = positions % block_size
    return {"positions": pos, "tables": table, "seen": seen, "write_blocks": write_blocks,
            "write_offsets": write_offsets}


def static_attend(cache, inputs: StaticInputs, mask: torch.Tensor):
    """``attend(attention, q, k, v)`` for ``FunctionalGPT.run`` over a bucket: writes each row's key and value,
    then attends over its gathered blocks. ``mask`` [B, 1, 1, M * block_size]: the keys each row may see."""

    def attend(attention, q, k, v):
        q, k = attention.rotate(q, k, inputs.positions[None])
        keys, values = attention.store(cache, inputs.write_blocks, inputs.write_offsets, k, v)
        rows, heads, d = q.shape
        _, groups, block_size, _ = keys.shape
        span = inputs.tables.shape[1] * block_size
        ks, vs = (t[inputs.tables].transpose(1, 2).reshape(rows, groups, span, d) for t in (keys, values))
        # [B, groups, heads per group, d]: each group's heads are SDPA's queries over that group's keys
        out = F.scaled_dot_product_attention(q.view(rows, groups, heads // groups, d), ks, vs, attn_mask=mask,
                                             scale=attention.softmax_scale)
        return out.reshape(rows, heads * d)

    return attend


class DecodeGraphs:
    """Runs decode-only steps through static buckets: captured as CUDA graphs when ``capture``, else eagerly.

    A pipeline stage has graphs of its own: after the first it reads the previous stage's hidden states from a
    static input, before the last it gives its hidden states instead of logits (each stage captures its part of
    the step; the exchange between stages stays outside the graphs)."""

    def __init__(self, fast, cache, max_rows: int, max_blocks: int, capture: bool, hidden_size: int = 0,
                 dtype: torch.dtype = torch.float32):
        if cache.scratch is None:
            raise ValueError("static decode steps need a cache with a scratch block")
        self.fast, self.cache = fast, cache
        self.max_rows, self.max_blocks = bucket(max_rows), bucket(max_blocks)
        self.capture = capture
        self.device = cache.keys[0].device
        self.buckets: dict[tuple[int, int], tuple] = {}  # (rows, blocks) -> (graph or None, inputs, logits)
        self.pool = None  # the graphs' shared memory pool
        self.hidden = None if fast.first else (hidden_size, dtype)  # a later pipeline stage's input
        for layer in fast.layers:  # inside a capture nothing may come from the host: rotary tables move now
            if layer.attention.rotary is not None:
                layer.attention.rotary.inv_freq = layer.attention.rotary.inv_freq.to(self.device)

    def run(self, tokens: torch.Tensor, positions: np.ndarray, tables: np.ndarray, table_lengths: np.ndarray,
            rows: torch.Tensor, hidden: torch.Tensor | None = None) -> torch.Tensor | None:
        """The logits of packed ``rows`` for a decode step (one token per sequence at ``positions``), or None when
        the step is past the largest bucket (the caller runs it eagerly). A pipeline stage after the first takes
        ``hidden``; one before the last returns the step's hidden states (a copy: the next replay reuses the
        buffer while a send may still read it)."""
        n = len(positions)
        size = (bucket(n), bucket(int(table_lengths.max())))
        if size[0] > self.max_rows or size[1] > self.max_blocks:
            return None
        entry = self.buckets.get(size) or self._make(*size)
        graph, inputs, logits = entry
        inputs.fill(static_inputs(positions, tables, table_lengths, *size, self.cache.block_size,
                                  self.cache.scratch))
        inputs.tokens[:n].copy_(tokens)
        inputs.tokens[n:].zero_()
        if inputs.hidden is not None:
            inputs.hidden[:n].copy_(hidden)
            inputs.hidden[n:].zero_()
        if graph is None:
            logits = self._forward(inputs)
        else:
            graph.replay()
        return logits.index_select(0, rows) if self.fast.last else logits[:n].clone()

    def _forward(self, inputs: StaticInputs) -> torch.Tensor:
        span = inputs.tables.shape[1] * self.cache.block_size
        mask = (torch.arange(span, device=self.device)[None, :] < inputs.seen[:, None])[:, None, None, :]
        return self.fast.run(inputs.tokens, inputs.positions, static_attend(self.cache, inputs, mask),
                             hidden=inputs.hidden)

    def _make(self, rows: int, blocks: int) -> tuple:
        inputs = StaticInputs.empty(rows, blocks, self.cache.scratch, self.device, self.hidden)
        if not self.capture:
            entry = (None, inputs, None)
        else:
            # warm up on a side stream (allocations, lazy initialisation), then record; the padding inputs only
            # touch the scratch block
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):
                    self._forward(inputs)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            # thread_local: the engine thread captures while the server's other threads may use CUDA
            with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
                logits = self._forward(inputs)
            self.pool = graph.pool()
            entry = (graph, inputs, logits)
            LOG.info("captured the decode step of %d rows over %d blocks as a CUDA graph", rows, blocks)
        self.buckets[(rows, blocks)] = entry
        return entry
