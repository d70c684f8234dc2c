"""The real server with faults a test can trigger on rank 0.

    FAULT_FILE=/some/path HOOK_FAULT_FILE=/other/path torchrun --standalone --nproc-per-node N \
        -m tests.functional.faulty_server

Whenever FAULT_FILE exists, rank 0's next model forward deletes it and raises ``torch.OutOfMemoryError``
instead of running (a failed step). Whenever HOOK_FAULT_FILE exists, the engine thread's next pass raises
outside any step, in a step hook (a bug in the engine's own code). Everything else is the real server: Triton,
the ensemble, the engine, the other ranks.
"""

from __future__ import annotations

import os
import pathlib
import sys

import torch

from triton_backend import server

REAL_LOAD_GPT = server.load_gpt
REAL_LOAD_ENGINE = server.load_engine


class FailsWhenAsked:
    """A rank's model, except that a forward pass fails while the trigger file exists (and removes it)."""

    def __init__(self, gpt, trigger: pathlib.Path):
        self.gpt, self.trigger = gpt, trigger

    def __getattr__(self, name):
        return getattr(self.gpt, name)

    def step(self, *args, **kwargs):
        try:
            self.trigger.unlink()
        except FileNotFoundError:
            return self.gpt.step(*args, **kwargs)
        raise torch.OutOfMemoryError("CUDA out of memory (injected by the test)")


def load_gpt(cfg):
    gpt = REAL_LOAD_GPT(cfg)
    if os.environ.get("RANK", "0") != "0":
        return gpt
    return FailsWhenAsked(gpt, pathlib.Path(os.environ["FAULT_FILE"]))


def load_engine(cfg, *args, **kwargs):
    engine = REAL_LOAD_ENGINE(cfg, *args, **kwargs)
    trigger = pathlib.Path(os.environ.get("HOOK_FAULT_FILE", "/nonexistent"))

    def hook():
        try:
            trigger.unlink()
        except FileNotFoundError:
            return
        raise RuntimeError("a step hook failed (injected by the test)")

    engine.add_step_hook(hook)
    return engine


server.load_gpt = load_gpt
server.load_engine = load_engine

if __name__ == "__main__":
    sys.exit(server.main("tests.functional.faulty_server"))
