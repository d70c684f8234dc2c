"""Mixture-of-experts checkpoints: the architecture read from Megatron's args, the presets in both formats, and
Megatron's own MoE layer over real gloo ranks giving one rank's tokens with experts split by expert parallelism
(EP) and by tensor parallelism within an expert (TP / EP), and across pipeline stages. transformers' Mixtral,
Qwen2-MoE and GLM-4.5 (DeepSeek-V3's routing) are held to the same weights in test_transformers_reference.py."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest
import torch

from preprocessing.params import SamplingParams
from tools.bench_engine import TORCHRUN_VARIABLES
from triton_backend.checkpoints import read_architecture
from triton_backend.config import ROOT, ServerConfig
from triton_backend.model.architecture import GPTArchitecture
from triton_backend.ranks import local

from .models import ROTARY_ARCH

pytestmark = pytest.mark.timeout(600)
MOE = dataclasses.replace(ROTARY_ARCH, num_experts=8, moe_router_topk=2, moe_ffn_hidden_size=48)


def test_the_moe_fields_are_read_from_megatron_args_and_checked():
    args = vars(MOE.to_megatron_args())
    arch = GPTArchitecture.from_megatron_args({**args, "moe_layer_freq": [0, 1], "moe_router_pre_softmax": True})
    assert (arch.num_experts, arch.moe_router_topk, arch.moe_layers) == (8, 2, [False, True])
    assert GPTArchitecture.from_megatron_args({**args, "moe_layer_freq": 2}).moe_layers == [True, False]
    dense = GPTArchitecture.from_megatron_args({**args, "num_experts": None, "moe_router_topk": 9})
    assert dense.num_experts is None and dense.moe_router_topk == 2  # MoE fields mean nothing without experts
    for changed, rule in (({"moe_router_topk": 9}, "moe_router_topk=9 must be between 1 and num_experts=8"),
                          ({"moe_router_score_function": "sparsemixer"}, "must be softmax or sigmoid"),
                          ({"moe_router_num_groups": 3, "moe_router_group_topk": 1}, "the groups must divide"),
                          ({"moe_layer_freq": [1, 1, 1]}, "one 0/1 entry per layer"),
                          ({"moe_latent_size": 16}, "moe_latent_size=16, which this server does not compute"),
                          ({"moe_apply_probs_on_input": True}, "moe_apply_probs_on_input=True")):
        with pytest.raises(ValueError, match=rule):
            GPTArchitecture.from_megatron_args({**args, **changed})
    assert MOE.tensor_parallel_problem(2, 2) is None and MOE.tensor_parallel_problem(2, 1) is None
    odd = dataclasses.replace(MOE, moe_ffn_hidden_size=49)
    assert odd.tensor_parallel_problem(2, 1) == "moe_ffn_hidden_size=49 is not divisible by 2 (TP=2, EP=1)"
    assert odd.tensor_parallel_problem(2, 2) is None  # whole experts on each rank
    five = dataclasses.replace(MOE, num_experts=5)
    assert five.tensor_parallel_problem(2) == "num_experts=5 is not divisible by 2 (TP=2, EP=2)"
    with pytest.raises(ValueError, match="EP must divide TP=4"):
        ServerConfig(tensor_parallel=4, expert_parallel=3, device="cpu")
    assert ServerConfig(tensor_parallel=4, device="cpu").experts_split == 4


@pytest.mark.parametrize("fields", [
    dict(), dict(moe_router_pre_softmax=True), dict(moe_router_topk=1, moe_router_pre_softmax=True),
    dict(moe_router_topk_scaling_factor=2.5),
    dict(moe_router_score_function="sigmoid"), dict(moe_router_score_function="sigmoid", moe_router_topk=1),
    dict(moe_router_score_function="sigmoid", bias=True, moe_router_num_groups=4, moe_router_group_topk=2,
         moe_router_topk=4, moe_router_topk_scaling_factor=2.5),
    dict(moe_router_num_groups=2, moe_router_group_topk=1, moe_router_pre_softmax=True)], ids=str)
def test_the_served_top_k_is_megatrons_routing_as_indices(fields):
    from megatron.core.transformer.moe.moe_utils import topk_routing_with_score_function

    from triton_backend.model.moe import top_k

    fields = dict(fields)
    bias = torch.randn(8) * 0.1 if fields.pop("bias", False) else None
    config = dataclasses.replace(MOE, **fields).transformer_config()
    logits = torch.randn(64, 8, generator=torch.Generator().manual_seed(3))
    weights, chosen = top_k(logits, config, bias)
    probs, routing = topk_routing_with_score_function(
        logits, config.moe_router_topk, use_pre_softmax=config.moe_router_pre_softmax,
        num_groups=config.moe_router_num_groups, group_topk=config.moe_router_group_topk,
        scaling_factor=config.moe_router_topk_scaling_factor, score_function=config.moe_router_score_function,
        expert_bias=bias)
    assert torch.equal(torch.zeros_like(routing).scatter(1, chosen, True), routing)
    assert torch.equal(torch.zeros_like(probs).scatter(1, chosen, weights), probs)  # bit for bit


def make(tmp, preset: str, fmt: str, *args: str):
    """The preset written by ``make_checkpoint`` in a process of its own: a one-rank job that must not inherit this
    process's rendezvous (an earlier test's process group sets MASTER_PORT and RANK here)."""
    out = tmp / f"{preset}_{fmt}"
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARIABLES and not k.startswith("TORCHELASTIC_")}
    run = subprocess.run([sys.executable, "-m", "triton_backend.make_checkpoint", "--random", preset, "--format", fmt,
                          "--init-std", "0.2", "--out", str(out), *args], cwd=ROOT, env=env, capture_output=True,
                         text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def deepseek(tmp_path_factory):
    """The ``moe-deepseek`` preset (sigmoid routing with an expert bias, groups, scaling, a shared expert, a
    dense first layer) in both formats; the legacy one saved as two expert-parallel ranks (``mp_rank_00_000``,
    ``mp_rank_00_001``: four experts each), as Megatron training at EP=2 writes it."""
    tmp = tmp_path_factory.mktemp("moe")
    saved = {"legacy": make(tmp, "moe-deepseek", "legacy", "--ep", "2"), "torch_dist": make(tmp, "moe-deepseek",
                                                                                             "torch_dist")}
    assert sorted(p.name for p in (saved["legacy"] / "iter_0000001").iterdir()) == ["mp_rank_00_000", "mp_rank_00_001"]
    return saved


REQUESTS = [
    ([5, 17, 33, 4, 90, 61, 12], SamplingParams(max_tokens=10, end_id=-1, temperature=0, return_log_probs=True)),
    (list(range(5, 75)), SamplingParams(max_tokens=10, end_id=-1, temperature=0)),  # chunks beside a decode
    ([9, 8, 7, 6], SamplingParams(max_tokens=8, end_id=-1, temperature=0.8, seed=7)),
]


def run(checkpoint, tp=1, pp=1, ep=0, compile=1):
    result = local.spawn(tp * pp, local.generate, str(checkpoint), tp, pp, pp, REQUESTS, kv_cache_mb=4, ep=ep,
                         prefill_tokens=32, compile=compile)[0]
    assert result["fatal"] is None and not [o.error for o in result["outcomes"] if o.error]
    return result


@pytest.fixture(scope="module")
def one_rank(deepseek):
    result = run(deepseek["legacy"])
    assert len({tuple(o.tokens) for o in result["outcomes"]}) == len(REQUESTS)
    # Every token a step computed went to 4 experts in each MoE layer (2 and 3; layer 1 is dense): each token of
    # a prompt once, each generated token but the last once more.
    computed = sum(len(p) + len(o.tokens) - 1 for (p, _), o in zip(REQUESTS, result["outcomes"]))
    assert {layer: sum(counts) for layer, counts in result["experts"].items()} == {2: 4 * computed, 3: 4 * computed}
    assert all(len(counts) == 8 for counts in result["experts"].values())
    return result


def assert_same(got, want, label):
    for i, (a, b) in enumerate(zip(got["outcomes"], want["outcomes"])):
        assert a.tokens == b.tokens, f"{label}, request {i}"
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4), f"{label}, request {i}"


def test_the_preset_reads_the_same_in_both_formats(deepseek):
    arch = read_architecture(deepseek["legacy"])
    assert arch == read_architecture(deepseek["torch_dist"])
    assert (arch.num_experts, arch.moe_router_score_function, arch.moe_layers) == (8, "sigmoid", [False, True, True])
    from triton_backend.checkpoints import load_weights
    from triton_backend.model.gpt import build_model, init_parallel

    init_parallel(1, "cpu")
    states = []
    for fmt in ("legacy", "torch_dist"):
        model = build_model(arch)
        load_weights(model, deepseek[fmt], arch)
        states.append({k: v for k, v in model.state_dict().items() if torch.is_tensor(v)})
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    bias = states[0]["decoder.layers.1.mlp.router.expert_bias"]
    assert bias.abs().max() > 0  # a routing bias the preset sets, so that serving must read it


@pytest.mark.parametrize("fmt,tp,ep,compile", [
    ("legacy", 1, 1, 0), ("legacy", 2, 2, 1), ("legacy", 2, 2, 0), ("torch_dist", 2, 1, 1), ("torch_dist", 4, 4, 1),
    ("torch_dist", 4, 4, 0)], ids=lambda v: str(v))
def test_experts_split_across_ranks_give_one_ranks_tokens(deepseek, one_rank, fmt, tp, ep, compile):
    """The fast path (experts grouped by token, one sum over the ranks) and Megatron's MoE layer (its all-gather
    dispatcher, COMPILE=0), experts split EP ways and each expert TP / EP ways."""
    result = run(deepseek[fmt], tp=tp, ep=ep, compile=compile)
    assert_same(result, one_rank, f"{fmt} TP={tp} EP={ep} fast={compile}")
    assert result["experts"] == one_rank["experts"]  # the same routing, tallied by rank 0's routers


def test_moe_stages_give_one_ranks_tokens(deepseek, one_rank):
    # three layers do not split in two evenly: the first stage holds the dense layer only
    result = local.spawn(2, local.generate, str(deepseek["legacy"]), 1, 2, 2, REQUESTS, kv_cache_mb=4,
                         prefill_tokens=32, pp_layers="1,2")[0]
    assert_same(result, one_rank, "PP=2")
    assert result["experts"] == one_rank["experts"]  # the second stage's routers' tallies, carried back


def test_legacy_expert_rank_shards_are_told_from_stages_and_read_back_whole(tmp_path):
    """mp_rank_TT_EEE (PP=1, EP>1) and mp_rank_TT_PPP_EEE shards, each holding its own experts numbered from 0,
    read into one rank that holds every expert."""
    from triton_backend.checkpoints import CheckpointError, legacy
    from triton_backend.model.gpt import build_model

    from .models import context_model

    model = context_model(MOE)
    want = {k: v for k, v in model.state_dict().items() if torch.is_tensor(v)}
    for pp, names in ((1, ["mp_rank_00_000", "mp_rank_00_001"]),
                      (2, ["mp_rank_00_000_000", "mp_rank_00_000_001", "mp_rank_00_001_000", "mp_rank_00_001_001"])):
        args = MOE.to_megatron_args(expert_model_parallel_size=2, pipeline_model_parallel_size=pp)
        stages = MOE.stage_layers(pp) if pp > 1 else None
        for stage in range(pp):
            directory = legacy.save(model, args, tmp_path / f"pp{pp}", 1, stages, stage if stages else None)
        assert sorted(p.name for p in directory.iterdir()) == names
        cube = legacy.shard_cube(tmp_path / f"pp{pp}")
        assert [[[f.parent.name for f in ranks] for ranks in stage] for stage in cube] == (
            [[["mp_rank_00_000"], ["mp_rank_00_001"]]] if pp == 1 else
            [[["mp_rank_00_000_000"], ["mp_rank_00_000_001"]], [["mp_rank_00_001_000"], ["mp_rank_00_001_001"]]])
        second = torch.load(cube[-1][1][0], weights_only=False)["model"]
        experts = {k.split(".")[6] for k in second if ".local_experts." in k}
        assert experts == {"0", "1", "2", "3"}  # experts 4-7, numbered from 0 as Megatron saves them
        whole = build_model(MOE)
        legacy.load_weights(whole, tmp_path / f"pp{pp}", read_architecture(tmp_path / f"pp{pp}"))
        got = whole.state_dict()
        assert all(torch.equal(got[k], v) for k, v in want.items())
    legacy.save(model, MOE.to_megatron_args(expert_model_parallel_size=2, expert_tensor_parallel_size=1,
                                            tensor_model_parallel_size=2), tmp_path / "etp1", 1)
    with pytest.raises(CheckpointError, match="saved with expert_tensor_parallel_size=1 and "
                                              "tensor_model_parallel_size=2 in the legacy format"):
        read_architecture(tmp_path / "etp1")


def te_spec_layer(name: str, moe: bool) -> str:
    """``name`` as a checkpoint trained with TransformerEngine layer specs holds it: norms fused into the linear
    after them, but for an MoE layer's MLP norm, which stays apart."""
    name = name.replace("input_layernorm.", "self_attention.linear_qkv.layer_norm_")
    return name if moe else name.replace("pre_mlp_layernorm.", "mlp.linear_fc1.layer_norm_")


def test_checkpoints_written_with_transformer_engine_specs_read_in_both_formats(tmp_path):
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    from triton_backend.checkpoints import legacy, load_weights
    from triton_backend.checkpoints.torch_dist import _cpu_safe_save
    from triton_backend.model.gpt import build_model

    from .models import context_model

    arch = dataclasses.replace(MOE, moe_layer_freq=[0, 1])  # one dense layer, one MoE layer
    model = context_model(arch)
    want = {k: v for k, v in model.state_dict().items() if torch.is_tensor(v)}
    moe = {f"decoder.layers.{i}." for i, flag in enumerate(arch.moe_layers) if flag}

    def te(name: str) -> str:
        return te_spec_layer(name, any(name.startswith(p) for p in moe))

    # legacy: a TE model's state dict, its modules' _extra_state entries too
    state = {te(k): v for k, v in model.state_dict().items()}
    state["decoder.layers.0.self_attention.linear_qkv._extra_state"] = None
    args = arch.to_megatron_args(transformer_impl="transformer_engine")
    directory = tmp_path / "legacy" / "iter_0000001" / "mp_rank_00"
    directory.mkdir(parents=True)
    torch.save({"args": args, "model": state, "iteration": 1, "checkpoint_version": 3.0},
               directory / legacy.SHARD_FILE)
    (tmp_path / "legacy" / "latest_checkpointed_iteration.txt").write_text("1")
    assert {"decoder.layers.1.pre_mlp_layernorm.weight", "decoder.layers.0.mlp.linear_fc1.layer_norm_weight",
            "decoder.layers.1.self_attention.linear_qkv.layer_norm_weight"} <= state.keys()
    # torch_dist: Megatron's local spec already names a dense layer's norms as TE does; an MoE layer's MLP norm not
    sharded = model.sharded_state_dict()
    renamed = []
    for value in sharded.values():
        if isinstance(value, ShardedTensor) and value.key.startswith(tuple(moe)) and ".linear_fc1.layer_norm_" in \
                value.key and ".experts." not in value.key:
            value.key = value.key.replace("mlp.linear_fc1.layer_norm_", "pre_mlp_layernorm.")
            renamed.append(value.key)
    assert renamed == ["decoder.layers.1.pre_mlp_layernorm.weight"]
    (tmp_path / "dist" / "iter_0000001").mkdir(parents=True)
    with _cpu_safe_save():
        dist_checkpointing.save({"model": sharded, "args": args}, str(tmp_path / "dist" / "iter_0000001"))
    (tmp_path / "dist" / "latest_checkpointed_iteration.txt").write_text("1")
    for fmt in ("legacy", "dist"):
        whole = build_model(arch)
        load_weights(whole, tmp_path / fmt, read_architecture(tmp_path / fmt))
        got = whole.state_dict()
        assert all(torch.equal(got[k], v) for k, v in want.items()), fmt
