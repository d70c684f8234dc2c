"""The engine over a small random Megatron GPT: caching, mixed batches and finish rules.

Every equivalence here runs on a model whose greedy text depends on the whole prompt (``models.py``), so a cache
that drops, shifts or misplaces context cannot pass by accident.
"""

import threading
import time

import pytest
import torch

from preprocessing.params import InvalidRequest, SamplingParams
from triton_backend.engine.engine import Engine
from triton_backend.model.attention import PagedAttention
from triton_backend.model.gpt import CachedGPT, build_model, init_parallel

from .models import (
    ARCH,
    EOS,
    ROTARY_ARCH,
    TEXT_ARCH,
    VOCAB,
    assert_uses_the_whole_context,
    context_model,
    greedy_uncached,
    greedy_uncached_with_logprobs,
    wait_until,
)

PROMPTS = [[5, 17, 33, 4, 90], [6, 17, 33, 4, 90], [9], [3] * 11, [40, 2, 77, 100, 8, 64, 1, 5]]


@pytest.fixture(scope="module")
def model():
    m = context_model(ARCH)
    assert_uses_the_whole_context(m)
    return m


@pytest.fixture
def engine(model):
    eng = Engine(CachedGPT(model, ARCH, max_slots=8), VOCAB, EOS).start()
    yield eng
    eng.stop()


def submit_together(engine, prompts, params):
    """Submit every request before the engine's next step (its lock is held meanwhile), so they share a prefill."""
    with engine._wake:
        return [engine.submit(p, q) for p, q in zip(prompts, params)]


def run(engine, prompt, **kw):
    g = engine.submit(prompt, SamplingParams(**{"max_tokens": 10, "end_id": -1, **kw}))
    assert g.wait(60)
    assert g.error is None
    if g.tokens:
        assert g.submitted <= g.first_token_at <= g.finished_at
    else:  # ended at once (its first token was end_id)
        assert g.first_token_at is None and g.submitted <= g.finished_at
    assert engine.stats.steps_sampled_again == 0  # no row's sampling failed
    return g


def test_cached_greedy_equals_uncached(engine, model):
    for prompt in PROMPTS:  # one at a time: each prompt alone in its prefill, then decoded from the cache
        g = run(engine, prompt, temperature=0.0)
        tokens, logprobs = greedy_uncached_with_logprobs(model, prompt, 10)
        assert g.tokens == tokens, prompt
        assert g.logprobs == pytest.approx(logprobs, abs=1e-4)
    assert engine.stats.tokens_generated == 10 * len(PROMPTS) and engine.stats.requests_finished == len(PROMPTS)


def test_packed_greedy_equals_uncached(engine, model):
    """All prompts submitted at once: packed into one prefill, then decoded side by side at different lengths."""
    gens = submit_together(engine, PROMPTS, [SamplingParams(max_tokens=12, end_id=-1, temperature=0.0)] * 5)
    assert all(g.wait(60) for g in gens)
    assert engine.stats.max_rows_in_step == len(PROMPTS) and engine.stats.prefills == 1
    assert [g.tokens for g in gens] == [greedy_uncached(model, p, 12) for p in PROMPTS]


def test_a_prompt_admitted_beside_running_decodes_equals_uncached(engine, model):
    """A prefill packed into the same pass as other sequences' decodes (the common case under load)."""
    long = engine.submit(PROMPTS[4], SamplingParams(max_tokens=30, end_id=-1, temperature=0.0))
    wait_until(lambda: len(long.tokens) >= 3 or long.done, what="three tokens")
    late = [engine.submit(p, SamplingParams(max_tokens=8, end_id=-1, temperature=0.0)) for p in PROMPTS[:2]]
    assert long.wait(60) and all(g.wait(60) for g in late)
    assert long.tokens == greedy_uncached(model, PROMPTS[4], 30)
    assert [g.tokens for g in late] == [greedy_uncached(model, p, 8) for p in PROMPTS[:2]]


def test_rotary_family_cached_equals_uncached():
    """Rotary positions are applied per row inside the cache-aware attention; the cache must not shift them."""
    model = context_model(ROTARY_ARCH, seed=1)
    assert_uses_the_whole_context(model)
    assert all(m.rotary is not None for m in model.modules() if isinstance(m, PagedAttention))
    eng = Engine(CachedGPT(model, ROTARY_ARCH, max_slots=4), VOCAB, EOS).start()
    try:
        other = eng.submit([3] * 11, SamplingParams(max_tokens=10, end_id=-1, temperature=0.0))  # a longer row beside
        for prompt in PROMPTS[:2]:
            assert run(eng, prompt, temperature=0.0).tokens == greedy_uncached(model, prompt, 10)
        assert other.wait(60) and other.tokens == greedy_uncached(model, [3] * 11, 10)
    finally:
        eng.stop()


def test_mixed_lengths_and_parameters_batch_together_and_each_gets_its_own(engine):
    prompts = [[3 + i, 50 - i] * (1 + i) for i in range(6)]
    params = [dict(temperature=0.0, repetition_penalty=1.2) if i % 2 == 0 else dict(temperature=0.9, seed=i, top_k=20)
              for i in range(6)]
    alone = [run(engine, p, **kw).tokens for p, kw in zip(prompts, params)]
    steps_before = engine.stats.steps
    gens = submit_together(engine, prompts, [SamplingParams(max_tokens=10, end_id=-1, **kw) for kw in params])
    assert all(g.wait(60) for g in gens)
    assert [g.tokens for g in gens] == alone
    assert engine.stats.max_rows_in_step == 6
    assert engine.stats.steps - steps_before == 10  # one prefill (the first token of each), then 9 decodes
    assert engine.stats.rows_decoded == 6 * 10 + sum(len(g.tokens) for g in gens)  # alone, then together
    assert engine.stats.steps_sampled_again == 0


def test_sequences_crossing_blocks_and_retiring_mid_batch_keep_their_text(model):
    """Block-size 4: every sequence spans several blocks, and rows retiring from the middle of the batch hand
    their blocks to the next ones (the pool's lowest ids first)."""
    engine = Engine(CachedGPT(model, ARCH, max_slots=8, block_size=4), VOCAB, EOS).start()
    try:
        prompts = [[4 + i, 30 + 2 * i, 7] * (1 + i % 3) for i in range(12)]
        lengths = [3, 17, 6, 12, 2, 9, 15, 4, 11, 7, 16, 5]
        gens = [engine.submit(p, SamplingParams(max_tokens=n, end_id=-1, temperature=0.0))
                for p, n in zip(prompts, lengths)]
        assert all(g.wait(60) for g in gens)
        assert [g.tokens for g in gens] == [greedy_uncached(model, p, n) for p, n in zip(prompts, lengths)]
        assert engine.blocks.in_use() == 0
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
    assert engine.load() == {"running": 0, "waiting": 0, "kv_blocks_used": 0, "kv_usage": 0.0, "cancelled": 0,
                             "prefix_queried_tokens": 40, "prefix_hit_tokens": 0}


def test_kv_cache_sizing():
    from triton_backend.model.gpt import fit_blocks, kv_bytes_per_token

    init_parallel(1, "cpu")
    per_token = kv_bytes_per_token(ARCH, 1, torch.float32)
    assert per_token == 2 * 2 * 4 * 16 * 4  # K and V, layers, heads, head dim, float32
    assert kv_bytes_per_token(ARCH, 2, torch.bfloat16) == per_token // 4  # half the heads, half the bytes
    assert fit_blocks(8, 64, 16, per_token, None) == 8 * 4  # no budget: max_slots full contexts
    assert fit_blocks(8, 64, 16, per_token, 10 * 16 * per_token + 1) == 10
    assert fit_blocks(8, 60, 16, per_token, 2**40) == 8 * 4  # never more than max_slots full contexts
    assert fit_blocks(8, 64, 16, per_token, 4 * 16 * per_token) == 4  # exactly one full context
    with pytest.raises(ValueError, match=r"needs 0.1 MiB for one sequence of the full 64-token context but only "
                                         r"0.1 MiB are available: raise KV_CACHE_MB"):
        fit_blocks(8, 64, 16, per_token, 4 * 16 * per_token - 1)
    cache = CachedGPT(build_model(ARCH), ARCH, max_slots=3, block_size=16).cache
    assert cache.nbytes() == 3 * 4 * 16 * per_token and cache.num_blocks == 12
    assert CachedGPT(build_model(ARCH), ARCH, max_slots=3, num_blocks=5).cache.num_blocks == 5


def test_rotary_positions_follow_the_rope_definition():
    """The cache-aware rotary must rotate as RoPE is defined (Megatron's non-interleaved form): a wrong frequency
    or base would still agree between our cached and uncached paths, which share it."""
    from triton_backend.model.attention import Rotary

    config = context_model(ROTARY_ARCH, seed=1).config
    for base, percent in ((10000, 1.0), (500, 0.5)):
        rot = int(16 * percent)
        inv_freq = 1.0 / base ** (torch.arange(0, rot, 2).float() / rot)
        t = torch.randn(7, 2, 4, 16, generator=torch.Generator().manual_seed(base))  # [s, b, heads, d]
        angles = torch.arange(7).float()[:, None] * inv_freq  # [s, rot / 2]
        cos, sin = (torch.cat([f(angles)] * 2, dim=1)[:, None, None] for f in (torch.cos, torch.sin))
        x, rest = t[..., :rot], t[..., rot:]
        rotated = torch.cat([-x[..., rot // 2:], x[..., : rot // 2]], dim=-1)
        expected = torch.cat([x * cos + rotated * sin, rest], dim=-1)
        ours = Rotary(config, 16, percent, base)
        torch.testing.assert_close(ours(t, torch.arange(7)[None].expand(2, -1)), expected)
        # one token per row, each at its own position, as a decode step calls it
        torch.testing.assert_close(ours(t[5:6], torch.tensor([[5], [5]])), expected[5:6])


@pytest.mark.parametrize("kernel", [True, False], ids=["C kernel", "torch operations"])
def test_rotary_rotates_as_megatron_does_bit_for_bit(kernel, monkeypatch):
    """The cached path's own rotation (angles made once per step) gives Megatron's unfused RoPE exactly, and a
    config asking for another form (interleaved) goes through Megatron's own function."""
    import dataclasses

    from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb

    from triton_backend.model import rotary_kernel
    from triton_backend.model.attention import Rotary

    if not kernel:  # as where no compiler is found
        monkeypatch.setattr(rotary_kernel.KERNEL, "_library", None)
        monkeypatch.setattr(rotary_kernel.KERNEL, "_failed", True)
    config = context_model(ROTARY_ARCH, seed=1).config
    t = torch.randn(5, 3, 4, 16, generator=torch.Generator().manual_seed(3))
    positions = torch.tensor([[0, 1, 2, 3, 4], [7, 8, 9, 10, 11], [30, 31, 32, 33, 34]])
    for cfg in (config, dataclasses.replace(config, rotary_interleaved=True)):
        for percent in (1.0, 0.5):
            ours = Rotary(cfg, 16, percent, 10000)
            assert ours.plain == (not cfg.rotary_interleaved)
            expected = apply_rotary_pos_emb(t, ours.freqs(positions), config=cfg)
            assert torch.equal(ours(t, positions), expected)
            assert torch.equal(ours.rotate(t, ours.angles(positions)), expected)
            # a step's packed rows (through the CPU kernel for the plain form), contiguous and as a strided view
            packed = positions[:1]
            want = apply_rotary_pos_emb(t[:, :1], ours.freqs(packed), config=cfg)[:, 0]
            wide = torch.randn(5, 4, 24, generator=torch.Generator().manual_seed(4))
            wide[:, :, 3:19] = t[:, 0]
            for x in (t[:, 0].contiguous(), wide[:, :, 3:19]):
                assert torch.equal(ours.rotate_packed(x, ours.angles(packed)), want)
    assert (rotary_kernel.KERNEL.library() is not None) == kernel  # the plain form's packed rows went through it


def test_load_reports_the_blocks_in_use(model):
    engine = Engine(CachedGPT(model, ARCH, max_slots=4, block_size=4), VOCAB, EOS).start()
    try:
        hold = threading.Event()
        engine.add_step_hook(lambda: hold.wait(10))
        gens = submit_together(engine, PROMPTS[:3], [SamplingParams(max_tokens=30, end_id=-1)] * 3)
        wait_until(lambda: all(g.tokens for g in gens), what="three running sequences")
        # prompts of 5, 5 and 1 tokens and their first token: 2 + 2 + 1 blocks of 4 (of 4 x 16)
        assert engine.load() == {"running": 3, "waiting": 0, "kv_blocks_used": 5, "kv_usage": 5 / 64,
                                 "cancelled": 0, "prefix_queried_tokens": 11, "prefix_hit_tokens": 0}
        hold.set()
        assert all(g.wait(30) for g in gens)
    finally:
        engine.stop()


def test_requests_still_waiting_when_the_engine_stops_get_an_error(model):
    engine = Engine(CachedGPT(model, ARCH, max_slots=1), VOCAB, EOS).start()
    hold = threading.Event()
    engine.add_step_hook(lambda: hold.wait(10))
    running = engine.submit(PROMPTS[0], SamplingParams(max_tokens=30, end_id=-1))
    waiting = engine.submit(PROMPTS[1], SamplingParams(max_tokens=30, end_id=-1))
    wait_until(lambda: running.tokens, what="a first token")
    assert engine.load()["waiting"] == 1
    stopper = threading.Thread(target=engine.stop)
    stopper.start()
    hold.set()
    stopper.join(30)
    for g in (running, waiting):
        assert g.done and g.error == "the server is shutting down"
    assert not engine.alive() and engine.fatal is None


def test_stats_summary_and_the_stall_watchdog(model):
    from triton_backend.engine.engine import EngineStats

    stats = EngineStats(steps=4, prefills=1, requests_finished=2, tokens_generated=10, rows_decoded=8,
                        step_seconds=0.02)
    assert stats.summary() == "2 requests, 10 tokens in 4 steps (1 with prompts): 2.0 rows and 5.0 ms per step, " \
                              "0.0 s busy"
    one = EngineStats(steps=1, requests_finished=1, tokens_generated=3, rows_decoded=1, step_seconds=0.2)
    assert one.summary() == "1 requests, 3 tokens in 1 steps (0 with prompts): 1.0 rows and 200.0 ms per step, " \
                            "0.2 s busy"
    assert EngineStats().summary().startswith("0 requests, 0 tokens in 0 steps")
    engine = Engine(CachedGPT(model, ARCH, max_slots=1), VOCAB, EOS)
    assert not engine.stalled(0.0)  # no step running
    engine.step_started = time.monotonic() - 5
    assert engine.stalled(1.0) and not engine.stalled(10.0)


def test_the_prefill_budget_splits_prompts_into_chunks(model):
    """``prefill_tokens`` bounds the prompt tokens of one step; a prompt past what is left of it runs over several
    steps (chunked prefill), beside the decodes of the others."""
    engine = Engine(CachedGPT(model, ARCH, max_slots=8, block_size=4), VOCAB, EOS, prefill_tokens=10).start()
    try:
        prompts = [[7, 8, 9, 10, 11], [12, 13, 14, 15, 16], [17, 18, 19, 20, 21], [30, 5, 6, 7] * 3]
        gens = submit_together(engine, prompts, [SamplingParams(max_tokens=4, end_id=-1, temperature=0.0)] * 4)
        assert all(g.wait(60) and g.error is None for g in gens)
        # step 1: 5 + 5; step 2: 5 + the first 5 of the 12-token prompt; step 3: its last 7
        assert (engine.stats.prefills, engine.stats.prompt_chunks) == (3, 5)
        assert [g.tokens for g in gens] == [greedy_uncached(model, p, 4) for p in prompts]
    finally:
        engine.stop()


@pytest.fixture(scope="module")
def text_engine(tiny_tokenizer):
    model = context_model(TEXT_ARCH, seed=2)
    engine = Engine(CachedGPT(model, TEXT_ARCH, max_slots=4), tiny_tokenizer.vocab_size, tiny_tokenizer.eos_id,
                    tokenizer=tiny_tokenizer).start()
    yield engine
    engine.stop()


def contains(tokens: list[int], sequence: list[int]) -> bool:
    n = len(sequence)
    return any(tokens[i:i + n] == sequence for i in range(len(tokens) - n + 1))


def test_stop_words_end_a_generation_on_its_text(text_engine, tiny_tokenizer):
    prompt = tiny_tokenizer.encode("The for statement")
    whole = run(text_engine, prompt, temperature=0.0, max_tokens=40)
    text = tiny_tokenizer.decode(whole.tokens)
    stop = text[12:15]
    assert stop.strip(), text
    g = text_engine.submit(prompt, SamplingParams(max_tokens=40, end_id=-1, temperature=0.0, stop_words=(stop,)),
                           track_text=True)
    assert g.wait(60) and g.error is None and g.finish_reason == "stop"
    assert g.tokens == whole.tokens[:len(g.tokens)] and len(g.tokens) < len(whole.tokens)
    assert g.tracker.final_text == text[:text.index(stop)]


def test_bad_words_are_banned_as_written_and_after_a_space(text_engine, tiny_tokenizer):
    prompt = tiny_tokenizer.encode("The for statement")
    whole = run(text_engine, prompt, temperature=0.0, max_tokens=40)
    # Text the greedy output holds as tokens (as written, or after a space): banning it must change the output.
    # (A random model's text is mostly byte pieces, so the candidates are its printable tokens.)
    pieces = {tiny_tokenizer.decode([t]).strip() for t in whole.tokens}
    words = sorted(w for w in pieces if w.isprintable() and w
                   and any(contains(whole.tokens, tiny_tokenizer.encode(v)) for v in (w, " " + w)))
    assert words, tiny_tokenizer.decode(whole.tokens)
    for word in words[:3]:
        g = run(text_engine, prompt, temperature=0.0, max_tokens=40, bad_words=(word,))
        for variant in (word, " " + word):
            assert not contains(g.tokens, tiny_tokenizer.encode(variant)), (word, variant)
        assert g.tokens != whole.tokens


def test_track_text_follows_the_text_without_stop_words(text_engine, tiny_tokenizer):
    prompt = tiny_tokenizer.encode("The for statement")
    assert text_engine.submit(prompt, SamplingParams(max_tokens=2), track_text=False).tracker is None
    g = text_engine.submit(prompt, SamplingParams(max_tokens=12, end_id=-1, temperature=0.0), track_text=True)
    assert g.wait(60) and g.tracker is not None
    assert g.tracker.final_text == tiny_tokenizer.decode_continuation(prompt, g.tokens)


def test_bad_sequences_hold_the_word_as_written_and_after_a_space(text_engine, tiny_tokenizer):
    banned = text_engine._bad_sequences(("statement", "x"))
    expected = {tuple(tiny_tokenizer.encode(v)) for v in ("statement", " statement", "x", " x")}
    assert set(banned) == expected and len(expected) == 4
