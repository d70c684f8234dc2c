"""Merging and splitting tensor-parallel shards the Megatron way, and refusing checkpoints that do not fit."""

import argparse
import re

import pytest
import torch

from triton_backend.checkpoints import CheckpointError, read_architecture
from triton_backend.checkpoints import legacy as legacy_checkpoint


@pytest.mark.parametrize("halves", [False, True])
@pytest.mark.parametrize("src, dst", [(1, 2), (2, 1), (2, 4), (4, 2), (8, 1)])
def test_merge_then_split_reshards_like_megatron(src, dst, halves):
    full = torch.arange(2 * 8 * 3, dtype=torch.float32).view(16, 3)
    if halves:  # SwiGLU fc1: rank i holds [gate_i; up_i]
        gate, up = full.chunk(2)
        shards = [torch.cat([g, u]) for g, u in zip(gate.chunk(src), up.chunk(src))]
    else:
        shards = list(full.chunk(src))
    merged = legacy_checkpoint.merge(shards, 0, halves)
    assert torch.equal(merged, full)
    parts = [legacy_checkpoint.split(merged, 0, dst, i, halves) for i in range(dst)]
    assert torch.equal(legacy_checkpoint.merge(parts, 0, halves), full)
    if halves:
        assert torch.equal(parts[0][: 8 // dst], gate.chunk(dst)[0])  # each rank keeps gate rows first


def write_shards(tmp_path, tp, args, states):
    tmp_path.mkdir(parents=True, exist_ok=True)
    tmp_path.joinpath("latest_checkpointed_iteration.txt").write_text("7")
    for rank, state in enumerate(states):
        d = tmp_path / "iter_0000007" / f"mp_rank_{rank:02d}"
        d.mkdir(parents=True)
        torch.save({"args": args, "model": state, "iteration": 7}, d / legacy_checkpoint.SHARD_FILE)


ARGS = argparse.Namespace(num_layers=1, hidden_size=64, num_attention_heads=4, ffn_hidden_size=128,
                          padded_vocab_size=128, max_position_embeddings=32, seq_length=32)


def test_architecture_and_tp_problems_are_read_from_legacy_args(tmp_path):
    write_shards(tmp_path, 1, ARGS, [{}])
    assert read_architecture(tmp_path).hidden_size == 64
    with pytest.raises(CheckpointError, match="num_attention_heads=4 is not divisible by 8"):
        read_architecture(tmp_path, tensor_parallel=8)


def test_incomplete_or_mixed_shard_grids_and_missing_checkpoints_are_refused(tmp_path):
    iteration = tmp_path / "a" / "iter_0000001"
    for name in ("mp_rank_00_000", "mp_rank_01_000", "mp_rank_00_001"):
        (iteration / name).mkdir(parents=True)
    (tmp_path / "a" / "latest_checkpointed_iteration.txt").write_text("1")
    with pytest.raises(CheckpointError, match="lacks the shards mp_rank_01_001"):
        legacy_checkpoint.shard_files(tmp_path / "a")
    (iteration / "mp_rank_01_001").mkdir()
    grid = legacy_checkpoint.shard_grid(tmp_path / "a")
    assert [[f.parent.name for f in stage] for stage in grid] == [["mp_rank_00_000", "mp_rank_01_000"],
                                                                  ["mp_rank_00_001", "mp_rank_01_001"]]
    (iteration / "mp_rank_02").mkdir()
    with pytest.raises(CheckpointError, match="one kind only"):
        legacy_checkpoint.shard_files(tmp_path / "a")
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        read_architecture(tmp_path / "nowhere")


def test_a_missing_or_misshapen_tensor_is_named(tmp_path):
    from triton_backend.model.gpt import build_model, init_parallel

    init_parallel(1, "cpu")
    arch = read_architecture_from(ARGS)
    model = build_model(arch)
    state = {k: v.clone() if torch.is_tensor(v) else v for k, v in model.state_dict().items()}
    name = "decoder.layers.0.mlp.linear_fc1.weight"
    broken = dict(state)
    del broken[name]
    write_shards(tmp_path / "missing", 1, ARGS, [broken])
    with pytest.raises(CheckpointError, match=f"'{name}' is missing from mp_rank_00"):
        legacy_checkpoint.load_weights(build_model(arch), tmp_path / "missing", arch)
    broken[name] = torch.zeros(3, 3)
    write_shards(tmp_path / "shape", 1, ARGS, [broken])
    with pytest.raises(CheckpointError, match=f"'{name}' has shape \\(3, 3\\)"):
        legacy_checkpoint.load_weights(build_model(arch), tmp_path / "shape", arch)
    write_shards(tmp_path / "good", 1, ARGS, [state])
    fresh = build_model(arch)
    legacy_checkpoint.load_weights(fresh, tmp_path / "good", arch)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in state.items() if torch.is_tensor(v))


def read_architecture_from(args):
    from triton_backend.model.architecture import GPTArchitecture

    return GPTArchitecture.from_megatron_args(args)


@pytest.mark.parametrize("field, value", [("mtp_num_layers", 1), ("multi_latent_attention", True),
                                          ("window_attn_skip_freq", 4), ("softmax_type", "learnable"),
                                          ("moe_latent_size", 16)])
def test_fields_that_change_the_math_and_are_not_served_are_refused_by_name(field, value):
    from triton_backend.model.architecture import GPTArchitecture

    args = {**vars(GPTArchitecture.from_megatron_args(ARGS).to_megatron_args()), field: value}
    with pytest.raises(ValueError, match=re.escape(f"{field}={value!r}")):
        GPTArchitecture.from_megatron_args(args)
    served = GPTArchitecture.from_megatron_args({**args, field: None})  # unset: served
    assert served == GPTArchitecture.from_megatron_args(ARGS)


def test_fields_are_read_under_their_names_before_megatron_core_016():
    from triton_backend.model.architecture import GPTArchitecture

    args = vars(GPTArchitecture.from_megatron_args(ARGS).to_megatron_args())
    args["layernorm_epsilon"] = args.pop("norm_epsilon") * 0 + 1e-6
    args["apply_layernorm_1p"] = args.pop("layernorm_zero_centered_gamma") or True
    arch = GPTArchitecture.from_megatron_args(args)
    assert arch.norm_epsilon == 1e-6 and arch.layernorm_zero_centered_gamma


def test_a_window_that_looks_ahead_is_refused_and_a_causal_one_read():
    from triton_backend.model.architecture import GPTArchitecture

    args = vars(GPTArchitecture.from_megatron_args(ARGS).to_megatron_args())
    with pytest.raises(ValueError, match=re.escape("window_size=[8, 8]: only a causal window (left, 0)")):
        GPTArchitecture.from_megatron_args({**args, "window_size": [8, 8]})
    assert GPTArchitecture.from_megatron_args({**args, "window_size": [8, 0]}).attention_window == 8
    assert GPTArchitecture.from_megatron_args({**args, "window_size": [-1, 0]}).attention_window is None
