"""The step's fast path (``model/functional.py``) against Megatron's own forward over the same weights and cache:
the same logits, bit for bit, for the same packed steps, and the same tokens and log-probs through the engine, at
TP 1 and 2; and the static-shape decode steps that CUDA graphs replay (``model/graphs.py``, run eagerly here)
against the eager path."""

import logging

import numpy as np
import pytest
import torch

from preprocessing.params import SamplingParams
from triton_backend.engine.engine import Engine
from triton_backend.model import functional, graphs
from triton_backend.model.gpt import CachedGPT

from .models import ARCH, EOS, ROTARY_ARCH, VOCAB, assert_uses_the_whole_context, context_model, run_two_ranks

PROMPTS = [[5, 17, 33, 4, 90, 61, 12], [6, 17, 33, 4, 90, 61, 12, 8, 77, 3, 40, 9, 100, 64, 1, 22, 35, 48, 50],
           [7, 1], [30, 31, 32, 34, 36, 37, 38, 39, 41, 42, 43]]


@pytest.fixture(scope="module", params=["gpt", "rotary"])
def arch_and_model(request):
    arch = ARCH if request.param == "gpt" else ROTARY_ARCH
    model = context_model(arch)
    assert_uses_the_whole_context(model)
    return arch, model


def greedy(gpt, arch, prompts, prefill_tokens=256, max_tokens=12):
    engine = Engine(gpt, VOCAB, EOS, prefill_tokens=prefill_tokens).start()
    try:
        counts = max_tokens if isinstance(max_tokens, list) else [max_tokens] * len(prompts)
        runs = [engine.submit(p, SamplingParams(max_tokens=m, temperature=0.0, end_id=-1, top_log_probs=2))
                for p, m in zip(prompts, counts)]
        for g in runs:
            assert g.wait(60) and g.error is None, g.error
    finally:
        engine.stop()
    return [(g.tokens, g.logprobs, g.top) for g in runs]


def test_both_test_models_take_the_fast_path(arch_and_model):
    arch, model = arch_and_model
    assert functional.supported(model) is None
    assert CachedGPT(model, arch, max_slots=2).fast is not None
    assert CachedGPT(model, arch, max_slots=2, fast=False).fast is None


@pytest.mark.parametrize("prefill_tokens", [256, 5])  # whole prompts, or chunks of 5 beside the decodes
def test_fast_and_megatron_forward_generate_the_same(arch_and_model, prefill_tokens):
    arch, model = arch_and_model
    # block_size 4: the prompts and their continuations cross many blocks
    fast = greedy(CachedGPT(model, arch, max_slots=4, block_size=4), arch, PROMPTS, prefill_tokens)
    megatron = greedy(CachedGPT(model, arch, max_slots=4, block_size=4, fast=False), arch, PROMPTS, prefill_tokens)
    assert len({tuple(tokens) for tokens, _, _ in fast}) == len(PROMPTS)  # every prompt continues its own way
    for (tokens, logprobs, top), (want_tokens, want_logprobs, want_top) in zip(fast, megatron):
        assert tokens == want_tokens
        assert logprobs == want_logprobs and top == want_top


def test_fast_step_logits_equal_megatrons(arch_and_model):
    """One packed step of two prompts, then one of their two decodes: the logits of the rows asked for."""
    arch, model = arch_and_model
    fast, megatron = (CachedGPT(model, arch, max_slots=2, block_size=4, fast=f) for f in (True, False))
    a, b = PROMPTS[0], PROMPTS[1]
    tokens = torch.tensor(a + b)
    positions = torch.tensor(list(range(len(a))) + list(range(len(b))))
    last = torch.tensor([len(a) - 1, len(a) + len(b) - 1])
    lengths = torch.tensor([len(a), len(b)])
    blocks_a, blocks_b = -(-(len(a) + 1) // 4), -(-(len(b) + 1) // 4)
    tables = torch.arange(blocks_a + blocks_b)
    table_lengths = torch.tensor([blocks_a, blocks_b])
    prefill = [gpt.forward(tokens, positions, last, lengths, tables, table_lengths) for gpt in (fast, megatron)]
    assert prefill[0].shape == (2, arch.padded_vocab_size)
    assert torch.equal(prefill[0], prefill[1])
    nxt = prefill[0][:, :VOCAB].argmax(dim=1)
    decode = [gpt.forward(nxt, torch.tensor([len(a), len(b)]), torch.tensor([0, 1]), torch.tensor([1, 1]), tables,
                          table_lengths) for gpt in (fast, megatron)]
    assert torch.equal(decode[0], decode[1])
    assert not torch.equal(decode[0][0], decode[0][1])


def test_a_model_the_fast_path_does_not_cover_runs_megatrons_forward_with_one_log_line(caplog):
    model = context_model(ARCH)
    model.config.sequence_parallel = True  # a setting the fast path does not implement
    try:
        assert "sequence_parallel" in functional.supported(model)
        with caplog.at_level(logging.WARNING, logger="triton_backend.model.gpt"):
            gpt = CachedGPT(model, ARCH, max_slots=2)
        assert gpt.fast is None
        assert [r.getMessage() for r in caplog.records] == [
            "Megatron's own forward runs every step (unsupported settings: sequence_parallel)"]
    finally:
        model.config.sequence_parallel = False


def test_static_inputs_pad_rows_and_tables_with_the_scratch_block():
    got = graphs.static_inputs(np.array([5, 0, 9]), np.array([7, 2, 4, 1, 3, 8]), np.array([2, 1, 3]), rows=4,
                               blocks=4, block_size=4, scratch=99)
    assert got["tables"].tolist() == [[7, 2, 99, 99], [4, 99, 99, 99], [1, 3, 8, 99], [99, 99, 99, 99]]
    assert got["seen"].tolist() == [6, 1, 10, 1]
    assert got["write_blocks"].tolist() == [2, 4, 8, 99] and got["write_offsets"].tolist() == [1, 0, 1, 0]
    assert got["positions"].tolist() == [5, 0, 9, 0]
    assert [graphs.bucket(n) for n in (0, 1, 2, 3, 4, 5, 64, 65)] == [1, 1, 2, 4, 4, 8, 64, 128]


@pytest.mark.parametrize("prefill_tokens", [256, 5])
def test_static_decode_steps_generate_what_the_eager_path_does(arch_and_model, prefill_tokens):
    """The decode steps CUDA graphs replay, run without capture: padded rows and tables, gathered blocks, one SDPA.
    Greedy tokens as the eager path's; log-probs to rounding (SDPA sums in another order)."""
    arch, model = arch_and_model
    static = CachedGPT(model, arch, max_slots=4, block_size=4, graphs="eager")
    lengths = [12, 9, 4, 6]  # sequences end at different steps
    got = greedy(static, arch, PROMPTS, prefill_tokens, lengths)
    # several row buckets as sequences end, and tables of up to 8 blocks (19 + 12 tokens in blocks of 4)
    assert len({rows for rows, _ in static.graphs.buckets}) >= 2 and max(b for _, b in static.graphs.buckets) == 8
    want = greedy(CachedGPT(model, arch, max_slots=4, block_size=4, graphs="off"), arch, PROMPTS, prefill_tokens,
                  lengths)
    assert len({tuple(tokens) for tokens, _, _ in got}) == len(PROMPTS)
    for (tokens, logprobs, _), (want_tokens, want_logprobs, _) in zip(got, want):
        assert tokens == want_tokens
        assert logprobs == pytest.approx(want_logprobs, abs=1e-5)


def test_a_failing_static_step_falls_back_to_the_eager_path_with_one_log_line(caplog):
    model = context_model(ARCH)
    gpt = CachedGPT(model, ARCH, max_slots=4, block_size=4, graphs="eager")

    def broken(*_):
        raise RuntimeError("capture failed")

    gpt.graphs.run = broken
    with caplog.at_level(logging.WARNING, logger="triton_backend.model.gpt"):
        got = greedy(gpt, ARCH, PROMPTS)
    assert gpt.graphs is None
    assert [r.getMessage() for r in caplog.records] == [
        "static decode steps are off, every step runs eagerly: RuntimeError: capture failed"]
    assert got == greedy(CachedGPT(model, ARCH, max_slots=4, block_size=4, graphs="off"), ARCH, PROMPTS)


def _tp_rank(rank: int, port: int, queue) -> None:
    """One rank of a TP=2 job: the engine runs the same prompts with the fast path, then with Megatron's forward,
    then (GPT architecture) with static decode steps."""
    import os

    import torch.distributed as dist

    from triton_backend.model.gpt import build_model, init_parallel
    from triton_backend.ranks.protocol import Leader, follow

    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    init_parallel(2, "cpu", timeout_s=120)
    results = []
    for arch in (ARCH, ROTARY_ARCH):
        torch.manual_seed(rank)
        model = build_model(arch, init_method_std=0.2, tensor_parallel=2).eval()
        for fast, static in ((True, "off"), (False, "off")) + (((True, "eager"),) if arch is ARCH else ()):
            gpt = CachedGPT(model, arch, max_slots=4, block_size=4, fast=fast, graphs=static)
            assert (gpt.fast is not None) == fast and (gpt.graphs is not None) == (static == "eager")
            if rank == 0:
                # the engine's stop tells the follower to shut down
                results.append(greedy(Leader(gpt), arch, PROMPTS, prefill_tokens=8, max_tokens=8))
            else:
                follow(gpt)
    if rank == 0:
        queue.put(results)
    dist.destroy_process_group()


def test_fast_and_megatron_forward_generate_the_same_at_tp2():
    gpt_fast, gpt_megatron, gpt_static, rotary_fast, rotary_megatron = run_two_ranks(_tp_rank)
    assert [tokens for tokens, _, _ in gpt_static] == [tokens for tokens, _, _ in gpt_fast]
    for fast, megatron in ((gpt_fast, gpt_megatron), (rotary_fast, rotary_megatron)):
        assert len({tuple(tokens) for tokens, _, _ in fast}) == len(PROMPTS)
        for (tokens, logprobs, _), (want_tokens, want_logprobs, _) in zip(fast, megatron):
            assert tokens == want_tokens
            assert logprobs == want_logprobs
