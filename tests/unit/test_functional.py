"""The step's fast path (``model/functional.py``) against Megatron's own forward over the same weights and cache:
with every product by ``F.linear`` (``unpacked``), the same logits, bit for bit, for the same packed steps, and the
same tokens and log-probs through the engine, at TP 1 and 2; with MKL's packed weights (the default on CPU), the
same greedy tokens and log-probs to rounding; and the static-shape decode steps that CUDA graphs replay
(``model/graphs.py``, run eagerly here) against the eager path."""

import dataclasses
import logging

import numpy as np
import pytest
import torch

from preprocessing.params import SamplingParams
from triton_backend.engine.engine import Engine
from triton_backend.model import functional, graphs
from triton_backend.model.gpt import CachedGPT

from .models import (
    ARCH,
    EOS,
    FIELDS_ARCH,
    ROTARY_ARCH,
    SQUARED_RELU_ARCH,
    VOCAB,
    ZERO_CENTERED_ARCH,
    assert_uses_the_whole_context,
    context_model,
    run_two_ranks,
)

PROMPTS = [[5, 17, 33, 4, 90, 61, 12], [6, 17, 33, 4, 90, 61, 12, 8, 77, 3, 40, 9, 100, 64, 1, 22, 35, 48, 50],
           [7, 1], [30, 31, 32, 34, 36, 37, 38, 39, 41, 42, 43]]


MOE_ARCHS = {  # Megatron's MoE layer against the fast path's experts grouped by token
    "moe_softmax_top2": dataclasses.replace(ROTARY_ARCH, num_experts=4, moe_router_topk=2, moe_ffn_hidden_size=48),
    "moe_sigmoid_groups_shared": dataclasses.replace(
        ROTARY_ARCH, num_layers=3, num_experts=8, moe_router_topk=4, moe_ffn_hidden_size=48,
        moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True, moe_router_num_groups=4,
        moe_router_group_topk=2, moe_router_topk_scaling_factor=2.5, moe_shared_expert_intermediate_size=48,
        moe_shared_expert_gate=True, moe_layer_freq=(0, 1, 1)),
}


@pytest.fixture(scope="module", params=["gpt", "rotary", "qknorm_ropescaling_interleaved", "squared_relu",
                                        "zero_centered_gamma", "sliding_window", *MOE_ARCHS])
def arch_and_model(request):
    arch = {"gpt": ARCH, "rotary": ROTARY_ARCH, "qknorm_ropescaling_interleaved": FIELDS_ARCH,
            "squared_relu": SQUARED_RELU_ARCH, "zero_centered_gamma": ZERO_CENTERED_ARCH,
            "sliding_window": dataclasses.replace(ROTARY_ARCH, window_size=(6, 0)), **MOE_ARCHS}[request.param]
    model = context_model(arch)
    assert_uses_the_whole_context(model)
    return arch, model


@pytest.fixture
def unpacked(monkeypatch):
    """The fast path without packed weights: its products are then Megatron's ``F.linear``, bit for bit."""
    monkeypatch.setattr(functional, "_packs", lambda weight, output: False)


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
def test_fast_and_megatron_forward_generate_the_same(arch_and_model, prefill_tokens, unpacked):
    arch, model = arch_and_model
    # block_size 4: the prompts and their continuations cross many blocks
    fast = greedy(CachedGPT(model, arch, max_slots=4, block_size=4), arch, PROMPTS, prefill_tokens)
    megatron = greedy(CachedGPT(model, arch, max_slots=4, block_size=4, fast=False), arch, PROMPTS, prefill_tokens)
    assert len({tuple(tokens) for tokens, _, _ in fast}) == len(PROMPTS)  # every prompt continues its own way
    for (tokens, logprobs, top), (want_tokens, want_logprobs, want_top) in zip(fast, megatron):
        assert tokens == want_tokens
        assert logprobs == want_logprobs and top == want_top


def test_fast_step_logits_equal_megatrons(arch_and_model, unpacked):
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


@pytest.mark.parametrize("prefill_tokens", [256, 5])
def test_packed_weights_generate_megatrons_tokens(arch_and_model, prefill_tokens):
    """An output layer shared with the embedding table (row-major for the lookups) gets both packed copies; an
    untied one as narrow as the test models' goes column-major instead, as their layers do, and keeps
    ``F.linear``. Greedy tokens and top alternatives as Megatron's, log-probs to rounding."""
    arch, model = arch_and_model
    packed = CachedGPT(model, arch, max_slots=4, block_size=4)
    output, first = packed.fast.output, packed.fast.layers[0]
    fc1 = first.fc1 if first.moe is None else first.moe.experts[0][0]
    shared = model.share_embeddings_and_output_weights
    assert (output.few is not None, output.many is not None) == (shared, shared)
    assert fc1.few is None and fc1.many is None
    assert shared or output.weight.stride() == (1, output.weight.shape[0])  # column-major
    fast = greedy(packed, arch, PROMPTS, prefill_tokens)
    megatron = greedy(CachedGPT(model, arch, max_slots=4, block_size=4, fast=False), arch, PROMPTS, prefill_tokens)
    assert len({tuple(tokens) for tokens, _, _ in fast}) == len(PROMPTS)
    for (tokens, logprobs, top), (want_tokens, want_logprobs, want_top) in zip(fast, megatron):
        assert tokens == want_tokens
        assert logprobs == pytest.approx(want_logprobs, abs=1e-5)
        assert [ids for ids, _ in top] == [ids for ids, _ in want_top]
        for (_, values), (_, want_values) in zip(top, want_top):
            assert values == pytest.approx(want_values, abs=1e-5)


def test_packed_bytes_count_two_copies_of_each_packed_weight(arch_and_model):
    arch, model = arch_and_model
    output = model.shared_embedding_or_output_weight() if model.share_embeddings_and_output_weights else None
    # the test models' layers are narrow: only a shared output layer is packed
    assert functional.packed_bytes(model) == (2 * output.numel() * 4 if output is not None else 0)


def test_each_row_count_goes_to_its_kernel():
    """One row: the weight itself; 2 to MANY_ROWS rows: oneDNN's copy; more: MKL's (copies of 2x and 3x the
    weight here, so that the product says which ran)."""
    weight = torch.randn(600, 520)
    linear = functional._Linear(weight, few=torch.ops.mkldnn._reorder_linear_weight(2 * weight, 16),
                                many=torch.ops.mkl._mkl_reorder_linear_weight(3 * weight, 1))
    for rows, factor in ((1, 1), (2, 2), (functional.MANY_ROWS, 2), (functional.MANY_ROWS + 1, 3)):
        x = torch.randn(rows, 520)
        assert torch.allclose(linear(x), factor * x @ weight.t(), rtol=1e-4, atol=1e-3), rows
    x = torch.randn(functional.MANY_ROWS + 1, 520)
    assert torch.allclose(functional._Linear(weight, few=linear.few)(x), 2 * x @ weight.t(), rtol=1e-4, atol=1e-3)


def test_a_packed_copy_that_disagrees_or_cannot_be_made_is_left_out_with_one_log_line(monkeypatch, caplog):
    weight = torch.randn(600, 520)
    both = functional._pack(weight)  # both sides over NARROW_SIDE
    assert both.few is not None and both.many is not None
    wrong = torch.ops.mkl._mkl_reorder_linear_weight(weight * 2, 1)
    monkeypatch.setattr(torch.ops.mkl, "_mkl_reorder_linear_weight", lambda w, batch: wrong)

    def no_onednn(w, batch):
        raise RuntimeError("no oneDNN here")

    monkeypatch.setattr(torch.ops.mkldnn, "_reorder_linear_weight", no_onednn)
    with caplog.at_level(logging.WARNING, logger="triton_backend.model.functional"):
        linear = functional._pack(weight)
    assert linear.few is None and linear.many is None
    x = torch.randn(60, 520)
    assert torch.equal(linear(x), torch.nn.functional.linear(x, weight))
    assert [r.getMessage() for r in caplog.records] == [
        "no oneDNN packed copy of a (600, 520) weight: no oneDNN here",
        "MKL's packed product disagrees with F.linear on a (600, 520) weight: it runs unpacked"]


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
    assert got["counts"].tolist() == [2, 1, 3, 0]
    assert got["write_blocks"].tolist() == [2, 4, 8, 99] and got["write_offsets"].tolist() == [1, 0, 1, 0]
    assert got["positions"].tolist() == [5, 0, 9, 0]
    assert [graphs.bucket(n) for n in (0, 1, 2, 3, 4, 5, 64, 65)] == [1, 1, 2, 4, 4, 8, 64, 128]


def test_the_graphs_memory_kept_from_the_cache_follows_rows_and_blocks_not_copies_of_the_context():
    """``reserve_bytes`` at Llama-3-8B's shape, 64 rows of 8k tokens (16,384 blocks), TP=1, bfloat16: at least its
    largest step's logits, twice, and far below one gathered copy of those rows' keys in one layer (1 GiB, which
    the static step once made); a four times longer context adds only the mask tables (int32 per block)."""
    llama8b = dataclasses.replace(ROTARY_ARCH, hidden_size=4096, ffn_hidden_size=14336, padded_vocab_size=128256)
    at_8k = graphs.reserve_bytes(llama8b, 64, 1, torch.bfloat16, 64 * 256, 256)
    one_copy = 64 * 8192 * 8 * 128 * 2
    assert 2 * 64 * 128256 * 6 < at_8k < one_copy / 4
    at_32k = graphs.reserve_bytes(llama8b, 64, 1, torch.bfloat16, 64 * 1024, 1024)
    masks = 2 * 127 * (2 * 4 * 64 * 768 + 8 * 768)  # 127 rows over the buckets 1 .. 64, twice
    assert at_32k - at_8k == masks
    assert graphs.reserve_bytes(llama8b, 64, 2, torch.bfloat16, 64 * 256, 256) < at_8k  # TP shares activations


@pytest.mark.parametrize("prefill_tokens", [256, 5])
def test_static_decode_steps_generate_what_the_eager_path_does(arch_and_model, prefill_tokens):
    """The decode steps CUDA graphs replay, run without capture: padded rows, FlexAttention over each row's blocks in
    place (and its prompt chunks through FlexAttention too: the cache is group-major). Greedy tokens as the CPU
    path's; log-probs to rounding (the sums run in another order). Sliding-window models included."""
    arch, model = arch_and_model
    static = CachedGPT(model, arch, max_slots=4, block_size=4, graphs="eager")
    assert static.flex and static.cache.group_major and not static.kernel
    lengths = [12, 9, 4, 6]  # sequences end at different steps
    got = greedy(static, arch, PROMPTS, prefill_tokens, lengths)
    assert len(static.graphs.buckets) >= 2  # several row buckets as sequences end
    want = greedy(CachedGPT(model, arch, max_slots=4, block_size=4, graphs="off"), arch, PROMPTS, prefill_tokens,
                  lengths)
    assert len({tuple(tokens) for tokens, _, _ in got}) == len(PROMPTS)
    for (tokens, logprobs, _), (want_tokens, want_logprobs, _) in zip(got, want):
        assert tokens == want_tokens
        assert logprobs == pytest.approx(want_logprobs, abs=1e-5)


def test_attention_is_chosen_by_device_or_by_name():
    """``attention``: "torch" (the CPU default) keeps the blocks-major cache and its kernels and has no static steps;
    "flex" (the CUDA default) reads a group-major cache through FlexAttention, with or without static steps; the
    same greedy tokens either way."""
    model = context_model(ROTARY_ARCH)
    auto = CachedGPT(model, ROTARY_ARCH, max_slots=4, block_size=4, graphs="off")
    torch_only = CachedGPT(model, ROTARY_ARCH, max_slots=4, block_size=4, graphs="eager", attention="torch")
    flex = CachedGPT(model, ROTARY_ARCH, max_slots=4, block_size=4, graphs="off", attention="flex")
    assert not auto.flex and not auto.cache.group_major and auto.graphs is None
    assert not torch_only.flex and torch_only.graphs is None  # static steps need FlexAttention
    assert flex.flex and flex.cache.group_major and flex.graphs is None and not flex.kernel
    want = greedy(auto, ROTARY_ARCH, PROMPTS, prefill_tokens=5)
    for gpt in (torch_only, flex):
        for (tokens, logprobs, _), (want_tokens, want_logprobs, _) in zip(
                greedy(gpt, ROTARY_ARCH, PROMPTS, prefill_tokens=5), want):
            assert tokens == want_tokens and logprobs == pytest.approx(want_logprobs, abs=1e-5)
    with pytest.raises(ValueError, match="attention must be 'auto', 'flex' or 'torch', got 'paged'"):
        CachedGPT(model, ROTARY_ARCH, max_slots=4, block_size=4, attention="paged")


def test_a_failing_static_step_falls_back_to_the_eager_path_with_one_log_line(caplog):
    model = context_model(ARCH)
    gpt = CachedGPT(model, ARCH, max_slots=4, block_size=4, graphs="eager")

    def broken(*_, **__):
        raise RuntimeError("capture failed")

    gpt.graphs.run = broken
    with caplog.at_level(logging.WARNING, logger="triton_backend.model.gpt"):
        got = greedy(gpt, ARCH, PROMPTS)
    assert gpt.graphs is None
    assert [r.getMessage() for r in caplog.records] == [
        "static decode steps are off, every step runs eagerly: RuntimeError: capture failed"]
    # the eager steps over the same group-major cache (FlexAttention); the CPU path's tokens, log-probs to rounding
    for (tokens, logprobs, _), (want_tokens, want_logprobs, _) in zip(
            got, greedy(CachedGPT(model, ARCH, max_slots=4, block_size=4, graphs="off"), ARCH, PROMPTS)):
        assert tokens == want_tokens and logprobs == pytest.approx(want_logprobs, abs=1e-5)


def _tp_rank(rank: int, port: int, queue) -> None:
    """One rank of a TP=2 job: the engine runs the same prompts with the fast path unpacked, then with Megatron's
    forward, then with the fast path's packed weights, then (GPT architecture) with static decode steps."""
    import os

    import torch.distributed as dist

    from triton_backend.model.gpt import build_model, init_parallel
    from triton_backend.ranks.protocol import Leader, follow

    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    init_parallel(2, "cpu", timeout_s=120)
    results = []
    packs = functional._packs
    for arch in (ARCH, ROTARY_ARCH):
        torch.manual_seed(rank)
        model = build_model(arch, init_method_std=0.2, tensor_parallel=2).eval()
        runs = ((True, "off", False), (False, "off", False), (True, "off", True))
        for fast, static, pack in runs + (((True, "eager", True),) if arch is ARCH else ()):
            functional._packs = packs if pack else (lambda weight, output: False)
            gpt = CachedGPT(model, arch, max_slots=4, block_size=4, fast=fast, graphs=static)
            assert (gpt.fast is not None) == fast and (gpt.graphs is not None) == (static == "eager")
            # packed: a shared output layer (ARCH's); the rotary family's is untied and narrow (column-major)
            shared = model.share_embeddings_and_output_weights
            assert not fast or (gpt.fast.output.many is not None) == (pack and shared)
            if rank == 0:
                # the engine's stop tells the follower to shut down
                results.append(greedy(Leader(gpt), arch, PROMPTS, prefill_tokens=8, max_tokens=8))
            else:
                follow(gpt)
    if rank == 0:
        queue.put(results)
    dist.destroy_process_group()


def test_fast_and_megatron_forward_generate_the_same_at_tp2():
    runs = run_two_ranks(_tp_rank)
    gpt_fast, gpt_megatron, gpt_packed, gpt_static, rotary_fast, rotary_megatron, rotary_packed = runs
    assert [tokens for tokens, _, _ in gpt_static] == [tokens for tokens, _, _ in gpt_fast]
    for fast, megatron, packed in ((gpt_fast, gpt_megatron, gpt_packed), (rotary_fast, rotary_megatron, rotary_packed)):
        assert len({tuple(tokens) for tokens, _, _ in fast}) == len(PROMPTS)
        for (tokens, logprobs, _), (want_tokens, want_logprobs, _), (packed_tokens, packed_logprobs, _) \
                in zip(fast, megatron, packed):
            assert tokens == want_tokens == packed_tokens
            assert logprobs == want_logprobs
            assert packed_logprobs == pytest.approx(want_logprobs, abs=1e-5)


@pytest.mark.parametrize("base", [ARCH, ROTARY_ARCH], ids=["LayerNorm", "RMSNorm"])
def test_zero_centered_gamma_scales_by_one_plus_the_stored_weight(base):
    """Megatron's layernorm_zero_centered_gamma, by its definition: a model that stores w - 1 computes what the
    plain model with w computes."""
    plain = context_model(base)
    centred = context_model(dataclasses.replace(base, layernorm_zero_centered_gamma=True), seed=1)
    state = {k: v - 1 if k.endswith("layernorm.weight") else v for k, v in plain.state_dict().items()}
    assert any(k.endswith("layernorm.weight") for k in state)
    centred.load_state_dict(state)
    ids = torch.tensor([PROMPTS[1]])
    positions = torch.arange(ids.shape[1])[None]
    with torch.no_grad():
        assert torch.allclose(centred(ids, positions, None), plain(ids, positions, None), atol=1e-5)


@pytest.mark.parametrize("fast", [True, False])
def test_a_step_records_no_autograd_graph(fast):
    """Steps run in inference mode: logits that required grad would fail sampling's in-place operations (a penalised
    sampled row takes torch's path) and cost memory for a graph nobody uses."""
    model = context_model(ROTARY_ARCH)
    gpt = CachedGPT(model, ROTARY_ARCH, max_slots=2, block_size=4, fast=fast)
    engine = Engine(gpt, VOCAB, EOS).start()
    try:
        g = engine.submit([5, 17, 33], SamplingParams(max_tokens=4, temperature=0.8, repetition_penalty=1.3, seed=1,
                                                       end_id=-1))
        assert g.wait(60) and g.error is None, g.error
    finally:
        engine.stop()
    assert len(g.tokens) == 4
