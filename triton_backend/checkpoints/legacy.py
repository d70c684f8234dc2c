"""Legacy Megatron-LM checkpoints (``--ckpt-format torch``): one ``model_optim_rng.pt`` per tensor-parallel rank.

    <dir>/latest_checkpointed_iteration.txt
    <dir>/iter_0000300/mp_rank_00/model_optim_rng.pt   {"args", "model", "iteration", "checkpoint_version"}
    <dir>/iter_0000300/mp_rank_01/model_optim_rng.pt   ...

Shards saved at TP=m are merged and re-split for the served TP=n the way Megatron partitions them: each
tensor-parallel parameter along its ``partition_dim`` (QKV is laid out per query group and the vocabulary
is padded to a multiple of the TP size, so a contiguous split is right), SwiGLU's fc1 as two halves
(gate and up) split separately; every other tensor is replicated.
"""

from __future__ import annotations

import pathlib
import re

import torch

from .layout import TRACKER, CheckpointError, iteration_dir

SHARD_FILE = "model_optim_rng.pt"
_RANK_DIR = re.compile(r"mp_rank_(\d{2})(_\d{3})?$")



def is_legacy(path: str | pathlib.Path) -> bool:
    return (iteration_dir(path) / "mp_rank_00" / SHARD_FILE).is_file()


def shard_files(path: str | pathlib.Path) -> list[pathlib.Path]:
    directory = iteration_dir(path)
    ranks = sorted(p for p in directory.iterdir() if _RANK_DIR.match(p.name))
    if any(_RANK_DIR.match(p.name).group(2) for p in ranks):
        raise CheckpointError(f"{directory} is pipeline-parallel (mp_rank_XX_YYY); only tensor parallelism is served")
    files = [p / SHARD_FILE for p in ranks]
    if not files or [int(_RANK_DIR.match(p.name).group(1)) for p in ranks] != list(range(len(ranks))):
        raise CheckpointError(f"{directory} does not hold mp_rank_00..mp_rank_NN shards")
    return files


def _load(file: pathlib.Path) -> dict:
    # The file pickles argparse.Namespace args, so weights_only loading cannot read it: only load checkpoints
    # you trust (the same holds for Megatron itself).
    return torch.load(file, map_location="cpu", weights_only=False, mmap=True)


def read_args(path: str | pathlib.Path):
    state = _load(shard_files(path)[0])
    if "args" not in state:
        raise CheckpointError(f"{path} stores no training args; cannot tell the model's architecture")
    return state["args"]


def _is_swiglu_fc1(name: str, swiglu: bool) -> bool:
    return swiglu and ".mlp.linear_fc1." in name


def merge(shards: list[torch.Tensor], dim: int, halves: bool) -> torch.Tensor:
    """The full tensor from its TP shards (``halves``: each shard is [gate_i; up_i] along ``dim``)."""
    if not halves:
        return torch.cat(shards, dim)
    gates, ups = zip(*(s.chunk(2, dim) for s in shards))
    return torch.cat(list(gates) + list(ups), dim)


def split(full: torch.Tensor, dim: int, parts: int, index: int, halves: bool) -> torch.Tensor:
    """This rank's shard of ``full`` (the inverse of ``merge``)."""
    if not halves:
        return full.chunk(parts, dim)[index]
    gate, up = full.chunk(2, dim)
    return torch.cat([gate.chunk(parts, dim)[index], up.chunk(parts, dim)[index]], dim)


def load_weights(model, path: str | pathlib.Path, swiglu: bool) -> None:
    """Fill ``model`` (this rank's shard at the served TP) from a legacy checkpoint saved at any TP."""
    from megatron.core import parallel_state

    tp, rank = parallel_state.get_tensor_model_parallel_world_size(), parallel_state.get_tensor_model_parallel_rank()
    files = shard_files(path)
    sources = [_load(f)["model"] for f in files]
    params = dict(model.named_parameters())
    target = {}
    for name, current in model.state_dict().items():
        if name.endswith("_extra_state"):
            target[name] = current
            continue
        missing = [str(f.parent.name) for f, sd in zip(files, sources) if name not in sd]
        if missing:
            raise CheckpointError(f"{path}: tensor '{name}' is missing from {', '.join(missing)}")
        shards = [sd[name] for sd in sources]
        param = params.get(name)
        if param is not None and getattr(param, "tensor_model_parallel", False):
            dim, halves = param.partition_dim, _is_swiglu_fc1(name, swiglu)
            tensor = split(merge(shards, dim, halves), dim, tp, rank, halves)
        else:
            tensor = shards[0]
        if tuple(tensor.shape) != tuple(current.shape):
            raise CheckpointError(
                f"{path}: tensor '{name}' has shape {tuple(tensor.shape)} at TP={tp} (saved at TP={len(files)}) "
                f"but the model built from its args expects {tuple(current.shape)}")
        target[name] = tensor.to(current.dtype)
    extra = sorted(k for k in sources[0] if k not in target and not k.endswith("_extra_state"))
    if extra:
        raise CheckpointError(f"{path}: tensors the model does not have: {', '.join(extra[:5])}")
    model.load_state_dict(target, strict=True)


def save(model, args, directory: str | pathlib.Path, iteration: int) -> pathlib.Path:
    """Write this rank's shard the way Megatron-LM's ``--ckpt-format torch`` does."""
    from megatron.core import parallel_state

    rank = parallel_state.get_tensor_model_parallel_rank()
    directory = pathlib.Path(directory)
    target = directory / f"iter_{iteration:07d}" / f"mp_rank_{rank:02d}"
    target.mkdir(parents=True, exist_ok=True)
    state = {"args": args, "model": model.state_dict(), "iteration": iteration, "checkpoint_version": 3.0}
    torch.save(state, target / SHARD_FILE)
    torch.distributed.barrier()
    if torch.distributed.get_rank() == 0:
        (directory / TRACKER).write_text(str(iteration))
    return target.parent
