"""Legacy Megatron-LM checkpoints (``--ckpt-format torch``): one ``model_optim_rng.pt`` per model-parallel rank.

    <dir>/latest_checkpointed_iteration.txt
    <dir>/iter_0000300/mp_rank_00/model_optim_rng.pt       {"args", "model", "iteration", "checkpoint_version"}
    <dir>/iter_0000300/mp_rank_01/model_optim_rng.pt       ...                     (tensor parallelism only)
    <dir>/iter_0000300/mp_rank_00_000/model_optim_rng.pt   TP rank 00 of pipeline stage 000, ...
    <dir>/iter_0000300/mp_rank_00_001_002/...              ... of stage 001 and expert-parallel rank 002

Shards saved at TP=m x PP=p are read for any served TP=n x PP=q. Tensor parallelism: each tensor-parallel
parameter is merged and re-split along its ``partition_dim`` the way Megatron partitions it (QKV is laid out per
query group and the vocabulary is padded to a multiple of the TP size, so a contiguous split is right),
SwiGLU's fc1 as two halves (gate and up) split separately; every other tensor is replicated. Pipeline
parallelism: a stage's file numbers its layers from 0, so each served layer is found by its global index in the
saved stage that held it (both splits are Megatron's, ``GPTArchitecture.stage_layers``); the embedding is in
the first saved stage, the final norm and output layer in the last. A last stage whose output layer is tied to
the embedding keeps a copy of it, as Megatron's does. Expert parallelism: each expert-parallel rank's shard
holds the dense tensors and its own experts numbered from 0, each split across the TP ranks (Megatron's default
``expert_tensor_parallel_size``, TP); experts are found by their global number. Checkpoints trained with
TransformerEngine layer specs hold a layer's norms fused into the linear after them
(``self_attention.linear_qkv.layer_norm_weight``, ``mlp.linear_fc1.layer_norm_weight``; an MoE layer's
``pre_mlp_layernorm`` stays apart): each is read under whichever name the shard holds.
"""

from __future__ import annotations

import pathlib
import re

import torch

from ..model.architecture import GPTArchitecture
from .layout import TRACKER, CheckpointError, iteration_dir

SHARD_FILE = "model_optim_rng.pt"
_RANK_DIR = re.compile(r"mp_rank_(\d{2})((?:_\d{3}){0,2})$")
_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.*)$")


def is_legacy(path: str | pathlib.Path) -> bool:
    directory = iteration_dir(path)
    return any((directory / name / SHARD_FILE).is_file()
               for name in ("mp_rank_00", "mp_rank_00_000", "mp_rank_00_000_000"))


def _saved_sizes(directory: pathlib.Path, names: list[str]) -> tuple[int, int]:
    """(pipeline, expert) parallel sizes the shards were saved at, from the args of the first readable one."""
    for name in sorted(names):
        file = directory / name / SHARD_FILE
        if file.is_file():
            args = _load(file).get("args")
            values = (vars(args) if not isinstance(args, dict) else args) if args is not None else {}
            experts = values.get("expert_model_parallel_size") or 1 if values.get("num_experts") else 1
            return values.get("pipeline_model_parallel_size") or 1, experts
    return 1, 1


def shard_cube(path: str | pathlib.Path) -> list[list[list[pathlib.Path]]]:
    """The saved shards as ``cube[pipeline stage][expert-parallel rank][tensor-parallel rank]``, every one present.

    Megatron names them ``mp_rank_TT``, adds ``_PPP`` when the pipeline size is above 1 and then ``_EEE`` when
    the expert-parallel size is: a lone three-digit suffix is a stage unless the saved args say PP=1 and EP>1.
    Every expert rank's shard holds the same dense tensors and its own experts, numbered from 0."""
    directory = iteration_dir(path)
    found = {}
    for p in directory.iterdir() if directory.is_dir() else []:
        match = _RANK_DIR.match(p.name)
        if match:
            found[p.name] = (int(match.group(1)), [int(n) for n in match.group(2).split("_")[1:]])
    if not found or len({len(suffix) for _, suffix in found.values()}) > 1:
        raise CheckpointError(f"{directory} does not hold mp_rank_TT[_PPP][_EEE] shards (one kind only)")
    suffixes = len(next(iter(found.values()))[1])
    saved_pp, saved_ep = _saved_sizes(directory, list(found)) if suffixes == 1 else (0, 0)
    by_expert = suffixes == 1 and saved_pp == 1 and saved_ep > 1

    def position(suffix: list[int]) -> tuple[int, int]:  # (stage, expert rank)
        if suffixes == 2:
            return suffix[0], suffix[1]
        return (0, suffix[0]) if by_expert else (suffix[0] if suffix else 0, 0)

    grid = {(*position(suffix), t): directory / name / SHARD_FILE for name, (t, suffix) in found.items()}
    stages, experts, ranks = (1 + max(key[i] for key in grid) for i in range(3))

    def name(s: int, e: int, t: int) -> str:
        parts = [s, e] if suffixes == 2 else [e] if by_expert else [s] if suffixes else []
        return f"mp_rank_{t:02d}" + "".join(f"_{n:03d}" for n in parts)

    missing = [name(s, e, t) for s in range(stages) for e in range(experts) for t in range(ranks)
               if (s, e, t) not in grid]
    if missing:
        raise CheckpointError(f"{directory} lacks the shards {', '.join(missing[:4])}")
    return [[[grid[(s, e, t)] for t in range(ranks)] for e in range(experts)] for s in range(stages)]


def shard_grid(path: str | pathlib.Path) -> list[list[pathlib.Path]]:
    """The shards of the first expert rank (all of them without expert parallelism) as
    ``grid[pipeline stage][tensor-parallel rank]``: every dense tensor is there."""
    return [stage[0] for stage in shard_cube(path)]


def shard_files(path: str | pathlib.Path) -> list[pathlib.Path]:
    """Every shard file, first stage first."""
    return [f for stage in shard_cube(path) for expert in stage for f in expert]


def _load(file: pathlib.Path) -> dict:
    # The file pickles argparse.Namespace args, so weights_only loading cannot read it: only load checkpoints
    # you trust (the same holds for Megatron itself).
    return torch.load(file, map_location="cpu", weights_only=False, mmap=True)


def read_args(path: str | pathlib.Path):
    state = _load(shard_files(path)[0])
    if "args" not in state:
        raise CheckpointError(f"{path} stores no training args; cannot tell the model's architecture")
    return state["args"]


_TE_NORMS = re.compile(r"^(.*\.layers\.\d+\.)(input_layernorm|pre_mlp_layernorm)\.(weight|bias)$")


def te_name(name: str) -> str:
    """``name`` as a checkpoint trained with TransformerEngine layer specs holds it: a dense layer's norms fused
    into the linear after them (an MoE layer's ``pre_mlp_layernorm`` stays apart, under the local spec's name)."""
    match = _TE_NORMS.match(name)
    if not match:
        return name
    linear = "self_attention.linear_qkv" if match[2] == "input_layernorm" else "mlp.linear_fc1"
    return f"{match[1]}{linear}.layer_norm_{match[3]}"


def _is_swiglu_fc1(name: str, swiglu: bool) -> bool:
    """A gated MLP's fc1, stacked [gate; up]: the dense MLP's, each expert's and the shared experts'."""
    return swiglu and re.search(r"\.mlp\.(?:experts\.local_experts\.\d+\.|shared_experts\.)?linear_fc1\.",
                                name) is not None


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


class _Source:
    """The saved shards, read lazily stage by stage, and where each tensor of the served stage comes from."""

    def __init__(self, path, arch):
        self.path = path
        self.cube = shard_cube(path)
        self.grid = [stage[0] for stage in self.cube]
        # The saved split, from the args saved with it (``arch`` may carry a served split, PP_LAYERS)
        saved = GPTArchitecture.from_megatron_args(read_args(path))
        self.stages = saved.stage_layers(len(self.grid))
        self.saved_experts = (saved.num_experts or 0) // len(self.cube[0])  # each expert rank's, numbered from 0
        self.tied = not arch.untie_embeddings_and_output_weights
        self._states: dict[tuple[int, int], list[dict]] = {}

    def states(self, stage: int, expert_rank: int = 0) -> list[dict]:
        if (stage, expert_rank) not in self._states:
            self._states[(stage, expert_rank)] = [_load(f)["model"] for f in self.cube[stage][expert_rank]]
        return self._states[(stage, expert_rank)]

    def files(self, stage: int, expert_rank: int = 0) -> list[pathlib.Path]:
        return self.cube[stage][expert_rank]

    def locate(self, name: str, first_layer: int) -> tuple[int, int, str]:
        """(saved stage, saved expert rank, name there) of the served stage's tensor ``name`` (experts under their
        global numbers), whose layers start at ``first_layer``."""
        layer = _LAYER.match(name)
        if layer:
            index = first_layer + int(layer.group(1))
            stage = next(s for s, layers in enumerate(self.stages) if index in layers)
            rest, expert_rank = layer.group(2), 0
            expert = _EXPERT.match(rest)
            if expert and len(self.cube[stage]) > 1:
                expert_rank, local = divmod(int(expert[2]), self.saved_experts)
                rest = f"{expert[1]}{local}{expert[3]}"
            return stage, expert_rank, f"decoder.layers.{index - self.stages[stage].start}.{rest}"
        if name.startswith("embedding."):
            return 0, 0, name
        last = len(self.stages) - 1
        if name == "output_layer.weight" and self.tied and name not in self.states(last)[0]:
            return 0, 0, "embedding.word_embeddings.weight"  # a tied output layer saved in one stage: the embedding
        return last, 0, name


_EXPERT = re.compile(r"^(.*\bmlp\.experts\.local_experts\.)(\d+)(\..*)$")


class _Experts:
    """Where this rank's experts are: EP ranks share out each MoE layer's experts in order (rank e holds
    e x n / EP onwards, numbered from 0 in its model), and each expert is split TP / EP ways. Checkpoints hold
    every expert under its global number."""

    def __init__(self, arch):
        from megatron.core import parallel_state

        self.ep = parallel_state.get_expert_model_parallel_world_size() if arch.num_experts else 1
        self.local = (arch.num_experts or 0) // self.ep
        self.first = parallel_state.get_expert_model_parallel_rank() * self.local if arch.num_experts else 0
        if arch.num_experts:
            self.tp = parallel_state.get_expert_tensor_parallel_world_size()
            self.tp_rank = parallel_state.get_expert_tensor_parallel_rank()

    @staticmethod
    def owns(name: str) -> bool:
        return _EXPERT.match(name) is not None

    def saved_name(self, name: str) -> str:
        match = _EXPERT.match(name)
        return f"{match[1]}{self.first + int(match[2])}{match[3]}" if match else name

    def elsewhere(self, saved: str) -> bool:
        """A saved expert's tensor another EP rank loads."""
        match = _EXPERT.match(saved)
        return match is not None and not self.first <= int(match[2]) < self.first + self.local


def load_weights(model, path: str | pathlib.Path, arch) -> None:
    """Fill ``model`` (this rank's shard at the served TP, its pipeline stage at the served PP) from a legacy
    checkpoint saved at any TP x PP."""
    from megatron.core import parallel_state

    tp, rank = parallel_state.get_tensor_model_parallel_world_size(), parallel_state.get_tensor_model_parallel_rank()
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    stage = parallel_state.get_pipeline_model_parallel_rank()
    experts = _Experts(arch)
    source = _Source(path, arch)
    first_layer = arch.stage_layers(pp)[stage].start
    params = dict(model.named_parameters())
    target, used = {}, set()
    for name, current in model.state_dict().items():
        if name.endswith("_extra_state"):
            target[name] = current
            continue
        at, expert_rank, saved = source.locate(experts.saved_name(name), first_layer)
        states = source.states(at, expert_rank)
        saved = te_name(saved) if saved not in states[0] and te_name(saved) in states[0] else saved
        files = source.files(at, expert_rank)
        missing = [str(f.parent.name) for f, sd in zip(files, states) if saved not in sd]
        if missing:
            raise CheckpointError(f"{path}: tensor '{saved}' is missing from {', '.join(missing)}")
        if expert_rank == 0:
            used.add((at, saved))
        shards = [sd[saved] for sd in states]
        param = params.get(name)
        if param is not None and getattr(param, "tensor_model_parallel", False):
            dim, halves = param.partition_dim, _is_swiglu_fc1(name, arch.swiglu)
            parts, index = (experts.tp, experts.tp_rank) if experts.owns(name) else (tp, rank)
            tensor = split(merge(shards, dim, halves), dim, parts, index, halves)
        else:
            tensor = shards[0]
        if tuple(tensor.shape) != tuple(current.shape):
            raise CheckpointError(
                f"{path}: tensor '{name}' has shape {tuple(tensor.shape)} at TP={tp} (saved at TP={len(files)}) "
                f"but the model built from its args expects {tuple(current.shape)}")
        target[name] = tensor.to(current.dtype)
    if pp == 1:  # the whole model was read: whatever it did not use does not belong to it
        last = len(source.grid) - 1
        extra = sorted(f"{k}" for s in range(len(source.grid)) for k in source.states(s)[0]
                       if (s, k) not in used and not k.endswith("_extra_state") and not experts.elsewhere(k)
                       and not (source.tied and s == last and s > 0 and k == "output_layer.weight"))
        if extra:
            raise CheckpointError(f"{path}: tensors the model does not have: {', '.join(extra[:5])}")
    model.load_state_dict(target, strict=True)


def stage_state(state: dict, layers: range, first: bool, last: bool, tied: bool) -> dict:
    """The part of a whole model's state dict a pipeline stage of ``layers`` saves, its layers numbered from 0
    (Megatron's legacy layout); a tied last stage keeps its copy of the embedding as ``output_layer.weight``."""
    out = {}
    for name, tensor in state.items():
        layer = _LAYER.match(name)
        if layer:
            index = int(layer.group(1))
            if index in layers:
                out[f"decoder.layers.{index - layers.start}.{layer.group(2)}"] = tensor
        elif name.startswith("embedding."):
            if first:
                out[name] = tensor
        elif last:
            out[name] = tensor
    if last and tied and not first:
        out["output_layer.weight"] = state["embedding.word_embeddings.weight"]
    return out


def expert_rank_state(state: dict, num_experts: int, ranks: int, rank: int) -> dict:
    """What expert-parallel rank ``rank`` of ``ranks`` saves of a state dict holding every expert: the dense tensors
    and its own experts, numbered from 0 (Megatron's legacy layout)."""
    local = num_experts // ranks
    out = {}
    for name, tensor in state.items():
        expert = _EXPERT.match(name)
        if expert is None:
            out[name] = tensor
        elif rank * local <= int(expert[2]) < (rank + 1) * local:
            out[f"{expert[1]}{int(expert[2]) - rank * local}{expert[3]}"] = tensor
    return out


def save(model, args, directory: str | pathlib.Path, iteration: int, stages: list[range] | None = None,
         stage: int | None = None) -> pathlib.Path:
    """Write this rank's shard the way Megatron-LM's ``--ckpt-format torch`` does. With ``stages`` (a pipeline
    split of the whole ``model``), write stage ``stage``'s part of it as ``mp_rank_TT_PPP``. With
    ``args.expert_model_parallel_size`` E > 1 (``model`` holding every expert), write what each of the E expert
    ranks would, as ``mp_rank_TT[_PPP]_EEE``."""
    from megatron.core import parallel_state

    rank = parallel_state.get_tensor_model_parallel_rank()
    directory = pathlib.Path(directory)
    state = model.state_dict()
    name = f"mp_rank_{rank:02d}"
    if stages is not None:
        tied = not getattr(args, "untie_embeddings_and_output_weights", False)
        state = stage_state(state, stages[stage], stage == 0, stage == len(stages) - 1, tied)
        name += f"_{stage:03d}"
    ranks = getattr(args, "expert_model_parallel_size", None) or 1
    shards = {name: state} if ranks == 1 else {
        f"{name}_{e:03d}": expert_rank_state(state, args.num_experts, ranks, e) for e in range(ranks)}
    for shard, content in shards.items():
        target = directory / f"iter_{iteration:07d}" / shard
        target.mkdir(parents=True, exist_ok=True)
        torch.save({"args": args, "model": content, "iteration": iteration, "checkpoint_version": 3.0},
                   target / SHARD_FILE)
    torch.distributed.barrier()
    if torch.distributed.get_rank() == 0:
        (directory / TRACKER).write_text(str(iteration))
    return directory / f"iter_{iteration:07d}"
