"""Scoring and alternatives in the engine: prompt log-probs and the top-N tokens per position, against the
model's own forward pass (a log-softmax over its logits at every position, no cache)."""

import pytest
import torch

from preprocessing.params import InvalidRequest, SamplingParams
from triton_backend.engine.engine import Engine
from triton_backend.model.gpt import CachedGPT

from .models import ARCH, EOS, VOCAB, assert_uses_the_whole_context, context_model, run_two_ranks

PROMPT = [5, 17, 33, 4, 90, 61, 12, 8, 77, 3, 40, 2, 9, 100, 64, 1, 22, 35, 48, 50, 6, 7, 11, 13, 14, 15, 16, 18,
          19, 20, 21, 23, 24, 25, 26, 27, 28, 29, 30, 31, 32, 34, 36, 37]  # 44 tokens: more than a 32-token block


@pytest.fixture(scope="module")
def model():
    m = context_model(ARCH)
    assert_uses_the_whole_context(m)
    return m


def reference(model, ids: list[int]) -> torch.Tensor:
    """Log-probs [len(ids), vocabulary] at every position, from Megatron's plain causal forward."""
    with torch.no_grad():
        logits = model(torch.tensor([ids]), torch.arange(len(ids))[None], None)[0, :, :VOCAB]
    return torch.log_softmax(logits.float(), dim=1)


def run(engine, prompt, **kw):
    g = engine.submit(prompt, SamplingParams(**{"end_id": -1, "temperature": 0.0, **kw}))
    assert g.wait(60) and g.error is None
    return g


@pytest.mark.parametrize("prefill_tokens", [256, 7])  # the prompt in one step, or in chunks of at most 7
def test_prompt_log_probs_are_the_models_own(model, prefill_tokens):
    engine = Engine(CachedGPT(model, ARCH, max_slots=4), VOCAB, EOS, prefill_tokens=prefill_tokens).start()
    try:
        g = run(engine, PROMPT, max_tokens=4, return_prompt_log_probs=True, top_log_probs=3)
    finally:
        engine.stop()
    expected = reference(model, PROMPT + g.tokens)
    # token i + 1 given tokens 0..i
    want = expected[torch.arange(len(PROMPT) - 1), torch.tensor(PROMPT[1:])]
    assert g.prompt_logprobs == pytest.approx(want.tolist(), abs=1e-4)
    assert len(g.prompt_top) == len(PROMPT) - 1
    for position, (ids, values) in enumerate(g.prompt_top):
        top = expected[position].topk(3)
        assert ids == top.indices.tolist() and values == pytest.approx(top.values.tolist(), abs=1e-4)
    # and at every generated position: the greedy token is the first alternative
    assert len(g.top) == len(g.tokens) == 4
    for i, (ids, values) in enumerate(g.top):
        top = expected[len(PROMPT) - 1 + i].topk(3)
        assert ids == top.indices.tolist() and ids[0] == g.tokens[i]
        assert values == pytest.approx(top.values.tolist(), abs=1e-4)
        assert values[0] == g.logprobs[i]  # exactly: a client compares its token's log-prob with the alternatives'
    assert engine.stats.rows_decoded == 4  # scored positions are not counted as decoded rows


def test_a_scored_prompt_whose_last_chunk_scores_one_position_keeps_it(model):
    """9 tokens read in chunks of 7 and 2: the second chunk holds one position to score (the 8th; the 9th token's
    logits predict nothing in the prompt)."""
    engine = Engine(CachedGPT(model, ARCH, max_slots=4), VOCAB, EOS, prefill_tokens=7).start()
    try:
        g = run(engine, PROMPT[:9], max_tokens=0, return_prompt_log_probs=True)
        chunks = engine.stats.prompt_chunks
    finally:
        engine.stop()
    assert chunks == 2
    expected = reference(model, PROMPT[:9])
    assert g.prompt_logprobs == pytest.approx(expected[torch.arange(8), torch.tensor(PROMPT[1:9])].tolist(),
                                              abs=1e-4)


def test_scoring_alone_generates_nothing(model):
    engine = Engine(CachedGPT(model, ARCH, max_slots=4), VOCAB, EOS).start()
    try:
        g = run(engine, PROMPT[:10], max_tokens=0, return_prompt_log_probs=True)
        with pytest.raises(InvalidRequest, match="max_tokens"):
            engine.submit(PROMPT[:10], SamplingParams(max_tokens=0))
        plain = run(engine, PROMPT[:10], max_tokens=3)
    finally:
        engine.stop()
    assert g.tokens == [] and g.finish_reason == "length" and g.top == [] and g.prompt_top == []
    expected = reference(model, PROMPT[:10])
    assert g.prompt_logprobs == pytest.approx(expected[torch.arange(9), torch.tensor(PROMPT[1:10])].tolist(),
                                              abs=1e-4)
    assert plain.prompt_logprobs == [] and plain.top == [] and len(plain.tokens) == 3


def test_a_scored_prompt_is_computed_whole_even_when_its_prefix_is_cached(model):
    """Prefix caching skips the positions a cached block holds; a scored prompt needs them all, so it takes none
    from the cache, and a request after it still can."""
    engine = Engine(CachedGPT(model, ARCH, max_slots=4), VOCAB, EOS, prefix_caching=True).start()
    try:
        first = run(engine, PROMPT, max_tokens=2)
        hits = engine.load()["prefix_hit_tokens"]
        scored = run(engine, PROMPT, max_tokens=2, return_prompt_log_probs=True)
        assert engine.load()["prefix_hit_tokens"] == hits  # no block taken from the cache
        again = run(engine, PROMPT, max_tokens=2)
        assert engine.load()["prefix_hit_tokens"] > hits
    finally:
        engine.stop()
    assert first.tokens == scored.tokens == again.tokens
    expected = reference(model, PROMPT)
    assert scored.prompt_logprobs == pytest.approx(
        expected[torch.arange(len(PROMPT) - 1), torch.tensor(PROMPT[1:])].tolist(), abs=1e-4)


def test_scoring_rows_beside_others_change_no_text(model):
    """A scored prompt packed with plain requests: their tokens are those they get alone, and its values hold."""
    engine = Engine(CachedGPT(model, ARCH, max_slots=8), VOCAB, EOS).start()
    try:
        alone = [run(engine, p, max_tokens=6).tokens for p in (PROMPT[:7], PROMPT[3:20])]
        with engine._wake:  # one step for all three
            gens = [engine.submit(PROMPT[:7], SamplingParams(max_tokens=6, end_id=-1, temperature=0.0)),
                    engine.submit(PROMPT, SamplingParams(max_tokens=2, end_id=-1, temperature=0.0,
                                                         return_prompt_log_probs=True, top_log_probs=2)),
                    engine.submit(PROMPT[3:20], SamplingParams(max_tokens=6, end_id=-1, temperature=0.0))]
        assert all(g.wait(60) and g.error is None for g in gens)
    finally:
        engine.stop()
    assert [gens[0].tokens, gens[2].tokens] == alone
    expected = reference(model, PROMPT)
    assert gens[1].prompt_logprobs == pytest.approx(
        expected[torch.arange(len(PROMPT) - 1), torch.tensor(PROMPT[1:])].tolist(), abs=1e-4)


def test_a_scored_only_prompt_packed_with_generating_ones_leaves_them_their_tokens(model):
    """max_tokens 0 (scoring) beside requests of 1 and 3 tokens in one step: the scored one ends at once with its
    values, the others get the tokens they get alone (their rows must survive the scored row's removal)."""
    engine = Engine(CachedGPT(model, ARCH, max_slots=8), VOCAB, EOS).start()
    try:
        alone = [run(engine, PROMPT[:7], max_tokens=n).tokens for n in (1, 3)]
        before = engine.stats.steps
        with engine._wake:  # one step for all three
            gens = [engine.submit(PROMPT[:7], SamplingParams(max_tokens=1, end_id=-1, temperature=0.0)),
                    engine.submit(PROMPT[:12], SamplingParams(max_tokens=0, return_prompt_log_probs=True)),
                    engine.submit(PROMPT[:7], SamplingParams(max_tokens=3, end_id=-1, temperature=0.0))]
        assert all(g.wait(60) for g in gens)
        steps = engine.stats.steps - before
    finally:
        engine.stop()
    assert steps == 3  # the prompts, then the last request's second and third tokens: no row skipped a step
    assert [g.error for g in gens] == [None] * 3
    assert [gens[0].tokens, gens[2].tokens] == alone and gens[1].tokens == []
    assert len(gens[1].prompt_logprobs) == 11


def test_top_log_probs_limits():
    with pytest.raises(InvalidRequest, match="top_log_probs"):
        SamplingParams(max_tokens=1, top_log_probs=21).check(VOCAB, 3, 64)
    with pytest.raises(InvalidRequest, match="top_log_probs"):
        SamplingParams(max_tokens=1, top_log_probs=-1).check(VOCAB, 3, 64)
    SamplingParams(max_tokens=1, top_log_probs=20).check(VOCAB, 3, 64)
    # a scored prompt may fill the context; a generating one must leave room
    SamplingParams(max_tokens=0, return_prompt_log_probs=True).check(VOCAB, 64, 64)
    with pytest.raises(InvalidRequest, match="text_input"):
        SamplingParams(max_tokens=1).check(VOCAB, 64, 64)


def _tp_rank(rank: int, port: int, queue) -> None:
    """One rank of a TP=2 job: both run the reference forward (its collectives need both), then rank 0 scores
    through the engine while rank 1 follows its steps."""
    import os

    import torch.distributed as dist

    from triton_backend.model.gpt import build_model, gather_vocab, init_parallel
    from triton_backend.ranks.protocol import Leader, follow

    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    init_parallel(2, "cpu", timeout_s=120)
    torch.manual_seed(rank)
    model = build_model(ARCH, init_method_std=0.2, tensor_parallel=2).eval()
    with torch.no_grad():
        shard = model(torch.tensor([PROMPT]), torch.arange(len(PROMPT))[None], None)[0]
        full = gather_vocab(shard.float().contiguous(), 2)[:, :VOCAB]
    gpt = CachedGPT(model, ARCH, max_slots=2)
    if rank == 0:
        engine = Engine(Leader(gpt), VOCAB, EOS, prefill_tokens=16).start()
        g = engine.submit(PROMPT, SamplingParams(max_tokens=0, return_prompt_log_probs=True, top_log_probs=2))
        assert g.wait(60) and g.error is None, g.error
        engine.stop()
        Leader(gpt).shutdown()
        expected = torch.log_softmax(full, dim=1)
        want = expected[torch.arange(len(PROMPT) - 1), torch.tensor(PROMPT[1:])]
        tops = [expected[i].topk(2).indices.tolist() for i in range(len(PROMPT) - 1)]
        queue.put((g.prompt_logprobs, want.tolist(), [ids for ids, _ in g.prompt_top], tops))
    else:
        follow(gpt)
    dist.destroy_process_group()


def test_prompt_log_probs_at_tp2_are_the_tp2_models_own():
    got, want, top_ids, want_top = run_two_ranks(_tp_rank)
    assert got == pytest.approx(want, abs=1e-4) and len(got) == len(PROMPT) - 1
    assert top_ids == want_top
