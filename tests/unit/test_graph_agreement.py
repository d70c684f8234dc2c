"""The ranks of a job agree on the static decode steps at start (``CachedGPT.prepare``): every bucket is
made before the server is ready, and when one rank cannot capture one, every rank stops at that bucket and runs
decode steps eagerly; a rank without static steps of its own still votes. Two gloo ranks of a TP=2 job."""

from __future__ import annotations

import pytest

from triton_backend.ranks import local

pytestmark = pytest.mark.timeout(180)


def prepare(failing_rank: int | None, failing_bucket: int | None, without_graphs: int | None = None):
    import torch.distributed as dist

    from tests.unit.models import ARCH
    from triton_backend.model.gpt import CachedGPT, build_model, init_parallel

    init_parallel(2, "cpu")
    rank = dist.get_rank()
    gpt = CachedGPT(build_model(ARCH, tensor_parallel=2), ARCH, max_slots=4, block_size=4, graphs="eager")
    graphs = gpt.graphs
    make = graphs._make

    def failing(rows):
        if rows == failing_bucket:
            raise RuntimeError("out of memory while capturing")
        return make(rows)

    if rank == failing_rank:
        graphs._make = failing
    if rank == without_graphs:
        gpt.graphs = None
    on = gpt.prepare()
    return on, gpt.graphs is None, sorted(graphs.buckets)


def test_every_bucket_is_made_at_start_on_every_rank():
    assert local.spawn(2, prepare, None, None, timeout_s=120) == [(True, False, [1, 2, 4])] * 2


def test_one_ranks_failed_capture_turns_static_steps_off_on_every_rank_at_that_bucket():
    rank0, rank1 = local.spawn(2, prepare, 1, 2, timeout_s=120)
    # rank 0 made bucket 2 too, but stops there with rank 1: neither goes on to bucket 4's warm-up
    assert rank0 == (False, True, [1, 2]) and rank1 == (False, True, [1])


def test_a_rank_without_static_steps_votes_in_each_round():
    on, off = local.spawn(2, prepare, None, None, 1, timeout_s=120)
    assert on == (True, False, [1, 2, 4]) and off == (False, True, [])
