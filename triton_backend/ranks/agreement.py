"""Every node of a job started with the same configuration, or none serves.

Each node runs its own ``make serve``: a node given another checkpoint, TP, PP or NNODES would build another model
or other process groups, and its collectives would hang or mix. Right after the ranks meet (before any model
parallel group exists), each rank's view is gathered to all (one all-gather of small objects over the world),
and every rank that differs from rank 0 is named, on every node, by the variable it differs in.
"""

from __future__ import annotations

import hashlib
import os

import torch.distributed as dist

from triton_backend.config import ServerConfig


def _checkpoint(path) -> str:
    """What a checkpoint is, in a few characters: its iteration and a digest of the architecture it records."""
    from triton_backend import checkpoints
    from triton_backend.checkpoints.layout import iteration_dir

    try:
        arch = checkpoints.read_architecture(path)
    except Exception as err:  # any failure to read is itself the difference to report
        return f"unreadable ({type(err).__name__}: {err})"
    digest = hashlib.sha256(repr(arch).encode()).hexdigest()[:12]
    return f"{iteration_dir(path).name}, architecture {digest}"


def fingerprint(cfg: ServerConfig) -> dict:
    return {"TP": cfg.tensor_parallel, "PP": cfg.pipeline_parallel, "PP_LAYERS": cfg.pp_layers, "EP": cfg.experts_split,
            "NNODES": cfg.nnodes,
            "DTYPE": cfg.dtype,
            "DEVICE": cfg.device, "CHECKPOINT": _checkpoint(cfg.checkpoint)}


def disagreements(views: list[dict], nodes: list[int]) -> list[str]:
    """One line per (rank, variable) that differs from rank 0's ``views``; ``nodes[r]`` is rank r's node."""
    lines = []
    for rank, view in enumerate(views):
        for key, value in view.items():
            if value != views[0][key]:
                lines.append(f"node {nodes[rank]} (rank {rank}) has {key}={value} "
                             f"where node 0 has {key}={views[0][key]}")
    return lines


def check(cfg: ServerConfig) -> list[str]:
    """All ranks: what differs between the ranks' configurations (empty: they agree)."""
    view = fingerprint(cfg)
    views = [None] * dist.get_world_size()
    nodes = [None] * dist.get_world_size()
    dist.all_gather_object(views, view)
    dist.all_gather_object(nodes, int(os.environ.get("GROUP_RANK", cfg.node_rank)))
    return disagreements(views, nodes)
