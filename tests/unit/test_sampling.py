import logging
import math

import pytest
import torch

from preprocessing.params import SamplingParams
from triton_backend.engine import sampling, sampling_kernel
from triton_backend.engine.sampling import RowSampler, _apply_penalties, alternatives, model_log_probs, sample

VOCAB = 50
APPLIES = sampling_kernel.applies


@pytest.fixture(autouse=True, params=["kernel", "torch"])
def path(request, monkeypatch):
    """Every test twice: through the CPU sampling kernel where it applies, and through torch's operations alone
    (the path on CUDA, and wherever no compiler is found)."""
    if request.param == "kernel":
        assert sampling_kernel.KERNEL.library() is not None  # really the kernel, not a silent fallback
    else:
        monkeypatch.setattr(sampling_kernel, "applies", lambda logits: False)
    return request.param


def row(seed=0, prompt=(1, 2), end_id=2, **kw):
    return RowSampler(SamplingParams(max_tokens=10, **kw), list(prompt), end_id, seed)


def logits(batch=1, seed=0, padded=64):
    return torch.randn(batch, padded, generator=torch.Generator().manual_seed(seed))


def test_greedy_is_argmax_within_the_real_vocabulary():
    x = logits(3)
    x[:, VOCAB + 3] = 100.0  # Megatron's vocabulary padding must never be chosen
    tokens, _ = sample(x, [row(temperature=0.0) for _ in range(3)], VOCAB)
    assert tokens == x[:, :VOCAB].argmax(-1).tolist()


def test_top_k_1_and_tiny_top_p_equal_greedy():
    x = logits(4)
    greedy, _ = sample(x, [row(temperature=0.0)] * 4, VOCAB)
    assert sample(x, [row(seed=i, top_k=1) for i in range(4)], VOCAB)[0] == greedy
    assert sample(x, [row(seed=i, top_p=1e-6) for i in range(4)], VOCAB)[0] == greedy


def test_top_k_limits_the_choice():
    x = logits(1)
    allowed = set(x[0, :VOCAB].topk(3).indices.tolist())
    seen = {sample(x, [row(seed=s, top_k=3, temperature=5.0)], VOCAB)[0][0] for s in range(200)}
    assert seen <= allowed and len(seen) > 1


def test_sampling_frequencies_follow_the_softmax():
    x = torch.full((1, VOCAB), -1e9)
    x[0, :3] = torch.tensor([0.0, math.log(2), math.log(7)])  # probabilities 0.1, 0.2, 0.7
    r = row(seed=123)
    counts = torch.zeros(3)
    for _ in range(2000):
        token = sample(x, [r], VOCAB)[0][0]
        r.accept(token)  # as the engine does: the next token gets a fresh draw
        counts[token] += 1
    assert torch.allclose(counts / 2000, torch.tensor([0.1, 0.2, 0.7]), atol=0.04)


def test_seeded_rows_draw_the_same_tokens_in_any_batch():
    """300 seeded draws in a row, alone and with other rows around it (seeded, greedy, truncated): the same tokens."""
    steps = [logits(4, seed=100 + i) for i in range(300)]
    alone, batched = row(seed=42), [row(seed=7), row(seed=42), row(seed=9, temperature=0.0), row(seed=3, top_k=5)]
    for x in steps:
        token = sample(x[1:2], [alone], VOCAB)[0][0]
        tokens = sample(x, batched, VOCAB)[0]
        assert tokens[1] == token
        alone.accept(token)
        for r, t in zip(batched, tokens):
            r.accept(t)
    assert len(set(alone.generated)) > 10  # really sampled, not a constant


def test_different_seeds_draw_different_tokens():
    x = logits(1, seed=5)
    firsts = {sample(x, [row(seed=s, temperature=2.0)], VOCAB)[0][0] for s in range(50)}
    assert len(firsts) > 5


def test_min_length_suppresses_end_id_until_reached_then_allows_it():
    x = torch.zeros(1, VOCAB)
    x[0, 2] = 50.0  # end_id overwhelmingly likely
    for min_length in (0, 1, 3):
        for params in ({"temperature": 0.0}, {"seed": 1}, {"seed": 1, "top_k": 3}):
            r = row(min_length=min_length, end_id=2, **params)
            tokens = []
            while len(tokens) <= min_length:
                token = sample(x, [r], VOCAB)[0][0]
                if token == 2:
                    break
                tokens.append(token)
                r.accept(token)
            assert len(tokens) == min_length, (min_length, params)


def test_penalties_change_the_logits_by_their_definition():
    """Repetition divides positive (multiplies negative) logits of every token seen in prompt or output; presence
    subtracts once and frequency once per occurrence, for generated tokens only."""
    x = logits(1, seed=3)[:, :VOCAB]
    r = row(prompt=(1, 2, 3), repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.25)
    r.generated = [7, 7, 9, 7]
    expected = x.clone()
    for t in (1, 2, 3, 7, 9):
        value = float(x[0, t])
        expected[0, t] = value / 1.3 if value > 0 else value * 1.3
    expected[0, 7] -= 0.5 + 0.25 * 3
    expected[0, 9] -= 0.5 + 0.25 * 1
    got = x.clone()
    _apply_penalties(got, [r])
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    plain = x.clone()
    _apply_penalties(plain, [row(prompt=(1, 2, 3))])
    assert torch.equal(plain, x)  # the defaults change nothing


def test_negative_presence_and_frequency_penalties_favour_repeats():
    x = torch.zeros(1, VOCAB)
    x[0, 8] = 1.0
    r = row(temperature=0.0, prompt=(1,), presence_penalty=-0.6, frequency_penalty=-0.3)
    r.generated = [7, 7]  # 7: 0 + 0.6 + 0.6 = 1.2 > 1.0
    assert sample(x, [r], VOCAB)[0][0] == 7
    r.generated = [7]  # 7: 0 + 0.6 + 0.3 = 0.9 < 1.0
    assert sample(x, [r], VOCAB)[0][0] == 8


def test_repetition_and_frequency_penalties_push_away_repeated_tokens():
    x = torch.zeros(1, VOCAB)
    x[0, 7], x[0, 8] = 2.0, 1.9
    assert sample(x, [row(temperature=0.0, prompt=(7,))], VOCAB)[0][0] == 7
    assert sample(x, [row(temperature=0.0, prompt=(7,), repetition_penalty=1.2)], VOCAB)[0][0] == 8
    r = row(temperature=0.0, prompt=(1,), frequency_penalty=0.2)
    r.generated = [7]
    assert sample(x, [r], VOCAB)[0][0] == 8


def test_logprobs_are_the_model_distribution():
    x = logits(2)
    tokens, logprobs = sample(x, [row(temperature=0.0), row(seed=3)], VOCAB)
    expected = torch.log_softmax(x[:, :VOCAB], -1)
    for i, (t, lp) in enumerate(zip(tokens, logprobs)):
        assert abs(expected[i, t].item() - lp) < 1e-5


def test_bad_word_sequences_are_never_completed():
    x = torch.zeros(1, VOCAB)
    x[0, 5], x[0, 8], x[0, 9] = 3.0, 2.0, 1.0
    r = RowSampler(SamplingParams(max_tokens=5, temperature=0.0), [1], 2, 0, bad=((5,), (7, 8)))
    assert sample(x, [r], VOCAB)[0][0] == 8  # single-token bad word banned everywhere
    r.generated = [7]
    assert sample(x, [r], VOCAB)[0][0] == 9  # 8 would complete the bad sequence 7, 8
    r.generated = [3]
    assert sample(x, [r], VOCAB)[0][0] == 8
    at_prompt_end = RowSampler(SamplingParams(max_tokens=5, temperature=0.0), [1, 7], 2, 0, bad=((5,), (7, 8)))
    assert sample(x, [at_prompt_end], VOCAB)[0][0] == 9  # the prompt's last token starts the bad sequence
    longer = RowSampler(SamplingParams(max_tokens=5, temperature=0.0), [4, 7], 2, 0, bad=((5,), (4, 7, 1, 8)))
    longer.generated = [1]
    assert sample(x, [longer], VOCAB)[0][0] == 9  # a sequence spanning prompt and generated tokens
    assert longer.tail(3) == (4, 7, 1) and longer.tail(1) == (1,) and longer.tail(5) == (4, 7, 1)


def test_top_p_decay_narrows_top_p_token_by_token_down_to_its_bound():
    """Megatron's top_p_decay / top_p_bound: token t is drawn with max(top_p x decay^t, bound)."""
    x = three_tokens(0.1, 0.2, 0.7)  # ranked: token 2 (0.7), token 1 (0.2), token 0 (0.1)
    decaying = forced(0.05, top_p=1.0, top_p_decay=0.5, top_p_bound=0.0)
    assert decaying.top_p == 1.0 and sample(x, [decaying], VOCAB)[0] == [0]  # untruncated at first
    decaying.accept(0)
    decaying._draw = 0.95
    assert decaying.top_p == 0.5 and sample(x, [decaying], VOCAB)[0] == [2]  # only the 0.7 token is kept
    bounded = forced(0.95, top_p=1.0, top_p_decay=0.5, top_p_bound=0.8)
    bounded.accept(0)
    bounded.accept(0)
    bounded._draw = 0.95
    assert bounded.top_p == 0.8 and sample(x, [bounded], VOCAB)[0] == [1]  # 0.7 and 0.2 kept at 0.8
    assert SamplingParams(max_tokens=4, top_p=0.9, top_p_bound=0.5).top_p_at(10) == 0.9  # no decay: no bound
    assert SamplingParams(max_tokens=4, top_p=0.8, top_p_decay=0.5).top_p_at(2) == pytest.approx(0.2)


def test_the_tiniest_temperatures_pick_the_argmax_instead_of_failing():
    """1e-38 and smaller are valid temperatures: the logits over them overflowed to inf and the softmax to NaN."""
    x = logits(3)
    greedy, _ = sample(x, [row(temperature=0.0)] * 3, VOCAB)
    for t in (1.175494351e-38, 1e-45):
        for extra in ({}, {"top_k": 1}, {"top_p": 0.5}, {"top_k": 5, "top_p": 0.9}):
            tokens, logprobs = sample(x, [row(seed=i, temperature=t, **extra) for i in range(3)], VOCAB)
            assert tokens == greedy, (t, extra)
            assert all(math.isfinite(lp) for lp in logprobs)


def test_a_row_sampled_again_draws_the_same_number():
    """The engine samples a step's rows one by one after a failure; seeded rows must not draw twice."""
    x = logits(1)
    again = row(seed=7, temperature=1.0)
    drawn = again.uniform()
    first = sample(x, [again], VOCAB)[0]
    assert sample(x, [again], VOCAB)[0] == first  # no token accepted in between: the same draw
    assert again.uniform() == drawn
    again.accept(first[0])
    assert again.uniform() != drawn  # the next token's own draw
    fresh = row(seed=7, temperature=1.0)
    assert sample(x, [fresh], VOCAB)[0] == first


def forced(u: float, **kw) -> RowSampler:
    """A row whose next uniform draw is ``u`` (what its generator would have given), to pin the sampling rule."""
    r = row(**kw)
    r._draw = u
    return r


def three_tokens(*probabilities: float) -> torch.Tensor:
    """Logits over VOCAB whose softmax puts ``probabilities`` on tokens 0, 1, 2 (and nothing elsewhere)."""
    x = torch.full((1, VOCAB), -1e9)
    for token, p in enumerate(probabilities):
        x[0, token] = math.log(p) if p > 0 else -1e9
    return x


def test_temperature_only_sampling_is_the_inverse_cdf_in_vocabulary_order():
    """Seeded texts stay the same from one release to the next only if the rule does: token i is chosen when the
    draw falls in [cdf(i-1), cdf(i)) of the vocabulary-ordered distribution."""
    x = three_tokens(0.1, 0.2, 0.7)
    for u, token in ((0.0, 0), (0.05, 0), (0.15, 1), (0.29, 1), (0.35, 2), (0.999, 2)):
        assert sample(x, [forced(u)], VOCAB)[0] == [token], u
    both = sample(torch.cat([x, x]), [forced(0.15), forced(0.95)], VOCAB)[0]
    assert both == [1, 2]  # each row with its own draw


def test_a_draw_of_zero_never_picks_a_token_without_probability():
    x = three_tokens(0.0, 0.5, 0.5)
    assert sample(x, [forced(0.0)], VOCAB)[0] == [1]


def test_a_draw_that_rounds_to_the_whole_mass_picks_the_last_token_with_probability():
    """The rounding guard of the vocabulary-ordered rule: a draw equal to the total mass stops at the last token
    that has probability, per row, not at the zero-probability tokens after it."""
    x = torch.cat([three_tokens(0.5, 0.5, 0.0), three_tokens(0.3, 0.3, 0.4)])
    assert sample(x, [forced(1.0), forced(1.0)], VOCAB)[0] == [1, 2]


def test_top_k_top_p_sampling_is_the_inverse_cdf_in_rank_order():
    x = three_tokens(0.1, 0.2, 0.7)  # ranked: token 2 (0.7), token 1 (0.2), token 0 (0.1)
    for u, token in ((0.0, 2), (0.65, 2), (0.75, 1), (0.89, 1), (0.95, 0)):
        assert sample(x, [forced(u, top_k=3)], VOCAB)[0] == [token], u
    # top_k=2 keeps 0.7 and 0.2, renormalised: token 2 below 0.7 / 0.9 of the mass, token 1 above
    for u, token in ((0.7, 2), (0.8, 1), (0.95, 1)):
        assert sample(x, [forced(u, top_k=2)], VOCAB)[0] == [token], u
    # top_p=0.75 keeps tokens until 0.75 of the mass is ranked above: 0.7 and 0.2 again
    for u, token in ((0.7, 2), (0.8, 1), (0.95, 1)):
        assert sample(x, [forced(u, top_p=0.75)], VOCAB)[0] == [token], u
    assert sample(x, [forced(0.99, top_p=0.5)], VOCAB)[0] == [2]  # the top token is always kept
    rows = [forced(0.8, top_k=2), forced(0.8, top_k=3), forced(0.95, top_k=3)]
    assert sample(torch.cat([x, x, x]), rows, VOCAB)[0] == [1, 1, 0]


def test_temperature_reshapes_the_distribution_before_the_draw():
    x = three_tokens(0.1, 0.2, 0.7)
    # At temperature 2 the probabilities are proportional to sqrt(0.1), sqrt(0.2), sqrt(0.7): 0.193, 0.274, 0.533.
    for extra in ({}, {"top_k": 3}):
        first = 0 if not extra else 2
        cuts = (0.18, 0.20) if not extra else (0.52, 0.55)
        assert sample(x, [forced(cuts[0], temperature=2.0, **extra)], VOCAB)[0] == [first]
        assert sample(x, [forced(cuts[1], temperature=2.0, **extra)], VOCAB)[0] != [first]


def test_draws_across_the_whole_vocabulary_follow_the_inverse_cdf():
    """Every token has probability here (no zero tail), so a draw near 1 must reach the last tokens of the order."""
    x = logits(1, seed=9)[:, :VOCAB]
    probs = torch.softmax(x[0], dim=0)
    ranked = probs.argsort(descending=True)
    for u in (0.001, 0.3, 0.7, 0.99, 0.9999):
        by_vocabulary = int(torch.searchsorted(probs.cumsum(0), torch.tensor([u]), right=True).clamp(max=VOCAB - 1))
        by_rank = int(ranked[torch.searchsorted(probs[ranked].cumsum(0), torch.tensor([u])).clamp(max=VOCAB - 1)])
        assert sample(x, [forced(u)], VOCAB)[0] == [by_vocabulary], u
        assert sample(x, [forced(u, top_k=VOCAB)], VOCAB)[0] == [by_rank], u


def test_min_length_holds_back_token_0_too_and_a_penalty_of_2_applies():
    x = torch.zeros(1, VOCAB)
    x[0, 0] = 50.0  # end_id 0 overwhelmingly likely
    assert sample(x, [row(temperature=0.0, end_id=0, min_length=1)], VOCAB)[0] != [0]
    assert sample(x, [row(temperature=0.0, end_id=0)], VOCAB)[0] == [0]
    y = torch.zeros(1, VOCAB)
    y[0, 7], y[0, 8] = 2.0, 1.5
    assert sample(y, [row(temperature=0.0, prompt=(7,), repetition_penalty=2.0)], VOCAB)[0] == [8]  # 2.0 / 2 < 1.5


def test_model_log_probs_are_the_log_softmax_over_the_real_vocabulary():
    x = logits(2)
    x[:, VOCAB + 1] = 50.0  # a padding id: no share of the probability, whatever its logit
    out = model_log_probs(x, VOCAB)
    assert out.shape == (2, VOCAB)
    assert torch.allclose(out, torch.log_softmax(x[:, :VOCAB], dim=1), atol=1e-6)
    assert x[0, VOCAB + 1] == 50.0  # the caller's logits are left as they were


def test_alternatives_are_each_rows_most_likely_tokens_in_order():
    log_probs = torch.log_softmax(logits(3)[:, :VOCAB], dim=1)
    found = alternatives(log_probs, [1, 3, 2])
    for row, (ids, values) in enumerate(found):
        best = log_probs[row].topk(3)
        k = [1, 3, 2][row]
        assert ids == best.indices[:k].tolist() and values == pytest.approx(best.values[:k].tolist())
    assert alternatives(log_probs, []) == []


@pytest.mark.parametrize("edit", ["repetition", "presence", "frequency", "min_length", "bad_words"])
def test_penalties_and_bans_work_on_a_copy_of_the_callers_logits(edit):
    """``sample`` copies the logits only for rows it changes; every kind of change must be on the copy (the
    caller's logits are the model's, read again when a step is sampled row by row, and are inference tensors in
    the engine, which refuse changes in place)."""
    params = {"repetition": {"repetition_penalty": 1.5}, "presence": {"presence_penalty": 0.7},
              "frequency": {"frequency_penalty": 0.7}, "min_length": {"min_length": 3}, "bad_words": {}}[edit]
    sampler = row(temperature=0.0, **params)
    if edit == "bad_words":
        sampler.bad = ((5,),)
    sampler.accept(7)  # a generated token for the presence and frequency penalties
    x = logits(1)
    x[0, 7] = x[0, 5] = x[0, 2] = 50.0  # each change has a large logit to move: 7 generated, 5 bad, 2 the end id
    before = x.clone()
    sample(x, [sampler], VOCAB)
    assert torch.equal(x, before)


def test_the_kernel_draws_what_torch_draws():
    """Greedy and temperature rows through the kernel against torch's operations on the same rows and draws: the
    same tokens, except where a draw falls within rounding of the boundary between two tokens, and the same
    log-probs. Rows of a real vocabulary's size, logits at several scales, draws spread over [0, 1)."""
    n, vocab = 64, 4096
    x = torch.randn(n, vocab + 32, generator=torch.Generator().manual_seed(5)) * torch.linspace(0.5, 8, n)[:, None]
    params = [dict(temperature=0.0) if i % 4 == 0 else dict(temperature=[0.3, 0.8, 1.7][i % 3]) for i in range(n)]
    draws = torch.rand(n, generator=torch.Generator().manual_seed(6)).tolist()

    def rows():
        made = [row(seed=i, end_id=-1, **p) for i, p in enumerate(params)]
        for r, u in zip(made, draws):
            r._draw = u
        return made

    got, got_lp = sample(x, rows(), vocab, kernel=True)
    want, want_lp = sample(x, rows(), vocab, kernel=False)
    assert got_lp == pytest.approx(want_lp, abs=1e-5)
    for i, (a, b) in enumerate(zip(got, want)):
        if a == b:
            continue
        assert params[i]["temperature"] > 0, i  # greedy rows never differ
        w = torch.softmax(x[i, :vocab].double() / params[i]["temperature"], 0).cumsum(0)
        assert abs(w[min(a, b)].item() - draws[i]) < 1e-5, i  # the draw sat on the boundary between them
    assert sum(a != b for a, b in zip(got, want)) <= 1


def test_edited_and_truncated_rows_beside_kernel_rows_are_chosen_by_torch(path):
    """In one batch: rows the kernel samples, a row with a ban and a penalty, a top-k row. The banned token is never
    chosen even where it is the model's favourite; the log-probs stay the model's own."""
    x = logits(1).repeat(4, 1)  # the same logits on every row: the banned row's favourite is the greedy row's
    top = x[0, :VOCAB].argmax().item()
    banned = row(seed=1, temperature=0.0, end_id=top, min_length=5, repetition_penalty=1.3)
    batch = [row(seed=0, temperature=0.0), banned, row(seed=2, temperature=0.7), row(seed=3, top_k=2)]
    tokens, logprobs = sample(x.clone(), batch, VOCAB)
    assert tokens[0] == top and tokens[1] != top
    assert tokens[3] in x[3, :VOCAB].topk(2).indices.tolist()
    expected = torch.log_softmax(x[:, :VOCAB], 1)[torch.arange(4), torch.tensor(tokens)]
    assert logprobs == pytest.approx(expected.tolist(), abs=1e-5)


def test_a_sampling_kernel_that_cannot_be_built_leaves_torch_to_sample_with_one_log_line(monkeypatch, caplog):
    from triton_backend import native

    monkeypatch.setattr(sampling_kernel, "applies", APPLIES)  # the real check, in both runs of this test
    monkeypatch.setattr(sampling_kernel.KERNEL, "_library", None)
    monkeypatch.setattr(sampling_kernel.KERNEL, "_failed", False)
    monkeypatch.setattr(native.shutil, "which", lambda name: None)
    x = logits(2)
    with caplog.at_level(logging.WARNING, logger="triton_backend.native"):
        assert not sampling_kernel.applies(x)
        tokens, _ = sample(x, [row(temperature=0.0), row(seed=1, temperature=0.9)], VOCAB)
        sample(x, [row(temperature=0.0)], VOCAB)
    assert tokens[0] == x[0, :VOCAB].argmax().item()
    assert [r.getMessage() for r in caplog.records] == [
        "the CPU sampling kernel is not available, torch operations sample: no C compiler (cc or gcc) on PATH"]


def test_a_nan_logit_row_still_gives_a_token_in_the_vocabulary():
    """A broken model's NaN logits must not send the choice past the row (the C kernel's search is bounded)."""
    x = logits(2)
    x[0] = float("nan")
    tokens, _ = sample(x, [row(temperature=0.0), row(seed=1, temperature=0.7)], VOCAB)
    assert all(0 <= t < VOCAB for t in tokens)


def test_cpu_float32_logits_go_through_the_kernel_unless_told_otherwise(monkeypatch):
    calls = []
    real = sampling_kernel.sample_rows
    monkeypatch.setattr(sampling_kernel, "applies", APPLIES)
    monkeypatch.setattr(sampling_kernel, "sample_rows", lambda *a: calls.append(1) or real(*a))
    x = logits(2)
    rows = [row(temperature=0.0), row(seed=1, temperature=0.9)]
    want = sample(x, rows, VOCAB)
    assert calls == [1]
    assert sample(x, rows, VOCAB, kernel=False)[0] == want[0] and calls == [1]  # torch alone: the same tokens


def test_log_probs_hold_for_rows_of_very_different_scales():
    """Each row's log-sum-exp is shifted by its own maximum: one shift for all rows would underflow a row whose
    logits sit 200 below another's."""
    x = logits(2)
    x[0] += 200.0
    x[1] -= 200.0
    tokens, logprobs = sample(x, [row(temperature=0.0), row(seed=1, temperature=0.9)], VOCAB)
    expected = torch.log_softmax(x[:, :VOCAB].double(), 1)[torch.arange(2), torch.tensor(tokens)]
    assert logprobs == pytest.approx(expected.tolist(), abs=1e-4)


def test_a_rows_penalty_state_lives_on_the_device_and_grows_with_each_token():
    """The penalties read each row's ``TokenCounts``: made once (the prompt uploaded once), then each accepted token
    scattered in; the same tensors all along, and the logits as the definition gives them at every step."""
    r = row(prompt=(1, 2, 3), repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.25)
    x = logits(1, seed=5)[:, :VOCAB]
    made = None
    for token in (7, 7, 9, 1, 7):
        got = x.clone()
        _apply_penalties(got, [r])
        state = r.counts
        made = made or (state.seen, state.counts)
        assert state.seen is made[0] and state.counts is made[1]  # brought up to date, never rebuilt
        seen = set(r.prompt) | set(r.generated)
        assert sorted(state.seen.ids.tolist()) == sorted(seen) and state.seen.size == len(seen)
        assert sorted(state.generated.ids.tolist()) == sorted(set(r.generated))
        assert state.counts.tolist() == [float(r.generated.count(t)) for t in range(VOCAB)]
        want = x.clone()
        for t in seen:
            value = float(x[0, t])
            want[0, t] = value / 1.3 if value > 0 else value * 1.3
        for t in set(r.generated):
            want[0, t] -= 0.5 + 0.25 * r.generated.count(t)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
        r.accept(token)
    r.generated = [4]  # a new history (a test's, or a sequence read again) is taken whole
    _apply_penalties(x.clone(), [r])
    assert r.counts.seen is not made[0] and r.counts.counts.nonzero()[:, 0].tolist() == [4]


def test_distinct_ids_grow_past_their_buffer_and_keep_each_id_once():
    ids = sampling.DistinctIds("cpu")
    ids.add([5, 5, 9])
    ids.add(list(range(100)))  # past the first buffer of 64
    assert ids.ids.tolist() == [5, 9] + [t for t in range(100) if t not in (5, 9)] and len(ids.buffer) >= 100


@pytest.mark.parametrize("wait", [True, False])
def test_a_draw_past_the_whole_mass_takes_the_last_token_with_any(wait):
    """Both ways (the host's look on CPU, the extra pass on CUDA) give the last token with mass."""
    cdf = torch.tensor([[0.2, 0.7, 0.7, 0.7], [0.5, 1.0, 1.0, 1.0]])
    total = cdf[:, -1:]
    pick = torch.tensor([4, 1])  # row 0's draw went past the end
    assert sampling._within(pick.clone(), cdf, total, wait).tolist() == [1, 1]
