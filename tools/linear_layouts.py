"""Time ``F.linear`` with a weight stored as Megatron does ([out, in], row-major) and column-major (GPT-2's
``Conv1D`` layout), one torch thread, the weights cycled so that they come from memory as in a step
(``model/functional.py`` picks the layout from these figures).

    .venv/bin/python tools/linear_layouts.py [--copies 40]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

SHAPES = ((1024, 256), (256, 1024), (4096, 256), (3072, 1024), (1024, 1024), (4096, 1024), (1024, 4096))


def microseconds(x: torch.Tensor, weights: list[torch.Tensor], rounds: int = 5) -> float:
    for w in weights:
        F.linear(x, w)
    started = time.perf_counter()
    for _ in range(rounds):
        for w in weights:
            F.linear(x, w)
    return 1e6 * (time.perf_counter() - started) / rounds / len(weights)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--copies", type=int, default=40, help="distinct weights per shape, cycled")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print("out x in | rows | row-major us | column-major us | row / column")
    for out, inn in SHAPES:
        weights = [torch.randn(out, inn) for _ in range(args.copies)]
        columns = [w.t().contiguous().t() for w in weights]
        for rows in (1, 16, 64):
            x = torch.randn(rows, inn)
            row, column = microseconds(x, weights), microseconds(x, columns)
            print(f"{out} x {inn} | {rows} | {row:.0f} | {column:.0f} | {row / column:.2f}", flush=True)


if __name__ == "__main__":
    main()
