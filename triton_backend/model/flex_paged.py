"""Paged attention through torch's FlexAttention: each row reads its own blocks in place, through its block table.

This is the attention of the CUDA path, for decode rows and prompt chunks alike, eager steps and CUDA graphs
alike. The cache is laid out group-major for it (``PagedKVCache(group_major=True)``): one layer's keys are then a
single [1, groups, blocks * block_size, head_dim] tensor, the "one long sequence" FlexAttention pages over. A
step's ``BlockMask`` lists, for each row (and each 128-query tile of a prompt chunk), the physical blocks it may
read (``kv_indices``, in FlexAttention's sparse-block units, which are the cache's blocks), so the kernel loads
those blocks and no others: no gathered or padded copy of the cache, and keys are not expanded per query head
(``enable_gqa``: the decoding kernel serves a group's heads from one read of its keys).

The mask function says, for a key place, whether the row owns its block (``owners``: the block's number in the
row's table, -1 where it is not the row's) and whether the key's position is at or before the query's (and
within the window, for sliding-window models). The block list makes it fast; the mask function alone makes it
right, which is what lets the CPU tests run this same code eagerly (torch's unfused reference evaluates the
mask over the whole pool) and compare it with the other paths.

Why FlexAttention (docs/architecture.md, "Attention on CUDA", compares it with FlashInfer and flash-attn's
block-table kernels): it ships with torch (nothing more to install or pin), generates its kernels with Triton
for any CUDA GPU Triton supports, runs on CPU for the tests, and is captured by CUDA graphs once compiled. On
CUDA it is compiled with ``torch.compile`` (``compiled``) at fixed shapes: decode rows are padded to a power of
two (one compilation per bucket, made when the graphs are captured at start), prompt chunks to a power of two of
at least ``MIN_CHUNK`` queries (one compilation per length up to the prefill budget, made at start by
``warm_up``).
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention

Q_TILE = 128  # queries per sparse block of a prompt chunk (FlexAttention's default tile)
MIN_CHUNK = Q_TILE  # a prompt chunk's queries are padded to a power of two at least this long


def padded(n: int, least: int = 1) -> int:
    """The power of two at or above ``n`` and ``least``."""
    return max(least, 1 << max(0, n - 1).bit_length())


def kernel(device_type: str, decode: bool = True):
    """FlexAttention for ``device_type``: compiled on CUDA (see ``compiled``); elsewhere its unfused reference,
    which the tests run (CPU serving decodes with ``decode_kernel``)."""
    return compiled(decode) if device_type == "cuda" else _decode_attention


@functools.cache
def compiled(decode: bool = True):
    """FlexAttention compiled at fixed shapes, one compilation per padded shape: decode rows in buckets of powers of
    two (FlexAttention's decoding kernel, which splits the keys across blocks, needs the batch fixed), prompt
    chunks padded to powers of two of at least one tile. Dynamic shapes were tried for the chunks: Inductor's
    CPU code for them does not build (torch 2.13), so the tests could not hold them to the reference."""
    import torch._dynamo

    config = torch._dynamo.config
    limit = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"  # its older name
    setattr(config, limit, max(getattr(config, limit), 64))
    # each kind through its own function: torch.compile keeps its compilations per function
    return torch.compile(_decode_attention if decode else _chunk_attention, dynamic=False, fullgraph=True)


def _decode_attention(q, keys, values, block_mask, scale, enable_gqa):
    return flex_attention(q, keys, values, block_mask=block_mask, scale=scale, enable_gqa=enable_gqa)


def _chunk_attention(q, keys, values, block_mask, scale, enable_gqa):
    return flex_attention(q, keys, values, block_mask=block_mask, scale=scale, enable_gqa=enable_gqa)


def owners(tables: torch.Tensor, counts: torch.Tensor, total_blocks: int,
           out: torch.Tensor | None = None) -> torch.Tensor:
    """[rows, total_blocks + 1] int32: for each row, every block's number in the row's table (``tables`` [rows, m],
    the first ``counts`` entries valid), -1 for blocks it does not hold; the last column takes the padding. A
    block shared by several rows (a cached prefix) sits at the same number in each of their tables."""
    rows, m = tables.shape
    number = torch.arange(m, device=tables.device)
    live = number[None, :] < counts[:, None]
    if out is None:
        out = torch.empty(rows, total_blocks + 1, dtype=torch.int32, device=tables.device)
    out.fill_(-1)
    out.scatter_(1, torch.where(live, tables, total_blocks), number.to(torch.int32).expand(rows, m).contiguous())
    return out


def block_lists(tables: torch.Tensor, starts: torch.Tensor, counts: torch.Tensor, width: int,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """``kv_indices`` [rows, 1, tiles, width] int32: tile t of row r reads entries ``starts[r, t] ..`` of its table
    (``tables`` [rows, m]); entries past the tile's count are never read (any block id does)."""
    rows, m = tables.shape
    tiles = starts.shape[1]
    number = torch.arange(m, device=tables.device)
    picked = tables[:, None, :].expand(rows, tiles, m).gather(2, (starts[..., None] + number).clamp_(max=m - 1))
    if out is None:
        out = torch.zeros(rows, 1, tiles, width, dtype=torch.int32, device=tables.device)
    out[:, 0, :, :m].copy_(picked)
    return out


def mask_function(owner: torch.Tensor, query_pos: torch.Tensor, block_size: int, window: int | None):
    """FlexAttention's ``mask_mod``: row ``b``'s query ``q`` (at ``query_pos[b, q]``) sees key place ``kv`` of the
    pool when the row holds its block and the key's position is at or before the query's (and not more than
    ``window`` before it)."""

    def visible(b, h, q, kv):
        number = owner[b, kv // block_size]
        key_pos = number * block_size + kv % block_size
        seen = (number >= 0) & (key_pos <= query_pos[b, q])
        if window is not None:
            seen = seen & (key_pos >= query_pos[b, q] - window)
        return seen

    return visible


@dataclasses.dataclass
class PagedMask:
    """One attention call's ``BlockMask`` and the tensors it was made from (a CUDA graph refills them in place)."""

    mask: BlockMask
    owner: torch.Tensor
    kv_indices: torch.Tensor
    kv_counts: torch.Tensor
    query_pos: torch.Tensor

    @classmethod
    def build(cls, tables: torch.Tensor, starts: torch.Tensor, counts: torch.Tensor, table_counts: torch.Tensor,
              query_pos: torch.Tensor, total_blocks: int, block_size: int, window: int | None,
              q_tile: int) -> PagedMask:
        """Rows with block tables ``tables`` [rows, m] (``table_counts`` valid entries each); tile t of row r reads
        ``counts[r, t]`` blocks from entry ``starts[r, t]``; ``query_pos`` [rows, queries]."""
        width = max(total_blocks, tables.shape[1])
        owner = owners(tables, table_counts, total_blocks)
        kv_indices = block_lists(tables, starts, counts, width)
        kv_counts = counts.to(torch.int32)[:, None, :].contiguous()
        mask = BlockMask.from_kv_blocks(kv_counts, kv_indices, BLOCK_SIZE=(q_tile, block_size),
                                        mask_mod=mask_function(owner, query_pos, block_size, window),
                                        seq_lengths=(query_pos.shape[1], width * block_size), compute_q_blocks=False)
        return cls(mask, owner, kv_indices, kv_counts, query_pos)

    def refill(self, tables: torch.Tensor, starts: torch.Tensor, counts: torch.Tensor,
               table_counts: torch.Tensor) -> None:
        """New tables and counts for the same shapes, written into this mask's own tensors (a graph's inputs)."""
        owners(tables, table_counts, self.owner.shape[1] - 1, out=self.owner)
        block_lists(tables, starts, counts, self.kv_indices.shape[-1], out=self.kv_indices)
        self.kv_counts.copy_(counts.to(torch.int32)[:, None, :])


def decode_spans(positions: torch.Tensor, table_counts: torch.Tensor, block_size: int,
                 window: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(start, count) [rows, 1]: the table entries a decode row at ``positions`` [rows] reads, its window's first
    block (0 without one) through the block holding its position; none for a padding row (no table)."""
    last = positions // block_size
    start = torch.zeros_like(last) if window is None else (positions - window).clamp(min=0) // block_size
    return start[:, None], ((last - start + 1) * (table_counts > 0))[:, None]


def chunk_spans(first: int, length: int, padded_length: int, block_size: int,
                window: int | None) -> tuple[np.ndarray, np.ndarray]:
    """(start, count) [1, tiles]: the table entries each 128-query tile of a prompt chunk at positions ``first ..
    first + length - 1`` reads (padding queries past the chunk read what its last query reads)."""
    tiles = -(-padded_length // Q_TILE)
    last = first + length - 1
    low = (first + np.arange(tiles) * Q_TILE).clip(max=last)  # a tile of padding only: as the last query
    high = np.minimum(low + Q_TILE - 1, last)
    start = np.zeros(tiles, np.int64) if window is None else np.maximum(low - window, 0) // block_size
    return start[None], (high // block_size - start + 1)[None]


def attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: BlockMask,
           scale: float | None) -> torch.Tensor:
    """``q`` [rows, heads, queries, d] over the group-major pool ``keys``/``values`` [1, groups, places, d]."""
    return kernel(q.device.type, q.shape[2] == 1)(q, keys, values, mask, scale, keys.shape[1] != q.shape[1])


def _padded_to(q: torch.Tensor, n: int) -> torch.Tensor:
    """``q`` [m, heads, d] with zero rows up to ``n`` (the mask's compiled shape)."""
    return q if len(q) == n else torch.cat([q, q.new_zeros(n - len(q), *q.shape[1:])])


def decode(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: PagedMask,
           scale: float | None) -> torch.Tensor:
    """Decode rows ``q`` [n, heads, d] (the mask's rows may be more: padding) -> [n, heads * d]."""
    n = len(q)
    out = attend(_padded_to(q, mask.kv_counts.shape[0])[:, :, None], keys, values, mask.mask, scale)
    return out[:n, :, 0].reshape(n, -1)


def chunk(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: PagedMask,
          scale: float | None) -> torch.Tensor:
    """A prompt chunk's queries ``q`` [L, heads, d] (padded to the mask's length) -> [L, heads * d]."""
    length = len(q)
    q = _padded_to(q, mask.query_pos.shape[1]).transpose(0, 1)[None]
    return attend(q, keys, values, mask.mask, scale)[0, :, :length].transpose(0, 1).reshape(length, -1)


def warm_up(cache, heads: int, longest: int, window: int | None = None) -> None:
    """Compile the prompt chunks' kernel now, at start, for every padded length up to ``longest`` queries, on
    chunks over the first blocks of ``cache`` (read, not written), for ``heads`` query heads."""
    keys, values = cache.flat(0)
    device = keys.device
    length = MIN_CHUNK
    while length <= padded(longest, MIN_CHUNK) and -(-length // cache.block_size) <= cache.num_blocks:
        blocks = -(-length // cache.block_size)
        start, count = chunk_spans(0, length, length, cache.block_size, window)
        mask = PagedMask.build(torch.arange(blocks, device=device)[None], torch.from_numpy(start).to(device),
                               torch.from_numpy(count).to(device), torch.tensor([blocks], device=device),
                               torch.arange(length, device=device)[None], cache.total_blocks, cache.block_size,
                               window, Q_TILE)
        chunk(keys.new_zeros(length, heads, keys.shape[-1]), keys, values, mask, None)
        length *= 2
