"""What a step sends to the other ranks: its block tables as edits of the ones every rank keeps
(``cache/tables.py``) against the whole tables each step once carried. Bytes per decode step, averaged over a
steady decode of ROWS sequences at CONTEXT tokens (the steps that decode every one of them), counted from the
real engine's steps.

    .venv/bin/python tools/probes/step_bytes.py [--rows 64] [--context 8192] [--steps 64]

A tiny random model (its shape does not change what travels), one rank, the engine's own scheduling: the
payload is the protocol's int64 message (``ranks/protocol.py``), whose size the step's tensors give.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))

from preprocessing.params import SamplingParams  # noqa: E402
from tools.gpu_decode import TINY  # noqa: E402
from triton_backend.engine.engine import Engine  # noqa: E402
from triton_backend.model.architecture import GPTArchitecture  # noqa: E402
from triton_backend.model.gpt import CachedGPT, build_model, init_parallel  # noqa: E402


class Counting:
    """The real model; adds up each decode step's payload, as sent now and as the whole tables made it."""

    def __init__(self, gpt, rows: int):
        self.gpt, self.rows, self.now, self.whole, self.steps = gpt, rows, 0, 0, 0

    def __getattr__(self, name):
        return getattr(self.gpt, name)

    def step(self, tokens, positions, last, lengths, slots, keeps, table_lengths, entries, **kwargs):
        if len(lengths) == self.rows and bool((lengths == 1).all()):  # every sequence decoding
            common = 2 * len(tokens) + len(last) + len(lengths)
            self.now += 8 * (common + 3 * len(lengths) + len(entries))
            self.whole += 8 * (common + len(lengths) + int(table_lengths.sum()))
            self.steps += 1
        return self.gpt.step(tokens, positions, last, lengths, slots, keeps, table_lengths, entries, **kwargs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--context", type=int, default=8192)
    parser.add_argument("--steps", type=int, default=64)
    a = parser.parse_args()
    init_parallel(1, "cpu")
    torch.manual_seed(0)
    longest = a.context + a.rows + a.steps  # the first admitted decodes while the others' prompts are read
    arch = GPTArchitecture(max_position_embeddings=longest, seq_length=longest, **TINY)
    gpt = CachedGPT(build_model(arch), arch, max_slots=a.rows, max_len=longest)
    engine = Engine(gpt, arch.padded_vocab_size, 0, prefill_tokens=a.context)
    engine.gpt = counting = Counting(gpt, a.rows)
    engine.start()
    try:
        with engine._wake:
            gens = [engine.submit([1 + (i * 7 + j) % 500 for j in range(a.context - 1)],
                                  SamplingParams(max_tokens=a.rows + a.steps, end_id=-1)) for i in range(a.rows)]
        for g in gens:
            g.wait(3600)
    finally:
        engine.stop()
    print(f"{a.rows} x {a.context} decode, block size {gpt.cache.block_size}, {counting.steps} decode steps: "
          f"{counting.now / counting.steps / 1024:.1f} KiB a step sent as table edits, "
          f"{counting.whole / counting.steps / 1024:.1f} KiB as whole tables "
          f"({counting.whole / counting.now:.0f}x)")


if __name__ == "__main__":
    main()
