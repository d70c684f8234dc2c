"""Megatron's torch_dist checkpoint format (``--ckpt-format torch_dist``, the default of Megatron training).

    <dir>/latest_checkpointed_iteration.txt
    <dir>/iter_0000300/   .metadata  __0_0.distcp  common.pt (holds ``args``)  metadata.json

``dist_checkpointing`` reshards on load, so a checkpoint saved at one tensor-parallel size loads at another.
"""

from __future__ import annotations

import contextlib
import pathlib
import re
from unittest import mock

import torch

from .layout import TRACKER, CheckpointError, iteration_dir


def resolve(path: str | pathlib.Path) -> pathlib.Path:
    """The torch_dist directory of ``path``: a Megatron save directory (with a tracker file) or the iter dir."""
    path = iteration_dir(path)
    if not (path / "metadata.json").is_file():
        raise CheckpointError(f"{path} is not a torch_dist checkpoint (no metadata.json, no {TRACKER})")
    return path


def read_args(path: str | pathlib.Path):
    from megatron.core import dist_checkpointing

    common = dist_checkpointing.load_common_state_dict(str(resolve(path)))
    if "args" not in common:
        raise CheckpointError(f"{path} stores no training args; cannot tell the model's architecture")
    return common["args"]


# Megatron's local layer spec stores a layer's MLP norm as the TransformerEngine spec fuses it (``mlp.linear_fc1.
# layer_norm_*``), MoE layers too; the TE spec keeps an MoE layer's norm apart (``pre_mlp_layernorm.*``), as the
# MoE cannot fuse it. A checkpoint trained with TE holds the latter.
_TE_MOE_NORM = re.compile(r"^(.*\.layers\.\d+\.)mlp\.linear_fc1\.layer_norm_(weight|bias)$")


def _read_te_names(sharded: dict, stored: set[str]) -> None:
    """Point the model's tensors the checkpoint lacks at their TransformerEngine-spec names where it holds those."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    for value in sharded.values():
        if isinstance(value, dict):
            _read_te_names(value, stored)
        elif isinstance(value, ShardedTensor) and value.key not in stored:
            match = _TE_MOE_NORM.match(value.key)
            if match and f"{match[1]}pre_mlp_layernorm.{match[2]}" in stored:
                value.key = f"{match[1]}pre_mlp_layernorm.{match[2]}"


def load_weights(model, path: str | pathlib.Path) -> None:
    from megatron.core import dist_checkpointing

    directory = resolve(path)
    sharded = model.sharded_state_dict()
    try:
        _read_te_names(sharded, set(dist_checkpointing.load_tensors_metadata(str(directory))))
        loaded = dist_checkpointing.load({"model": sharded}, str(directory))
    except Exception as err:  # dist_checkpointing raises several types; the message is what matters
        raise CheckpointError(f"{directory} does not fit the model built from its args: {err}") from err
    model.load_state_dict(loaded["model"], strict=True)


@contextlib.contextmanager
def _cpu_safe_save():
    """``dist_checkpointing.save`` calls ``torch.cuda`` even for CPU tensors; make those calls harmless."""
    if torch.cuda.is_available():
        yield
        return
    with mock.patch("torch.cuda.synchronize"), mock.patch("torch.cuda.current_device", return_value="cpu"):
        yield


def save(model, args, directory: str | pathlib.Path, iteration: int) -> pathlib.Path:
    """Write ``model`` and ``args`` the way Megatron training does; returns the iter directory.

    Call it under an ``if __name__ == "__main__"`` guard: the writer spawns a multiprocessing manager.
    """
    from megatron.core import dist_checkpointing

    directory = pathlib.Path(directory)
    target = directory / f"iter_{iteration:07d}"
    target.mkdir(parents=True, exist_ok=True)
    state = {"model": model.sharded_state_dict(), "args": args, "iteration": iteration, "checkpoint_version": 3.0}
    with _cpu_safe_save():
        dist_checkpointing.save(state, str(target))
    if torch.distributed.get_rank() == 0:
        (directory / TRACKER).write_text(str(iteration))
    return target
