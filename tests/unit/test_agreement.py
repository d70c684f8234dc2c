"""The in-job check (``ranks/agreement.py``), the second line behind the nodes' check-in: two gloo ranks, each its
own "node", started with different configurations, both name every difference."""

from __future__ import annotations

import pytest

from triton_backend.ranks import local

pytestmark = pytest.mark.timeout(120)


def check(checkpoint: str, layouts: list[dict]) -> list[str]:
    import torch.distributed as dist

    from triton_backend.config import ServerConfig
    from triton_backend.ranks import agreement

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    try:
        return agreement.check(ServerConfig(checkpoint=checkpoint, nnodes=2, node_rank=rank, device="cpu",
                                            **layouts[rank]))
    finally:
        dist.destroy_process_group()


def test_ranks_started_otherwise_than_rank_0_are_named_on_every_rank(tmp_path):
    layouts = [dict(tensor_parallel=1, pipeline_parallel=2), dict(tensor_parallel=2, pipeline_parallel=2,
                                                                   pp_layers="balanced")]
    want = ["node 1 (rank 1) has TP=2 where node 0 has TP=1",
            "node 1 (rank 1) has PP_LAYERS=balanced where node 0 has PP_LAYERS=",
            "node 1 (rank 1) has EP=2 where node 0 has EP=1"]  # EP follows TP unless set
    assert local.spawn(2, check, str(tmp_path / "ckpt"), layouts, timeout_s=60) == [want, want]
    same = [layouts[0], layouts[0]]
    assert local.spawn(2, check, str(tmp_path / "ckpt"), same, timeout_s=60) == [[], []]
