"""Sampling a step's rows, the CPU kernel (``engine/sampling_kernel.py``) against torch's operations
(``sample(..., kernel=False)``, the path on CUDA) on the same logits and draws: microseconds per step.

    .venv/bin/python tools/probes/sampling_cost.py

One torch thread; a 4,096-token vocabulary (the demo model's and the ``long`` preset's). Rows: temperature 0.8 at
the capacity benchmark's mean batch (43) and at 16, greedy at 64. Also prints how many tokens the two paths chose
differently (a draw within rounding of a boundary between two tokens may land either side).
"""

from __future__ import annotations

import functools
import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))

from preprocessing.params import SamplingParams  # noqa: E402
from tools.probes.decode_attention import microseconds  # noqa: E402
from triton_backend.engine.sampling import RowSampler, sample  # noqa: E402

VOCAB = 4096
CASES = ((43, 0.8), (16, 0.8), (64, 0.0))


def main() -> None:
    torch.set_num_threads(1)
    print("rows | temperature | torch operations us | kernel us | torch / kernel | tokens that differ")
    for n, temperature in CASES:
        logits = torch.randn(n, VOCAB, generator=torch.Generator().manual_seed(n)) * 3
        rows = [RowSampler(SamplingParams(max_tokens=100, temperature=temperature, seed=i, end_id=-1), [1, 2, 3],
                           -1, i) for i in range(n)]
        for r in rows:
            r.uniform()  # one draw per row, kept: both paths read the same numbers

        run = functools.partial(sample, logits, rows, VOCAB)
        differ = sum(a != b for a, b in zip(run(kernel=True)[0], run(kernel=False)[0]))
        torch_us = microseconds(functools.partial(run, kernel=False), rounds=200, warmup=20)
        kernel_us = microseconds(functools.partial(run, kernel=True), rounds=200, warmup=20)
        print(f"{n} | {temperature} | {torch_us:.0f} | {kernel_us:.0f} | {torch_us / kernel_us:.2f} | {differ}",
              flush=True)


if __name__ == "__main__":
    main()
