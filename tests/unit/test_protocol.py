"""The rank protocol over real gloo collectives: followers execute exactly rank 0's steps, then stop."""

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tools.ports import free_ports
from triton_backend.ranks.protocol import Leader, follow


class Recorder:
    """Stands in for CachedGPT: records the step tensors it is given (the protocol is what is under test)."""

    device = torch.device("cpu")
    max_len = 64
    cache = None

    def __init__(self):
        self.calls = []

    def step(self, *step, host=None):
        self.calls.append([t.clone() for t in step])
        return torch.zeros(len(step[2]), 8)


STEPS = [  # packed: tokens, positions, indices of the tokens whose logits are wanted, tokens per sequence,
    # each sequence's slot, table entries kept and table length, and the new entries one after another
    (torch.tensor([5, 2**40, 7]), torch.tensor([0, 1, 2]), torch.tensor([2]), torch.tensor([3]), torch.tensor([0]),
     torch.tensor([0]), torch.tensor([1]), torch.tensor([3])),
    (torch.tensor([9, 2**62, 4, 4]), torch.tensor([3, 250, 0, 1]), torch.tensor([0, 1, 3]), torch.tensor([1, 1, 2]),
     torch.tensor([0, 5, 2]), torch.tensor([1, 1, 0]), torch.tensor([1, 3, 1]), torch.tensor([0, 7, 2**50])),
]


def _rank(rank: int, world: int, port: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    gpt = Recorder()
    if rank == 0:
        leader = Leader(gpt)
        for step in STEPS:
            leader.step(*step)
        leader.heartbeat()
        leader.shutdown()
    else:
        follow(gpt)  # returns on SHUTDOWN
    queue.put((rank, [[t.tolist() for t in call] for call in gpt.calls], [str(t.dtype) for t in gpt.calls[0]]))
    dist.destroy_process_group()


def test_followers_run_the_same_int64_steps_and_stop_on_shutdown():
    (port,) = free_ports(1)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, 3, port, queue)) for r in range(3)]
    for p in procs:
        p.start()
    results = dict((rank, (calls, dtypes)) for rank, calls, dtypes in (queue.get(timeout=60) for _ in procs))
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    expected = [[t.tolist() for t in step] for step in STEPS]
    for rank in range(3):
        calls, dtypes = results[rank]
        assert calls == expected, f"rank {rank}"
        assert dtypes == ["torch.int64"] * 8  # ids beyond float32's exact range survive
