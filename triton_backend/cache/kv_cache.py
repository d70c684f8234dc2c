"""The KV cache and the plan of one packed forward pass over it.

A step packs the tokens of every sequence it advances into one row of N tokens: one token for each running
sequence (decode) and the whole prompt of each admitted one (prefill), so prompts and decodes share one
forward pass instead of two. Megatron's layers see an ordinary [1, N] batch; only the attention needs to know
which token belongs to which sequence (``StepContext``).
"""

from __future__ import annotations

import dataclasses

import torch


class KVCache:
    """Keys and values of every layer for ``max_slots`` sequences of up to ``max_len`` tokens.

    The engine names sequences by slot; the cache keeps each slot in a physical row and moves the sequences of
    a step's decode part into rows 0..b-1 (``place``). Attention then reads ``keys[:b, :, :span]`` as a view:
    gathering the rows instead copies the whole live cache every layer, the largest cost of a CPU step at 64
    rows (it is memory-bound) and twice the memory traffic of attention on a GPU. A
    sequence that retires from the middle costs one row swap, once. Every tensor-parallel rank sees the same
    steps, so every rank places the same way.
    """

    def __init__(self, num_layers: int, max_slots: int, max_len: int, groups: int, head_dim: int, dtype, device):
        shape = (max_slots, groups, max_len, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.max_slots, self.max_len = max_slots, max_len
        self.row_of = list(range(max_slots))  # slot -> physical row
        self.slot_at = list(range(max_slots))  # physical row -> slot
        self.length = [0] * max_slots  # tokens written in each physical row (how much a swap copies)
        self.swaps = 0

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    def place(self, slots: list[int], ends: list[int], compact: bool) -> list[int]:
        """Physical rows of ``slots``, whose sequences end at ``ends`` after this step; ``compact`` first moves
        them into rows 0..b-1."""
        if compact:
            b = len(slots)
            taken = {self.row_of[s] for s in slots}
            holes = (r for r in range(b) if r not in taken)  # rows < b that hold a slot not in ``slots``
            for s in slots:
                if self.row_of[s] >= b:
                    self._swap(self.row_of[s], next(holes))
        rows = [self.row_of[s] for s in slots]
        for row, end in zip(rows, ends):
            self.length[row] = end
        return rows

    def _swap(self, a: int, b: int) -> None:
        n = max(self.length[a], self.length[b])
        if n:
            for t in self.keys + self.values:
                held = t[a, :, :n].clone()
                t[a, :, :n] = t[b, :, :n]
                t[b, :, :n] = held
        sa, sb = self.slot_at[a], self.slot_at[b]
        self.row_of[sa], self.row_of[sb] = b, a
        self.slot_at[a], self.slot_at[b] = sb, sa
        self.length[a], self.length[b] = self.length[b], self.length[a]
        self.swaps += 1


@dataclasses.dataclass
class StepContext:
    """Where the N packed tokens of one forward pass live in the cache (tokens in the order they run).

    The first ``singles`` tokens each continue a cached sequence (a decode, or a one-token prompt) and sit in
    cache rows 0..singles-1 in that order, the longest ending at ``span``. The rest are whole prompts, one after
    another, each from position 0; with several, ``prompt_index``/``prompt_valid`` pad them into a batch.
    """

    cache: KVCache
    rows: torch.Tensor  # [N] cache row of each token
    positions: torch.Tensor  # [1, N] position of each token
    singles: int
    span: int
    prompt_index: torch.Tensor | None = None  # [prompts, longest]: token (within the prompt part) at each place
    prompt_valid: torch.Tensor | None = None  # [prompts, longest]: places that hold a token, not padding


def plan(cache: KVCache, slots: torch.Tensor, positions: torch.Tensor) -> tuple[StepContext, torch.Tensor | None]:
    """The step for packed tokens in ``slots[i]`` at ``positions[i]`` ([N] each), and the order to run them in
    (singles by cache row, then prompts; None when that is their order already). A slot's tokens are
    consecutive; several tokens of one slot are a prompt from position 0."""
    device = positions.device
    slot_list, position_list = slots.tolist(), positions.tolist()
    segments: list[list[int]] = []  # [slot, start, length]
    for i, slot in enumerate(slot_list):
        if segments and segments[-1][0] == slot:
            segments[-1][2] += 1
        else:
            segments.append([slot, i, 1])
    if len({s for s, _, _ in segments}) != len(segments):
        raise ValueError("a step holds a slot's tokens in more than one place")
    singles = [(s, i) for s, i, n in segments if n == 1]
    prompts = [(s, i, n) for s, i, n in segments if n > 1]
    if any(position_list[i:i + n] != list(range(n)) for _, i, n in prompts):
        raise ValueError("a prompt must run whole, from position 0")
    ends = [position_list[i] + 1 for _, i in singles]
    single_rows = cache.place([s for s, _ in singles], ends, compact=True)
    prompt_rows = cache.place([s for s, _, _ in prompts], [n for _, _, n in prompts], compact=False)
    order = [i for _, i in sorted(zip(single_rows, (i for _, i in singles)))]
    order += [j for _, i, n in prompts for j in range(i, i + n)]
    run = None if order == list(range(len(order))) else torch.tensor(order, device=device)
    rows = list(range(len(singles))) + [r for r, (_, _, n) in zip(prompt_rows, prompts) for _ in range(n)]
    step = StepContext(cache, torch.tensor(rows, device=device), (positions if run is None else positions[run])[None],
                       len(singles), max(ends, default=0))
    if len(prompts) > 1:
        longest = max(n for _, _, n in prompts)
        index, valid, offset = [], [], 0
        for _, _, n in prompts:
            index.append([offset + min(t, n - 1) for t in range(longest)])
            valid.append([t < n for t in range(longest)])
            offset += n
        step.prompt_index = torch.tensor(index, device=device)
        step.prompt_valid = torch.tensor(valid, device=device)
    return step, run
