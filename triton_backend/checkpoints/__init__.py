"""The checkpoints layer: Megatron checkpoints in both layouts Megatron training writes.

``torch_dist`` (the default since Megatron-core 0.8) and ``legacy`` (``--ckpt-format torch``, one file per
tensor-parallel rank) each own their format; this module picks the format of a path, builds the architecture
from the stored training args and checks it against the served tensor-parallel size.
"""

from __future__ import annotations

import pathlib

from triton_backend.model.architecture import GPTArchitecture

from . import legacy, torch_dist
from .layout import TRACKER, CheckpointError
from .torch_dist import save

__all__ = ["TRACKER", "CheckpointError", "load_weights", "read_architecture", "read_args", "save", "tokenizer_spec"]


def read_args(path: str | pathlib.Path):
    """The Megatron ``args`` namespace stored in the checkpoint (either format)."""
    if not pathlib.Path(path).exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    return legacy.read_args(path) if legacy.is_legacy(path) else torch_dist.read_args(path)


def read_architecture(path: str | pathlib.Path, tensor_parallel: int = 1, pipeline_parallel: int = 1,
                      pp_layers: str = "", expert_parallel: int = 0) -> GPTArchitecture:
    """The model's architecture from the checkpoint's args, checked against the served TP and PP sizes, with the
    served stage split ``pp_layers`` (``PP_LAYERS``, ``GPTArchitecture.served_split``) in place of the recorded
    one."""
    args = read_args(path)
    try:
        arch = GPTArchitecture.from_megatron_args(args)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: {err}") from None
    values = vars(args) if not isinstance(args, dict) else args
    saved_tp, saved_ep = values.get("tensor_model_parallel_size") or 1, values.get("expert_model_parallel_size") or 1
    saved_etp = values.get("expert_tensor_parallel_size") or saved_tp
    legacy_experts = arch.num_experts and legacy.is_legacy(path)
    if legacy_experts and saved_etp != saved_tp:
        # each expert's slices would then sit in shards other than the tensor-parallel ranks' (mp_rank_TT)
        raise CheckpointError(f"{path} was saved with expert_tensor_parallel_size={saved_etp} and "
                              f"tensor_model_parallel_size={saved_tp} in the legacy format, whose experts are read "
                              "only when the two are equal: save it as torch_dist (--ckpt-format torch_dist), whose "
                              "experts serve at any TP and EP")
    if legacy_experts and arch.num_experts % saved_ep:
        raise CheckpointError(f"{path}: num_experts={arch.num_experts} is not divisible by the saved "
                              f"expert_model_parallel_size={saved_ep}")
    problem = arch.tensor_parallel_problem(tensor_parallel, expert_parallel)
    if problem:
        raise CheckpointError(f"{path} cannot be served at TP={tensor_parallel}: {problem}")
    try:
        arch = arch.served_split(pipeline_parallel, pp_layers)
        arch.stage_layers(pipeline_parallel)
    except ValueError as err:
        raise CheckpointError(f"{path} cannot be served at PP={pipeline_parallel}: {err}") from None
    return arch


def load_weights(model, path: str | pathlib.Path, arch: GPTArchitecture) -> None:
    """Load (and reshard) the weights of ``path`` into ``model``, strictly: every tensor must be there."""
    if legacy.is_legacy(path):
        legacy.load_weights(model, path, arch)
    else:
        torch_dist.load_weights(model, path)


def tokenizer_spec(path: str | pathlib.Path, tokenizer: str = "", tokenizer_type: str = ""):
    """The tokenizer the checkpoint's args name, with the TOKENIZER / TOKENIZER_TYPE overrides; its files checked
    (``TokenizerError`` names the type, the arg and the paths looked for)."""
    from preprocessing import tokenization

    args = read_args(path)
    values = vars(args) if not isinstance(args, dict) else args
    return tokenization.resolve(values, tokenizer or None, tokenizer_type or None, checkpoint=path)
