"""The real server with one fault a test can trigger: rank 0's next forward pass fails as a CUDA out-of-memory does.

    FAULT_FILE=/some/path torchrun --standalone --nproc-per-node N -m tests.functional.faulty_server

Whenever FAULT_FILE exists, rank 0's next model forward deletes it and raises ``torch.OutOfMemoryError``
instead of running. Everything else is the real server: Triton, the ensemble, the engine, the other ranks.
"""

from __future__ import annotations

import os
import pathlib
import sys

import torch

from triton_backend import server

REAL_LOAD_GPT = server.load_gpt


class FailsWhenAsked:
    """A rank's model, except that a forward pass fails while the trigger file exists (and removes it)."""

    def __init__(self, gpt, trigger: pathlib.Path):
        self.gpt, self.trigger = gpt, trigger

    def __getattr__(self, name):
        return getattr(self.gpt, name)

    def forward(self, *args):
        try:
            self.trigger.unlink()
        except FileNotFoundError:
            return self.gpt.forward(*args)
        raise torch.OutOfMemoryError("CUDA out of memory (injected by the test)")


def load_gpt(cfg):
    gpt = REAL_LOAD_GPT(cfg)
    if os.environ.get("RANK", "0") != "0":
        return gpt
    return FailsWhenAsked(gpt, pathlib.Path(os.environ["FAULT_FILE"]))


server.load_gpt = load_gpt

if __name__ == "__main__":
    sys.exit(server.main("tests.functional.faulty_server"))
