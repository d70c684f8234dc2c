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

import torch


class PagedKVCache:
    """Keys and values of every layer in ``num_blocks`` blocks of ``block_size`` tokens."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, groups: int, head_dim: int, dtype,
                 device):
        shape = (num_blocks, groups, block_size, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.num_blocks, self.block_size = num_blocks, block_size

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)


@dataclasses.dataclass
class PromptChunk:
    """Tokens ``start .. start + length`` of the packed step: one sequence's positions ``first ..``."""

    start: int
    length: int
    first: int
    blocks: torch.Tensor | None  # the blocks holding positions 0 .. first + length (None when first == 0)


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


# Read in place while the pool's used range is at most this many times the blocks the decodes read (plus a
# margin): past it, gathering the blocks is cheaper than scanning the range.
SPAN_SLACK = 2


def plan(cache: PagedKVCache, positions: torch.Tensor, lengths: list[int], tables: list[list[int]]) -> StepContext:
    """The step for packed tokens at ``positions`` ([N]), in segments of ``lengths`` (one per sequence, in
    packed order), sequence i's blocks being ``tables[i]``. A segment of one token is a decode (it may also be
    a one-token prompt); a longer one a prompt chunk. Raises ``ValueError`` on a malformed step."""
    bs, device = cache.block_size, positions.device
    position_list = positions.tolist()
    if sum(lengths) != len(position_list) or len(lengths) != len(tables):
        raise ValueError("a step's segments do not cover its tokens")
    write_blocks, write_offsets = [], []
    decodes: list[tuple[int, int, list[int]]] = []  # packed index, position, blocks
    prompts: list[PromptChunk] = []
    start = 0
    for length, table in zip(lengths, tables):
        first = position_list[start]
        if length < 1 or position_list[start:start + length] != list(range(first, first + length)):
            raise ValueError("a segment's tokens must be consecutive positions")
        if len(table) * bs < first + length or any(not 0 <= b < cache.num_blocks for b in table):
            raise ValueError("a segment's block table does not hold its positions")
        for p in range(first, first + length):
            write_blocks.append(table[p // bs])
            write_offsets.append(p % bs)
        if length == 1:
            decodes.append((start, first, table))
        else:
            used = table[: -(-(first + length) // bs)]
            prompts.append(PromptChunk(start, length, first,
                                       torch.tensor(used, device=device) if first else None))
        start += length
    step = StepContext(cache, positions[None], torch.tensor(write_blocks, device=device),
                       torch.tensor(write_offsets, device=device), None, 0, None, None, None, prompts)
    if decodes:
        _plan_decodes(step, decodes, bs, device)
    return step


def _plan_decodes(step: StepContext, decodes: list[tuple[int, int, list[int]]], bs: int, device) -> None:
    owner: dict[int, tuple[int, int]] = {}  # block -> (decode row, valid places), its first reader
    extra: list[tuple[int, int, int]] = []  # (decode row, block, valid places) of the other readers
    for row, (_, position, table) in enumerate(decodes):
        end = position + 1
        for i, block in enumerate(table[: -(-end // bs)]):
            seen = min(bs, end - i * bs)
            if block in owner:
                extra.append((row, block, seen))
            else:
                owner[block] = (row, seen)
    span = max(owner) + 1
    if span > SPAN_SLACK * len(owner) + 64:  # the used ids are scattered: gather every pair instead
        extra = [(row, block, seen) for block, (row, seen) in owner.items()] + extra
        owner, span = {}, 0
    rows, seen = [0] * span, [0] * span
    for block, (row, n) in owner.items():
        rows[block], seen[block] = row, n
    rows += [r for r, _, _ in extra]
    seen += [n for _, _, n in extra]
    step.decode_index = torch.tensor([i for i, _, _ in decodes], device=device)
    step.span = span
    step.pair_rows = torch.tensor(rows, device=device)
    step.extra_blocks = torch.tensor([b for _, b, _ in extra], device=device) if extra else None
    step.valid = torch.arange(bs, device=device)[None, :] < torch.tensor(seen, device=device)[:, None]
