"""The slot KV cache and the plan of a packed step, as pure functions over small tensors."""

import pytest
import torch

from triton_backend.cache.kv_cache import KVCache, plan


def cache(slots=4, max_len=8, layers=2):
    return KVCache(layers, slots, max_len, groups=1, head_dim=2, dtype=torch.float32, device="cpu")


def step(c, slots, positions):
    return plan(c, torch.tensor(slots), torch.tensor(positions))


def fill(c: KVCache) -> None:
    """Give every physical row of every layer distinct values, so that moved data can be recognised."""
    for layer, (k, v) in enumerate(zip(c.keys, c.values)):
        k.copy_(torch.arange(k.numel(), dtype=k.dtype).reshape(k.shape) + 1000 * layer)
        v.copy_(-k)


def test_sizes():
    c = cache(slots=3, max_len=5, layers=2)
    assert c.keys[0].shape == (3, 1, 5, 2) and len(c.keys) == len(c.values) == 2
    assert c.nbytes() == 2 * 2 * 3 * 5 * 2 * 4


def test_one_prompt_runs_in_order_from_position_0():
    c = cache()
    ctx, run = step(c, [2, 2, 2], [0, 1, 2])
    assert run is None  # already in running order
    assert ctx.singles == 0 and ctx.span == 0 and ctx.prompt_index is None
    assert ctx.rows.tolist() == [c.row_of[2]] * 3
    assert ctx.positions.tolist() == [[0, 1, 2]]
    assert c.length[c.row_of[2]] == 3


def test_decodes_are_compacted_into_the_first_rows_and_run_first():
    c = cache()
    ctx, run = step(c, [3, 1], [4, 6])  # two decodes, in slots whose rows are 3 and 1
    assert ctx.singles == 2 and ctx.span == 7  # the longest ends after position 6
    assert sorted(c.row_of[s] for s in (3, 1)) == [0, 1]
    assert ctx.rows.tolist() == [0, 1]
    order = run.tolist() if run is not None else [0, 1]
    assert [[3, 1][i] for i in order] == [c.slot_at[0], c.slot_at[1]]  # tokens run in cache-row order
    assert ctx.positions.tolist() == [[[4, 6][i] for i in order]]
    assert c.length[c.row_of[3]] == 5 and c.length[c.row_of[1]] == 7


def test_decodes_then_prompts_with_a_padded_prompt_batch():
    c = cache(slots=4)
    ctx, run = step(c, [0, 1, 1, 2, 3, 3, 3], [5, 0, 1, 9, 0, 1, 2])
    assert ctx.singles == 2 and ctx.span == 10
    assert run.tolist() == [0, 3, 1, 2, 4, 5, 6] or run.tolist() == [3, 0, 1, 2, 4, 5, 6]
    # two prompts (lengths 2 and 3) padded to 3: indices into the prompt part, and which places are real
    assert ctx.prompt_index.tolist() == [[0, 1, 1], [2, 3, 4]]
    assert ctx.prompt_valid.tolist() == [[True, True, False], [True, True, True]]
    assert ctx.rows.tolist()[2:] == [c.row_of[1]] * 2 + [c.row_of[3]] * 3
    assert c.length[c.row_of[1]] == 2 and c.length[c.row_of[3]] == 3


def test_a_slot_in_two_places_or_a_prompt_not_from_0_is_refused():
    c = cache()
    with pytest.raises(ValueError) as err:
        step(c, [1, 2, 1], [3, 3, 4])
    assert str(err.value) == "a step holds a slot's tokens in more than one place"
    with pytest.raises(ValueError) as err:
        step(c, [1, 1], [1, 2])
    assert str(err.value) == "a prompt must run whole, from position 0"
    with pytest.raises(ValueError, match="from position 0"):
        step(c, [1, 1, 1], [0, 2, 3])


def test_a_swap_moves_exactly_the_written_tokens_of_both_rows():
    c = cache(slots=4, max_len=8)
    fill(c)
    before = [k.clone() for k in c.keys + c.values]
    c.length[:] = [3, 0, 0, 5]
    c._swap(0, 3)
    for t, old in zip(c.keys + c.values, before):
        assert torch.equal(t[0, :, :5], old[3, :, :5]) and torch.equal(t[3, :, :5], old[0, :, :5])
        assert torch.equal(t[0, :, 5:], old[0, :, 5:]) and torch.equal(t[3, :, 5:], old[3, :, 5:])
        assert torch.equal(t[1:3], old[1:3])
    assert c.row_of[0] == 3 and c.row_of[3] == 0 and c.slot_at[0] == 3 and c.slot_at[3] == 0
    assert c.length == [5, 0, 0, 3] and c.swaps == 1


def test_place_keeps_rows_that_are_already_in_front_and_records_ends():
    c = cache(slots=4)
    assert c.place([0, 1], [4, 2], compact=True) == [0, 1] and c.swaps == 0
    assert c.length[:2] == [4, 2]
    rows = c.place([2, 0], [7, 5], compact=True)  # slot 2 moves into row 1 (slot 1's), slot 0 stays
    assert sorted(rows) == [0, 1] and c.row_of[0] == 0 and c.row_of[2] == 1 and c.row_of[1] == 2
    assert c.swaps == 1 and c.length[1] == 7 and c.length[0] == 5
    assert c.place([3], [1], compact=False) == [3] and c.swaps == 1  # a prompt is not moved


def test_the_cache_has_the_model_dtype():
    c = KVCache(2, 2, 4, groups=1, head_dim=2, dtype=torch.bfloat16, device="cpu")
    assert all(t.dtype == torch.bfloat16 for t in c.keys + c.values)


def test_every_swap_is_counted():
    c = cache(slots=4)
    c.place([2, 3], [1, 1], compact=True)
    assert c.swaps == 2 and sorted(c.row_of[s] for s in (2, 3)) == [0, 1]
