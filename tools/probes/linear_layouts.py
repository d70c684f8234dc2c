"""Time a linear layer's product four ways: ``F.linear`` with the weight stored as Megatron does ([out, in],
row-major), stored column-major (GPT-2's ``Conv1D`` layout), oneDNN's product over a copy in its blocked layout
(``torch.ops.mkldnn._linear_pointwise``) and MKL's packed GEMM over a packed copy (``torch.ops.mkl._mkl_linear``),
the ops inductor's CPU freezing emits; one torch thread, the weights cycled so that they come from memory as in
a step (``model/functional.py`` picks the layout and kernel from these figures).

    .venv/bin/python tools/probes/linear_layouts.py [--copies 40]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

SHAPES = ((768, 256), (1024, 256), (256, 1024), (4096, 256), (3072, 1024), (1024, 1024), (4096, 1024), (1024, 4096))


def microseconds(product, x: torch.Tensor, weights: list, rounds: int = 5) -> float:
    for w in weights:
        product(x, w)
    started = time.perf_counter()
    for _ in range(rounds):
        for w in weights:
            product(x, w)
    return 1e6 * (time.perf_counter() - started) / rounds / len(weights)


def mkl_product(x: torch.Tensor, weight_and_pack) -> torch.Tensor:
    weight, pack = weight_and_pack
    return torch.ops.mkl._mkl_linear(x, pack, weight, None, x.shape[0])


def onednn_product(x: torch.Tensor, blocked) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, blocked, None, "none", [], "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--copies", type=int, default=40, help="distinct weights per shape, cycled")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print("out x in | rows | row-major us | column-major us | oneDNN us | MKL packed us | row-major / best other")
    for out, inn in SHAPES:
        weights = [torch.randn(out, inn) for _ in range(args.copies)]
        columns = [w.t().contiguous().t() for w in weights]
        blocked = [torch.ops.mkldnn._reorder_linear_weight(w, 16) for w in weights]
        packs = [(w, torch.ops.mkl._mkl_reorder_linear_weight(w, 1)) for w in weights]
        for rows in (1, 4, 16, 32, 64):
            x = torch.randn(rows, inn)
            row, column = microseconds(F.linear, x, weights), microseconds(F.linear, x, columns)
            onednn, mkl = microseconds(onednn_product, x, blocked), microseconds(mkl_product, x, packs)
            print(f"{out} x {inn} | {rows} | {row:.0f} | {column:.0f} | {onednn:.0f} | {mkl:.0f} | "
                  f"{row / min(column, onednn, mkl):.2f}", flush=True)
        del weights, columns, blocked, packs


if __name__ == "__main__":
    main()
