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


def test_sequences_preempted_for_blocks_resume_with_the_same_text(model):
    """16 blocks of 4 tokens hold one 64-token context: 8 sequences growing to 45-55 tokens must take turns.
    Preempted ones give their blocks back and are read again later; their text does not change."""
    greedy = [SamplingParams(max_tokens=40, end_id=-1, temperature=0.0)] * 8
    ample = engine_on(model)
    try:
        seeded_alone = [generate(ample, [p], [q])[0] for p, q in zip(PROMPTS, SEEDED)]
    finally:
        ample.stop()
    tight = engine_on(model, num_blocks=16, block_size=4)
    try:
        assert generate(tight, PROMPTS, greedy) == [greedy_uncached(model, p, 40) for p in PROMPTS]
        assert tight.stats.preemptions > 0
        before = tight.stats.preemptions
        assert generate(tight, PROMPTS, SEEDED) == seeded_alone
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
