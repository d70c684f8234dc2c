"""The engine on the paged cache: preemption when blocks run out, chunked prefill, prefix caching. Each compares
generated text with what the same request gets alone on an ample cache (or Megatron's uncached forward)."""

import pytest

from preprocessing.params import SamplingParams
from triton_backend.engine.engine import Engine
from triton_backend.model.gpt import CachedGPT

from .models import ARCH, EOS, VOCAB, assert_uses_the_whole_context, context_model, greedy_uncached


@pytest.fixture(scope="module")
def model():
    m = context_model(ARCH, seed=3)
    assert_uses_the_whole_context(m)
    return m


def engine_on(model, **kw):
    cache = {k: kw.pop(k) for k in ("num_blocks", "block_size") if k in kw}
    return Engine(CachedGPT(model, ARCH, max_slots=8, **cache), VOCAB, EOS, **kw).start()


def generate(engine, prompts, params):
    with engine._wake:  # every request in before the first step
        gens = [engine.submit(p, q) for p, q in zip(prompts, params)]
    assert all(g.wait(120) for g in gens)
    assert [g.error for g in gens] == [None] * len(gens)
    return [g.tokens for g in gens]


PROMPTS = [[3 + i, 20 + i, 7, 41 - i, 9] * (1 + i % 3) for i in range(8)]
SEEDED = [SamplingParams(max_tokens=40, end_id=-1, temperature=0.8, top_k=30, seed=100 + i) for i in range(8)]


def on_ample_cache(model, params):
    """The texts of ``PROMPTS`` with ``params`` on an engine with blocks to spare (nothing preempted)."""
    ample = engine_on(model)
    try:
        return generate(ample, PROMPTS, params)
    finally:
        ample.stop()


def test_sequences_preempted_for_blocks_resume_with_the_same_text(model):
    """16 blocks of 4 tokens hold one 64-token context: 8 sequences growing to 45-55 tokens must take turns.
    Preempted ones give their blocks back and are read again later; their text does not change: it is what an
    engine with blocks to spare gives (whose greedy text equals the uncached model's, checked on the first
    prompt here and on every prompt in test_engine.py; the reference for all 8 would be 320 uncached forwards)."""
    greedy = [SamplingParams(max_tokens=40, end_id=-1, temperature=0.0)] * 8
    ample = engine_on(model)
    try:
        # all 8 at once: with blocks to spare nothing is preempted, while the tight engine's batch changes with
        # every preemption (and packing changes no text: test_engine.py)
        seeded_ample = generate(ample, PROMPTS, SEEDED)
        greedy_ample = generate(ample, PROMPTS, greedy)
    finally:
        ample.stop()
    assert greedy_ample[0] == greedy_uncached(model, PROMPTS[0], 40)
    tight = engine_on(model, num_blocks=16, block_size=4)
    try:
        assert generate(tight, PROMPTS, greedy) == greedy_ample
        assert tight.stats.preemptions > 0
        before = tight.stats.preemptions
        assert generate(tight, PROMPTS, SEEDED) == seeded_ample
        assert tight.stats.preemptions > before
        assert tight.blocks.in_use() == 0
    finally:
        tight.stop()


def test_a_prompt_run_in_chunks_beside_decodes_equals_uncached(model):
    long_prompt = [(i * 7) % 90 + 3 for i in range(23)]
    expected = greedy_uncached(model, long_prompt, 8), greedy_uncached(model, PROMPTS[0], 20)  # not while it runs
    engine = engine_on(model, block_size=4, prefill_tokens=6)
    try:
        runner = engine.submit(PROMPTS[0], SamplingParams(max_tokens=20, end_id=-1, temperature=0.0))
        while not runner.tokens:
            assert not runner.wait(0.01) or runner.error is None
        chunks_before = engine.stats.prompt_chunks
        (tokens,) = generate(engine, [long_prompt], [SamplingParams(max_tokens=8, end_id=-1, temperature=0.0)])
        assert tokens == expected[0]
        # then shorter chunks as the keys they read grow: n (done + n + 2 * 64) <= 6 (6 + 2 * 64)
        assert engine.stats.prompt_chunks - chunks_before == 5  # 6, 5, 5, 5, 2
        assert runner.wait(60) and runner.tokens == expected[1]
    finally:
        engine.stop()


@pytest.mark.parametrize("extra", [0, 1, 3])  # the shared part ends on a block boundary, one past it, mid-block
def test_prefix_caching_changes_no_text_and_skips_the_shared_blocks(model, extra):
    shared = [(i * 11) % 90 + 3 for i in range(16 + extra)]  # 4 blocks of 4, and ``extra`` tokens
    prompts = [shared + [5 + i, 60 - i] for i in range(4)] + [shared, shared]
    params = [SamplingParams(max_tokens=12, end_id=-1, temperature=0.0)] * 3 + SEEDED[:3]
    results = {}
    for caching in (False, True):
        engine = engine_on(model, block_size=4, prefix_caching=caching)
        try:
            first = generate(engine, prompts[:1], params[:1])  # fills the cache
            results[caching] = first + generate(engine, prompts[1:], params[1:])
            stats = engine.load()
        finally:
            engine.stop()
        if caching:
            assert stats["prefix_queried_tokens"] == sum(map(len, prompts))
            # every later prompt finds the 4 shared blocks; the prompt that is only ``shared`` keeps one token to
            # compute, so on a boundary it gives up its last block
            per_prompt = [16] * 3 + [16 if extra else 12] * 2
            assert stats["prefix_hit_tokens"] == sum(per_prompt)
        else:
            assert stats["prefix_hit_tokens"] == 0
    assert results[True] == results[False]
    assert results[True][:3] == [greedy_uncached(model, p, 12) for p in prompts[:3]]


def test_the_step_budget_is_shared_by_the_prompts_it_admits(model):
    """PREFILL_TOKENS 8, prompts of 6, 4 and 10 tokens together: step 1 reads 6 + 2 (the second prompt's first
    chunk), step 2 the second's last 2 and 6 of the third, step 3 the third's last 4; texts as alone."""
    prompts = [PROMPTS[1][:6], PROMPTS[2][:4], (PROMPTS[5] * 2)[:10]]
    params = [SamplingParams(max_tokens=3, end_id=-1, temperature=0.0)] * 3
    engine = engine_on(model, prefill_tokens=8)
    try:
        assert generate(engine, prompts, params) == [greedy_uncached(model, p, 3) for p in prompts]
        stats = engine.stats
    finally:
        engine.stop()
    assert (stats.prompt_chunks, stats.prefills, stats.peak_running) == (5, 3, 3)
    assert stats.rows_decoded == 9 and stats.steps == 5  # every row's 3 tokens; the last one 2 steps after step 3


def test_a_prompt_read_in_chunks_takes_its_share_of_the_budget_before_new_prompts(model):
    """PREFILL_TOKENS 8: a 20-token prompt read over three steps leaves no room for a 4-token one until its last
    chunk, so the short prompt's first token never comes before the long one's (a chunk that did not count
    against the budget would let the short prompt in at step 2)."""
    long, short = (PROMPTS[5] * 2)[:20], PROMPTS[2][:4]
    params = SamplingParams(max_tokens=2, end_id=-1, temperature=0.0)
    engine = engine_on(model, prefill_tokens=8)
    try:
        with engine._wake:
            a, b = engine.submit(long, params), engine.submit(short, params)
        assert a.wait(60) and b.wait(60)
        stats = engine.stats
    finally:
        engine.stop()
    assert a.first_token_at <= b.first_token_at
    # chunks of 8, 7 and 5 (each costs at most what the first did, see ``Engine._chunk``); the short prompt takes
    # the 1 token left at step 2 and its last 3 at step 3, so both decode their second token at step 4
    assert (stats.steps, stats.prompt_chunks) == (4, 5)
    assert (a.tokens, b.tokens) == (greedy_uncached(model, long, 2), greedy_uncached(model, short, 2))


def test_a_row_that_stops_does_not_hold_back_the_rows_after_it(model):
    """The first row of a packed step ends on its end_id; the rows sampled after it in that step keep their
    token (one that lost it would stall and be read again: the same text, but a preemption and more steps)."""
    first, second = PROMPTS[0], PROMPTS[3]
    stop_on = greedy_uncached(model, first, 3)[1]
    engine = engine_on(model)
    try:
        with engine._wake:
            a = engine.submit(first, SamplingParams(max_tokens=8, end_id=stop_on, temperature=0.0))
            b = engine.submit(second, SamplingParams(max_tokens=8, end_id=-1, temperature=0.0))
        assert a.wait(60) and b.wait(60)
        stats = engine.stats
    finally:
        engine.stop()
    assert (stats.steps, stats.preemptions) == (8, 0)
    assert (a.tokens, a.finish_reason) == (greedy_uncached(model, first, 1), "stop")
    assert b.tokens == greedy_uncached(model, second, 8) and b.finish_reason == "length"


class CountingSegments:
    """The real model; counts the packed segments of more than one token that each forward pass runs."""

    def __init__(self, gpt):
        self.gpt, self.multi_token = gpt, 0

    def __getattr__(self, name):
        return getattr(self.gpt, name)

    def step(self, tokens, positions, last, lengths, *rest, **kwargs):
        self.multi_token += int((lengths > 1).sum())
        return self.gpt.step(tokens, positions, last, lengths, *rest, **kwargs)


def test_preempted_sequences_read_again_in_small_chunks_count_as_prompt_chunks(model):
    """PREFILL_TOKENS 3 on the tight cache: past a prompt's first chunk (and for a preempted sequence read again)
    a chunk costing no more than the first holds at most 2 tokens (``Engine._chunk``). Every segment of more than
    one token that a step runs is part of a prompt or of a sequence read again, so ``prompt_chunks`` counts at
    least as many (the resumed ones have generated tokens: a count that took a 2-token chunk of a row that has
    generated for a decode would miss them). The texts are those of an ample cache."""
    greedy = [SamplingParams(max_tokens=40, end_id=-1, temperature=0.0)] * 8
    expected = on_ample_cache(model, greedy)
    counting = CountingSegments(CachedGPT(model, ARCH, max_slots=8, num_blocks=16, block_size=4))
    engine = Engine(counting, VOCAB, EOS, prefill_tokens=3).start()
    try:
        assert generate(engine, PROMPTS, greedy) == expected
        stats = engine.stats
    finally:
        engine.stop()
    assert stats.preemptions > 0 and counting.multi_token > 0
    assert stats.prompt_chunks >= counting.multi_token


def test_sequences_that_end_on_their_last_block_are_not_preempted(model):
    """Two sequences of 8 + 24 computed tokens fill the 16 blocks of 4 exactly: each decode takes the one slot it
    writes, so nothing steps back (a reservation of two slots would preempt one at the last step)."""
    prompts = [PROMPTS[1][:8], PROMPTS[4][:8]]
    params = [SamplingParams(max_tokens=25, end_id=-1, temperature=0.0)] * 2
    engine = engine_on(model, num_blocks=16, block_size=4)
    try:
        texts = generate(engine, prompts, params)
        stats = engine.stats
    finally:
        engine.stop()
    assert (stats.steps, stats.preemptions, stats.peak_running) == (25, 0, 2)
    assert texts == [greedy_uncached(model, p, 25) for p in prompts]


def test_prompts_that_hold_every_block_make_room_by_preempting_the_newest(model):
    """PREFILL_TOKENS 32, 16 blocks of 4, prompts of 63, 20 and 20 tokens: the first takes 32 + 27 tokens, the
    second the one block left, and then neither can read on (no sequence decodes). The newest steps back, once,
    and every text is what the prompt gets alone."""
    prompts = [(PROMPTS[5] * 5)[:63], (PROMPTS[6] * 2)[:20], (PROMPTS[7] * 2)[:20]]
    params = [SamplingParams(max_tokens=1, end_id=-1, temperature=0.0)] * 3
    engine = Engine(CachedGPT(model, ARCH, max_slots=8, num_blocks=16, block_size=4), VOCAB, EOS,
                    prefill_tokens=32)
    preempt, events = engine._preempt, []

    def recording(row):  # who steps back, who runs, and whether any of them was decoding
        events.append((gens.index(row.generation), [gens.index(r.generation) for r in engine._running],
                       any(r.pending() == 1 for r in engine._running)))
        preempt(row)

    engine._preempt = recording
    gens = [engine.submit(p, q) for p, q in zip(prompts, params)]
    engine.start()
    try:
        assert all(g.wait(60) for g in gens)
        stats = engine.stats
    finally:
        engine.stop()
    assert events == [(1, [0, 1], False)]
    assert stats.preemptions == 1
    assert [g.tokens for g in gens] == [greedy_uncached(model, p, 1) for p in prompts]


@pytest.mark.parametrize("reserve", [False, True])
def test_the_slot_layout_baseline_reserves_a_whole_context(model, reserve):
    """``reserve_context`` (the benchmark's slot-cache baseline) takes a whole context's blocks at admission;
    the paged default takes what the prompt needs."""
    engine = Engine(CachedGPT(model, ARCH, max_slots=4, block_size=4), VOCAB, EOS, reserve_context=reserve)
    for prompt in PROMPTS[:2]:
        engine.submit(prompt, SamplingParams(max_tokens=2, end_id=-1))
    with engine._wake:
        chunks = engine._schedule()
    per_sequence = engine.blocks.blocks_for(engine.context) if reserve else None
    expected = 2 * per_sequence if reserve else sum(engine.blocks.blocks_for(len(p)) for p in PROMPTS[:2])
    assert len(chunks) == 2 and engine.blocks.in_use() == expected
    assert engine.blocks.prefix_caching  # on unless asked off (PREFIX_CACHING=0)


def test_an_engine_refuses_a_cache_that_cannot_hold_one_context(model):
    with pytest.raises(ValueError, match=r"a KV cache of 3 blocks cannot hold one 64-token sequence"):
        Engine(CachedGPT(model, ARCH, max_slots=1, num_blocks=3, block_size=4), VOCAB, EOS)


def test_a_preempted_request_counts_as_waiting_and_can_be_cancelled(model):
    """Under block pressure: while sequences are preempted, the load report counts them as waiting (every
    unfinished request is running or waiting), and one cancelled while preempted ends as cancelled, its blocks
    free, the others unaffected."""
    greedy = [SamplingParams(max_tokens=40, end_id=-1, temperature=0.0)] * 8
    expected = on_ample_cache(model, greedy)
    engine = engine_on(model, num_blocks=16, block_size=4)
    seen, victim, first_preemption = [], [], []

    def listener(g):  # on the engine thread, between steps' bookkeeping
        if engine._preempted and not first_preemption:  # who stepped back, and who still runs
            first_preemption.append(([r.generation for r in engine._preempted],
                                      [r.generation for r in engine._running]))
        if engine._preempted and not victim:
            victim.append(engine._preempted[-1].generation)
            engine.cancel(victim[0])
        load = engine.load()
        seen.append((load["running"] + load["waiting"], sum(not x.done for x in gens), len(engine._preempted)))

    try:
        with engine._wake:
            gens = [engine.submit(p, q, listener=listener) for p, q in zip(PROMPTS, greedy)]
        assert all(g.wait(120) for g in gens)
        assert engine.blocks.in_use() == 0 and engine.load()["waiting"] == 0
    finally:
        engine.stop()
    assert victim and victim[0].finish_reason == "cancelled" and victim[0].error is None
    # the newest sequences step back: each preempted one was admitted after every one still running
    # (admission follows submission here, the first preemption coming before any resume)
    preempted, running = first_preemption[0]
    assert min(gens.index(g) for g in preempted) > max(gens.index(g) for g in running)
    assert any(preempted for _, _, preempted in seen)
    assert all(counted == unfinished for counted, unfinished, _ in seen)
    for g, tokens in zip(gens, expected):
        if g is not victim[0]:
            assert g.tokens == tokens and g.error is None
