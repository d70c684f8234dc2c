"""The penalties of a step's rows: each row's token set rebuilt in Python and uploaded at every step (the way
before ``sampling.TokenCounts``) against ``TokenCounts``, kept on the device and brought up to date with each
accepted token: milliseconds per step of 16 rows with repetition, presence and frequency penalties.

    .venv/bin/python tools/probes/penalty_cost.py

One torch thread. Each step accepts one new token per row, so both ways pay for what grows; each case alternates
the two ways, best of three.
"""

from __future__ import annotations

import pathlib
import random
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))

from preprocessing.params import SamplingParams  # noqa: E402
from triton_backend.engine.sampling import RowSampler, _apply_penalties  # noqa: E402

ROWS, STEPS = 16, 20


def rebuilt(logits: torch.Tensor, rows: list[RowSampler]) -> None:
    """The penalties as they were: the prompt's and output's token set made and uploaded anew at every step."""
    for i, row in enumerate(rows):
        p = row.params
        seen = torch.tensor(sorted(set(row.prompt) | set(row.generated)), device=logits.device)
        values = logits[i, seen]
        logits[i, seen] = torch.where(values > 0, values / p.repetition_penalty, values * p.repetition_penalty)
        ids, counts = torch.tensor(row.generated, device=logits.device).unique(return_counts=True)
        logits[i, ids] -= p.presence_penalty + p.frequency_penalty * counts.to(logits.dtype)


def milliseconds(apply, vocab: int, history: int) -> float:
    pick = random.Random(0)
    params = SamplingParams(max_tokens=STEPS, repetition_penalty=1.2, presence_penalty=0.1, frequency_penalty=0.3)
    rows = []
    for r in range(ROWS):
        row = RowSampler(params, [pick.randrange(vocab) for _ in range(history)], -1, r)
        row.generated = [pick.randrange(vocab) for _ in range(50)]
        rows.append(row)
    logits = torch.randn(ROWS, vocab, generator=torch.Generator().manual_seed(0))
    started = time.perf_counter()
    for _ in range(STEPS):
        for row in rows:
            row.accept(pick.randrange(vocab))
        apply(logits.clone(), rows)
    return (time.perf_counter() - started) / STEPS * 1e3


def main() -> None:
    torch.set_num_threads(1)
    print("vocab | history | rebuilt ms | TokenCounts ms | rebuilt / TokenCounts")
    for vocab in (4096, 32000, 128256):
        for history in (100, 2000):
            old, new = float("inf"), float("inf")
            for _ in range(3):
                old = min(old, milliseconds(rebuilt, vocab, history))
                new = min(new, milliseconds(_apply_penalties, vocab, history))
            print(f"{vocab:6d} | {history:7d} | {old:10.2f} | {new:14.2f} | {old / new:.2f}")


if __name__ == "__main__":
    main()
