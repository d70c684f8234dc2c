"""The paged KV cache and the plan of one packed forward pass over it.

Keys and values live in a pool of fixed-size blocks ([blocks, groups, block_size, head_dim] per layer); a
sequence owns a block table (``blocks.BlockPool`` decides which). A step packs the tokens of every sequence it
advances into one row of N tokens: one token for each decoding sequence and a chunk of each prompt (a whole
prompt, or the next part of a long one, or what follows a cached prefix), so prompts and decodes share one
forward pass. Megatron's layers see an ordinary [1, N] batch; only the attention needs to know where each
token's keys live (``StepContext``).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from triton_backend.transfer import upload


class PagedKVCache:
    """Keys and values of every layer in ``num_blocks`` blocks of ``block_size`` tokens."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, groups: int, head_dim: int, dtype,
                 device, scratch: bool = False, group_major: bool = False):
        # ``scratch``: one more block, never handed to a sequence, where the padding rows of a static-shape step
        # (``model/graphs.py``) write and read; its id is ``num_blocks``.
        # ``group_major``: each layer is stored as [groups, blocks, block_size, head_dim], so that a group's keys
        # are one run of places (``flat``), as FlexAttention pages over them (``model/flex_paged.py``); ``keys``
        # and ``values`` are the same [blocks, groups, ...] views over it either way.
        total = num_blocks + scratch
        shape = (groups, total, block_size, head_dim) if group_major else (total, groups, block_size, head_dim)
        self._keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self._values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.keys = [t.transpose(0, 1) for t in self._keys] if group_major else self._keys
        self.values = [t.transpose(0, 1) for t in self._values] if group_major else self._values
        self.num_blocks, self.block_size = num_blocks, block_size
        self.total_blocks = total
        self.group_major = group_major
        self.scratch = num_blocks if scratch else None

    def flat(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A group-major cache's keys and values of ``layer`` as [1, groups, places, head_dim] (no copy)."""
        k, v = self._keys[layer], self._values[layer]
        return k.view(1, k.shape[0], -1, k.shape[-1]), v.view(1, v.shape[0], -1, v.shape[-1])

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._keys + self._values)


@dataclasses.dataclass
class PromptChunk:
    """Tokens ``start .. start + length`` of the packed step: one sequence's positions ``first ..``."""

    start: int
    length: int
    first: int
    blocks: torch.Tensor | None  # the blocks holding positions 0 .. first + length (None when first == 0)
    flex: object = None  # its ``flex_paged.PagedMask`` (a group-major cache's steps)


@dataclasses.dataclass
class StepContext:
    """Where the N packed tokens of one forward pass write their keys, and which keys each one reads.

    Decode tokens (sequences advancing by one token) read their blocks as (row, block) pairs. The first
    ``span`` pairs are blocks 0 .. span-1 of the pool, read in place as one view; each belongs to the decode row
    ``pair_rows[i]`` (a block nobody decoding holds is masked out). A block read by a second row (a shared
    prefix) is an extra pair whose block is gathered (``extra_blocks``). ``valid`` marks the key places each
    pair may see. Prompt chunks attend causally to their own sequence (``prompts``).
    """

    cache: PagedKVCache
    positions: torch.Tensor  # [1, N]
    write_blocks: torch.Tensor  # [N]
    write_offsets: torch.Tensor  # [N]
    decode_index: torch.Tensor | None  # [n]: packed index of each decode token
    span: int
    pair_rows: torch.Tensor | None  # [span + extra]: decode row of each pair
    extra_blocks: torch.Tensor | None  # [extra]
    valid: torch.Tensor | None  # [span + extra, block_size]
    prompts: list[PromptChunk]
    bias: torch.Tensor | None = None  # [span + extra, 1, 1, block_size]: 0 where ``valid``, else -inf
    # The decode rows' own tables on the host, for the CPU kernel (``model/decode_kernel.py``), which reads each
    # row's blocks itself: row i's block ids start at ``tables[table_starts[i]]``, it sees ``lengths[i]`` keys.
    # When a step is planned for the kernel only (``plan(pairs=False)``), the pair fields above stay unset.
    tables: np.ndarray | None = None
    table_starts: np.ndarray | None = None  # [n]
    lengths: np.ndarray | None = None  # [n]
    rotary: object = None  # the step's rotary angles, made by its first layer for all (``attention.Rotary``)
    # ``write_blocks`` and ``write_offsets`` on the host, for the CPU kernel's store (planned with ``pairs=False``)
    host_writes: tuple[np.ndarray, np.ndarray] | None = None
    flex: object = None  # the decode rows' ``flex_paged.PagedMask`` (a group-major cache's steps)


# Read in place while the pool's used range is at most this many times the blocks the decodes read (plus a
# margin): past it, gathering the blocks is cheaper than scanning the range.
SPAN_SLACK = 2


def plan(cache: PagedKVCache, positions: torch.Tensor, lengths, tables, table_lengths,
         pairs: bool = True, window: int | None = None, host_positions: np.ndarray | None = None,
         batch: tuple | None = None) -> StepContext:
    """The step for packed tokens at ``positions`` ([N]), in segments of ``lengths`` (one per sequence, in
    packed order); sequence i's block table is the next ``table_lengths[i]`` entries of ``tables``. A segment of
    one token is a decode (it may also be a one-token prompt); a longer one a prompt chunk. Raises
    ``ValueError`` on a malformed step. Vectorised with numpy: at 64 rows a loop over tokens and blocks cost
    more than the attention it plans. ``pairs``: plan the decodes' (row, block) pairs for the torch attention
    (not needed where the CPU kernel reads the tables). ``window``: a decode sees only itself and the ``window``
    keys before it (sliding-window attention; the pairs then mask the older ones). ``host_positions``: the
    positions as a numpy array (else they are read back from ``positions``' device). ``batch``: the
    ``tables.BatchTables`` that holds these tables on the device and each sequence's slot in it, which
    FlexAttention's masks are gathered from (else the tables are uploaded)."""
    bs, device = cache.block_size, positions.device
    pos = (positions.cpu().numpy() if host_positions is None else host_positions).astype(np.int64)
    lengths, tables, table_lengths = (np.asarray(x, dtype=np.int64).reshape(-1)
                                      for x in (lengths, tables, table_lengths))
    if lengths.sum() != len(pos) or len(table_lengths) != len(lengths) or table_lengths.sum() != len(tables) \
            or (lengths < 1).any():
        raise ValueError("a step's segments do not cover its tokens")
    seg = np.repeat(np.arange(len(lengths)), lengths)  # segment of each token
    starts = np.cumsum(lengths) - lengths
    first = pos[starts]
    if (pos - first[seg] != np.arange(len(pos)) - starts[seg]).any():
        raise ValueError("a segment's tokens must be consecutive positions")
    table_starts = np.cumsum(table_lengths) - table_lengths
    if (pos // bs >= table_lengths[seg]).any() or (tables < 0).any() or (tables >= cache.num_blocks).any():
        raise ValueError("a segment's block table does not hold its positions")
    write_blocks, offsets = tables[table_starts[seg] + pos // bs], pos % bs  # new contiguous int64 arrays
    flex = cache.group_major  # FlexAttention reads every token's keys from the pool (model/flex_paged.py)
    prompts = []
    for i in np.flatnonzero(lengths > 1).tolist():
        used = tables[table_starts[i]:table_starts[i] + -(-(first[i] + lengths[i]) // bs)]
        prompts.append(PromptChunk(int(starts[i]), int(lengths[i]), int(first[i]),
                                   upload(used, device) if first[i] else None))  # pragma: no mutate
        if flex:
            on_device = None if batch is None else batch[0].device[batch[1][i], :len(used)][None]
            prompts[-1].flex = _flex_chunk(cache, used, int(first[i]), int(lengths[i]), device, window, on_device)
    step = StepContext(cache, positions[None], upload(write_blocks, device),  # pragma: no mutate
                       upload(offsets, device), None, 0, None, None, None, prompts)  # pragma: no mutate
    if not pairs:
        step.host_writes = (write_blocks, offsets)
    decodes = np.flatnonzero(lengths == 1)
    if len(decodes):
        # contiguous int64 once per step: the kernel reads them by address in every layer
        step.tables, step.table_starts, step.lengths = (np.ascontiguousarray(x, dtype=np.int64) for x in (
            tables, table_starts[decodes], first[decodes] + 1))
        if flex:
            step.decode_index = upload(starts[decodes], device)  # pragma: no mutate
            step.flex = _flex_decodes(cache, tables, table_starts[decodes], table_lengths[decodes], first[decodes],
                                      device, window, None if batch is None else (batch[0], batch[1][decodes]))
        elif pairs:
            _plan_decodes(step, starts[decodes], first[decodes], table_starts[decodes], tables, bs, device, window)
        else:
            step.decode_index = upload(starts[decodes], device)  # pragma: no mutate
    return step


def _plan_decodes(step: StepContext, index, position, table_start, tables, bs: int, device,
                  window: int | None = None) -> None:
    """Each decode row reads blocks 0 .. position // bs of its table: the first reader of a block reads it in
    place (pairs 0 .. span-1 are the pool's blocks in order), any later one gets an extra, gathered pair."""
    counts = position // bs + 1
    pair_row = np.repeat(np.arange(len(index)), counts)
    j = np.arange(len(pair_row)) - np.repeat(np.cumsum(counts) - counts, counts)  # block number in its table
    pair_block = tables[np.repeat(table_start, counts) + j]
    pair_seen = np.minimum(bs, position[pair_row] + 1 - j * bs)  # key places the row may see in that block
    blocks, first_reader = np.unique(pair_block, return_index=True)
    primary = np.zeros(len(pair_row), dtype=bool)
    primary[first_reader] = True
    span = int(blocks[-1]) + 1
    if span > SPAN_SLACK * len(blocks) + 64:  # the used ids are scattered: gather every pair instead
        primary[:], span = False, 0
    rows = np.zeros(span, dtype=np.int64)
    seen = np.zeros_like(rows)
    rows[pair_block[primary]] = pair_row[primary]
    seen[pair_block[primary]] = pair_seen[primary]
    extra = ~primary
    step.decode_index = upload(index, device)  # pragma: no mutate
    step.span = span
    step.pair_rows = upload(np.concatenate([rows, pair_row[extra]]), device)  # pragma: no mutate
    step.extra_blocks = upload(pair_block[extra], device) if extra.any() else None  # pragma: no mutate
    seen_all = upload(np.concatenate([seen, pair_seen[extra]]), device)  # pragma: no mutate
    step.valid = torch.arange(bs, device=device)[None, :] < seen_all[:, None]  # pragma: no mutate
    if window is not None:  # and not before the window: key position >= the row's position - window
        lowest = position[pair_row] - window - j * bs  # first place in the pair's block the row may see
        lowest_all = upload(np.concatenate([np.zeros(span, dtype=np.int64), lowest[extra]]), device)
        primary_rows = pair_block[primary]
        lowest_all[upload(primary_rows, device)] = upload(lowest[primary], device)
        step.valid &= torch.arange(bs, device=device)[None, :] >= lowest_all[:, None]
    # added to the scores: -inf where a pair may not look (a block nobody decoding holds: everywhere)
    bias = torch.zeros(step.valid.shape, device=device)  # pragma: no mutate
    step.bias = bias.masked_fill_(~step.valid, float("-inf"))[:, None, None]


def _flex_decodes(cache: PagedKVCache, tables, table_start, table_length, position, device, window, batch=None):
    """The decode rows' mask for FlexAttention, rows padded to a power of two (the compiled shapes). ``batch``:
    (``BatchTables``, the rows' slots), whose device copy the rows' tables are gathered from (padding rows take
    slot 0's, which their count of 0 masks out)."""
    from triton_backend.model import flex_paged

    n, rows = len(position), flex_paged.padded(len(position))
    width = int(table_length.max())
    counts, pos, slots = np.zeros(rows, np.int64), np.zeros(rows, np.int64), np.zeros(rows, np.int64)
    counts[:n], pos[:n] = table_length, position
    if batch is None:
        table = np.zeros((rows, width), dtype=np.int64)
        entry = np.arange(table_length.sum()) - np.repeat(np.cumsum(table_length) - table_length, table_length)
        table[:n][np.arange(width)[None, :] < table_length[:, None]] = tables[
            np.repeat(table_start, table_length) + entry]
    else:
        slots[:n] = batch[1]
    small = upload(np.stack([counts, pos, slots]), device)  # pragma: no mutate
    counts_t, pos_t = small[0], small[1]
    table_t = upload(table, device) if batch is None else batch[0].rows(small[2], width)
    start, count = flex_paged.decode_spans(pos_t, counts_t, cache.block_size, window)
    return flex_paged.PagedMask.build(table_t, start, count, counts_t, pos_t[:, None], cache.total_blocks,
                                      cache.block_size, window, flex_paged.Q_TILE)


def _flex_chunk(cache: PagedKVCache, table: np.ndarray, first: int, length: int, device, window,
                on_device: torch.Tensor | None = None):
    """A prompt chunk's mask for FlexAttention, its queries padded to a power of two (the compiled shapes).
    ``on_device``: the same table already on the device ([1, blocks])."""
    from triton_backend.model import flex_paged

    padded_length = flex_paged.padded(length, flex_paged.MIN_CHUNK)
    start, count = flex_paged.chunk_spans(first, length, padded_length, cache.block_size, window)
    start_t, count_t = (upload(x, device) for x in (start, count))  # pragma: no mutate
    table_t = upload(np.ascontiguousarray(table[None]), device) if on_device is None else on_device
    query_pos = first + torch.arange(padded_length, device=device)[None]  # pragma: no mutate
    return flex_paged.PagedMask.build(table_t, start_t, count_t, upload(np.array([len(table)]), device),
                                      query_pos, cache.total_blocks, cache.block_size, window, flex_paged.Q_TILE)
