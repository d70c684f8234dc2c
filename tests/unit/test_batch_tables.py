"""The block tables every rank keeps between steps (``cache/tables.py``): a step's edits rebuild exactly the tables
the engine holds, the device copy follows in place, a bad edit is refused by rule, and a steady decode sends only
the blocks its sequences took."""

import numpy as np
import pytest
import torch

from preprocessing.params import SamplingParams
from triton_backend.cache.tables import BatchTables
from triton_backend.engine.engine import Engine
from triton_backend.model.gpt import CachedGPT

from .models import ARCH, EOS, VOCAB, context_model


def test_edits_rebuild_the_tables_and_the_device_copy_follows_in_place():
    tables = BatchTables(slots=4, width=6, num_blocks=50, device="cpu")
    address = tables.device.data_ptr()
    rng = np.random.default_rng(0)
    held: dict[int, list[int]] = {}  # slot -> the table the ranks hold
    for step in range(40):
        slots = rng.choice(4, size=rng.integers(1, 5), replace=False)
        want, keeps, entries = [], [], []
        for s in slots.tolist():
            old = held.get(s, [])
            if step % 7 == 3 or len(old) == 6:  # a new sequence in this slot: nothing kept (the tail is stale)
                old = []
            keep = len(old)
            new = rng.integers(0, 50, size=rng.integers(0 if keep else 1, 6 - keep + 1)).tolist()
            held[s] = old + new
            want += held[s]
            keeps.append(keep)
            entries += new
        lengths = [len(held[s]) for s in slots.tolist()]
        got = tables.apply(slots, np.array(keeps), np.array(lengths), np.array(entries, dtype=np.int64))
        assert got.tolist() == want
        for s in slots.tolist():
            assert tables.device[s, :len(held[s])].tolist() == held[s]
            assert tables.rows(torch.tensor([s]), len(held[s])).tolist() == [held[s]]
    assert tables.device.data_ptr() == address
    assert (tables.device.numpy() == tables.host).all()


@pytest.mark.parametrize("slots, keeps, lengths, entries, rule", [
    ([0, 0], [0, 0], [1, 1], [1, 2], "distinct"),
    ([4], [0], [1], [1], "below 4"),
    ([-1], [0], [1], [1], "below 4"),
    ([1], [2], [1], [], "keeps at most its length"),
    ([1], [0], [7], [1] * 7, "at most 6 entries"),
    ([1], [0], [2], [1], "one per new block"),
    ([1], [0], [1], [50], "each below 50"),
    ([1, 2], [0], [1, 1], [1, 1], "one per sequence"),
])
def test_a_bad_edit_is_refused_by_rule_and_changes_nothing(slots, keeps, lengths, entries, rule):
    tables = BatchTables(slots=4, width=6, num_blocks=50, device="cpu")
    tables.apply([1], [0], [3], [7, 8, 9])
    with pytest.raises(ValueError, match=rule):
        tables.apply(np.array(slots), np.array(keeps), np.array(lengths), np.array(entries, dtype=np.int64))
    assert tables.host[1, :3].tolist() == [7, 8, 9] and tables.device[1, :3].tolist() == [7, 8, 9]


class Recorder:
    """The real model; records each step's edits and checks them against the engine's own block tables."""

    def __init__(self, gpt, engine_rows):
        self.gpt, self.engine_rows, self.steps = gpt, engine_rows, []

    def __getattr__(self, name):
        return getattr(self.gpt, name)

    def step(self, tokens, positions, last, lengths, slots, keeps, table_lengths, entries, **kwargs):
        by_slot = {r.slot: r.blocks for r in self.engine_rows()}
        out = self.gpt.step(tokens, positions, last, lengths, slots, keeps, table_lengths, entries, **kwargs)
        for s, n in zip(slots.tolist(), table_lengths.tolist()):  # what every rank now holds is the engine's table
            assert self.gpt.tables.host[s, :n].tolist() == by_slot[s][:n]
        self.steps.append((positions.tolist(), lengths.tolist(), len(entries), int(table_lengths.sum())))
        return out


def test_a_steady_decode_sends_only_the_blocks_its_sequences_take():
    """Eight sequences in blocks of 4 tokens: once their prompts are in, a decode step carries one table entry
    per sequence whose new token opens a block, where the whole tables used to travel every step."""
    model = context_model(ARCH, seed=3)
    gpt = CachedGPT(model, ARCH, max_slots=8, block_size=4)
    engine = Engine(gpt, VOCAB, EOS)
    engine.gpt = recorder = Recorder(gpt, lambda: engine._running)
    engine.start()
    try:
        with engine._wake:
            gens = [engine.submit([3 + i, 9, 11 + i], SamplingParams(max_tokens=30, end_id=-1)) for i in range(8)]
        assert all(g.wait(120) for g in gens) and [g.error for g in gens] == [None] * 8
    finally:
        engine.stop()
    decodes = [(p, n, whole) for p, lengths, n, whole in recorder.steps if set(lengths) == {1}]
    assert len(decodes) >= 25
    for positions, sent, _ in decodes:
        assert sent == sum(p % 4 == 0 for p in positions)  # a position at a block's start: that block is new
    assert sum(sent for _, sent, _ in decodes) * 3 < sum(whole for _, _, whole in decodes)
    assert sorted(engine._slots) == list(range(8))  # every slot back once the sequences are done
