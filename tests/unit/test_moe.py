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


def make(tmp, preset: str, fmt: str):
    """The preset written by ``make_checkpoint`` in a process of its own: a one-rank job that must not inherit this
    process's rendezvous (an earlier test's process group sets MASTER_PORT and RANK here)."""
    out = tmp / f"{preset}_{fmt}"
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARIABLES and not k.startswith("TORCHELASTIC_")}
    run = subprocess.run([sys.executable, "-m", "triton_backend.make_checkpoint", "--random", preset, "--format", fmt,
                          "--init-std", "0.2", "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def deepseek(tmp_path_factory):
    """The ``moe-deepseek`` preset (sigmoid routing with an expert bias, groups, scaling, a shared expert, a
    dense first layer) in both formats."""
    tmp = tmp_path_factory.mktemp("moe")
    return {fmt: make(tmp, "moe-deepseek", fmt) for fmt in ("legacy", "torch_dist")}


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


def test_a_legacy_checkpoint_saved_with_expert_parallelism_is_refused_by_name(tmp_path):
    from triton_backend.checkpoints import CheckpointError, legacy

    from .models import context_model

    legacy.save(context_model(MOE), MOE.to_megatron_args(expert_model_parallel_size=2), tmp_path / "ep2", 1)
    with pytest.raises(CheckpointError, match="saved with expert_model_parallel_size=2 in the legacy format"):
        read_architecture(tmp_path / "ep2")
    legacy.save(context_model(MOE), MOE.to_megatron_args(), tmp_path / "ep1", 1)
    assert read_architecture(tmp_path / "ep1").num_experts == 8
