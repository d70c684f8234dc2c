"""The engine over a small random Megatron GPT: caching, mixed batches and finish rules."""

import pytest
import torch

from preprocessing.params import InvalidRequest, SamplingParams
from triton_backend.architecture import GPTArchitecture
from triton_backend.attention import SlotCacheAttention
from triton_backend.engine import Engine
from triton_backend.gpt import CachedGPT, build_model, init_parallel

ARCH = GPTArchitecture(num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=256,
                       padded_vocab_size=128, max_position_embeddings=64, seq_length=64)
VOCAB, EOS = 120, 2


@pytest.fixture(scope="module")
def model():
    init_parallel(1, "cpu")
    torch.manual_seed(0)
    return build_model(ARCH).eval()


@pytest.fixture
def engine(model):
    eng = Engine(CachedGPT(model, ARCH, max_slots=8), VOCAB, EOS).start()
    yield eng
    eng.stop()


def greedy_uncached(model, prompt, n):
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            x = torch.tensor([ids])
            logits = model(x, torch.arange(len(ids))[None], None)[0, -1, :VOCAB]
            ids.append(int(logits.argmax()))
    return ids[len(prompt):]


def run(engine, prompt, **kw):
    g = engine.submit(prompt, SamplingParams(**{"max_tokens": 10, "end_id": -1, **kw}))
    assert g.wait(60)
    assert g.error is None
    return g


def test_cached_greedy_equals_uncached(engine, model):
    prompt = [5, 17, 33, 4, 90]
    assert run(engine, prompt, temperature=0.0).tokens == greedy_uncached(model, prompt, 10)


def test_rotary_family_cached_equals_uncached():
    """Rotary positions are applied per row inside the cache-aware attention; the cache must not shift them."""
    arch = GPTArchitecture(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, kv_channels=16,
                           ffn_hidden_size=96, padded_vocab_size=128, max_position_embeddings=64, seq_length=64,
                           position_embedding_type="rope", normalization="RMSNorm", swiglu=True,
                           add_bias_linear=False, untie_embeddings_and_output_weights=True)
    init_parallel(1, "cpu")
    torch.manual_seed(1)
    model = build_model(arch, init_method_std=0.2).eval()
    assert all(m.rotary is not None for m in model.modules() if isinstance(m, SlotCacheAttention))
    eng = Engine(CachedGPT(model, arch, max_slots=4), VOCAB, EOS).start()
    try:
        prompt = [7, 8, 9, 10, 11, 12]
        other = eng.submit([3] * 11, SamplingParams(max_tokens=10, end_id=-1, temperature=0.0))  # a longer row beside
        assert run(eng, prompt, temperature=0.0).tokens == greedy_uncached(model, prompt, 10)
        assert other.wait(60)
    finally:
        eng.stop()


def test_mixed_lengths_and_parameters_batch_together_and_each_gets_its_own(engine):
    prompts = [[3 + i] * (1 + 3 * i) for i in range(6)]
    params = [dict(temperature=0.0) if i % 2 == 0 else dict(temperature=0.9, seed=i, top_k=20) for i in range(6)]
    alone = [run(engine, p, **kw).tokens for p, kw in zip(prompts, params)]
    steps_before = engine.stats.steps
    gens = [engine.submit(p, SamplingParams(max_tokens=10, end_id=-1, **kw)) for p, kw in zip(prompts, params)]
    assert all(g.wait(60) for g in gens)
    assert [g.tokens for g in gens] == alone
    assert engine.stats.max_rows_in_step > 1
    assert engine.stats.steps - steps_before < 6 * 9  # fewer steps than serving them one by one


def test_rows_that_move_in_the_cache_keep_their_text():
    """Rows retiring from the middle of the batch make the cache move others into their rows (``place``)."""
    init_parallel(1, "cpu")
    torch.manual_seed(0)
    model = build_model(ARCH, init_method_std=0.2).eval()  # weights large enough that the context matters
    engine = Engine(CachedGPT(model, ARCH, max_slots=8), VOCAB, EOS).start()
    try:
        prompts = [[4 + i] * (2 + i % 5) for i in range(12)]
        lengths = [3, 17, 6, 12, 2, 9, 15, 4, 11, 7, 16, 5]
        gens = [engine.submit(p, SamplingParams(max_tokens=n, end_id=-1, temperature=0.0))
                for p, n in zip(prompts, lengths)]
        assert all(g.wait(60) for g in gens)
        assert engine.gpt.cache.swaps > 0
        assert [g.tokens for g in gens] == [greedy_uncached(model, p, n) for p, n in zip(prompts, lengths)]
    finally:
        engine.stop()


def test_finish_reasons(engine):
    g = run(engine, [1, 2, 3], temperature=0.0, max_tokens=4)
    assert g.finish_reason == "length" and len(g.tokens) == 4
    first = g.tokens[0]
    g = run(engine, [1, 2, 3], temperature=0.0, end_id=first)
    assert g.finish_reason == "stop" and g.tokens == []
    g = run(engine, [1, 2, 3], temperature=0.0, end_id=first, min_length=2, max_tokens=3)
    assert len(g.tokens) >= 2 and g.tokens[0] != first


def test_invalid_requests_are_refused_before_reaching_the_model(engine):
    with pytest.raises(InvalidRequest, match="max_tokens"):
        engine.submit([1] * 60, SamplingParams(max_tokens=10))
    with pytest.raises(InvalidRequest, match="INPUT_IDS"):
        engine.submit([1, VOCAB + 1], SamplingParams(max_tokens=1))
    assert engine.stats.requests_failed == 0


def test_slots_are_reused_beyond_the_cache_size(engine):
    gens = [engine.submit([i + 1, i + 2], SamplingParams(max_tokens=3, seed=i)) for i in range(20)]
    assert all(g.wait(60) for g in gens)
    assert all(g.error is None for g in gens)
    assert engine.load() == {"running": 0, "waiting": 0, "kv_slots_used": 0.0, "cancelled": 0}


def test_kv_cache_sizing():
    from triton_backend.gpt import fit_slots, kv_bytes_per_slot

    init_parallel(1, "cpu")
    per_slot = kv_bytes_per_slot(ARCH, 1, 64, torch.float32)
    assert per_slot == 2 * 2 * 4 * 64 * 16 * 4  # K and V, layers, heads, tokens, head dim, float32
    assert kv_bytes_per_slot(ARCH, 2, 64, torch.bfloat16) == per_slot // 4  # half the heads, half the bytes
    assert fit_slots(64, per_slot, None) == 64
    assert fit_slots(64, per_slot, 10 * per_slot + 1) == 10
    with pytest.raises(ValueError, match="KV_CACHE_MB"):
        fit_slots(64, per_slot, per_slot - 1)
    cache = CachedGPT(build_model(ARCH), ARCH, max_slots=3).cache
    assert cache.nbytes() == 3 * per_slot
