import math

import torch

from preprocessing.params import SamplingParams
from triton_backend.sampling import RowSampler, sample

VOCAB = 50


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
    x = logits(3, seed=5)
    alone = [sample(x[1:2], [row(seed=42)], VOCAB)[0][0] for _ in range(1)]
    together = sample(x, [row(seed=7), row(seed=42), row(seed=9, temperature=0.0)], VOCAB)[0][1]
    assert alone[0] == together


def test_min_length_suppresses_end_id():
    x = torch.zeros(1, VOCAB)
    x[0, 2] = 50.0  # end_id overwhelmingly likely
    r = row(temperature=0.0, min_length=2, end_id=2)
    assert sample(x, [r], VOCAB)[0][0] != 2
    r.generated = [5, 6]
    assert sample(x, [r], VOCAB)[0][0] == 2


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
