"""Decode attention over the paged cache, the torch operations (``PagedAttention._decode``) against the CPU kernel
(``model/decode_kernel.py``), on the same steps: rows, keys per row, groups, query heads per group, head dim.

    .venv/bin/python tools/probes/decode_attention.py

One torch thread; each row's blocks in random pool order, each row at its own length. Prints microseconds per
layer for each and the ratio, and the largest difference between the two outputs.
"""

from __future__ import annotations

import functools
import pathlib
import sys
import time

import numpy as np
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))

from triton_backend.cache.kv_cache import PagedKVCache, plan  # noqa: E402
from triton_backend.model.attention import PagedAttention  # noqa: E402

# (rows, keys per row, groups, heads per group, head dim): the demo model at batch 64, 16 and 1 after 45 tokens,
# and at 64 after 300; the long preset at the capacity run's mean batch and context; a GQA and a wide model.
SHAPES = ((64, 45, 8, 1, 32), (16, 45, 8, 1, 32), (1, 45, 8, 1, 32), (64, 300, 8, 1, 32), (36, 400, 4, 2, 16),
          (64, 200, 2, 4, 64), (8, 1000, 16, 1, 64))
BLOCK = 32


def microseconds(fn, rounds: int = 30, warmup: int = 3) -> float:
    """The best of five timings of ``rounds`` calls of ``fn``, per call, after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        for _ in range(rounds):
            fn()
        best = min(best, (time.perf_counter() - started) / rounds)
    return best * 1e6


def main() -> None:
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    attention = PagedAttention.__new__(PagedAttention)
    torch.nn.Module.__init__(attention)
    attention.layer_index, attention.softmax_scale = 0, None
    print("rows | keys | groups x heads per group x dim | torch us | kernel us | torch / kernel | max difference")
    for n, keys, groups, per_group, dim in SHAPES:
        positions = rng.integers(max(0, keys - BLOCK), keys, size=n)
        table_lengths = positions // BLOCK + 1
        pool = int(table_lengths.sum()) + 8
        cache = PagedKVCache(1, pool, BLOCK, groups, dim, torch.float32, "cpu")
        cache.keys[0].normal_()
        cache.values[0].normal_()
        tables = rng.permutation(pool)[: table_lengths.sum()].astype(np.int64)
        step_args = (cache, torch.from_numpy(positions), np.ones(n, dtype=np.int64), tables, table_lengths)
        by_pairs, by_tables = plan(*step_args), plan(*step_args, pairs=False)
        q = torch.randn(n, groups * per_group, dim)
        k, v = cache.keys[0], cache.values[0]
        reference, got = attention._decode(by_pairs, q, k, v), attention._decode(by_tables, q, k, v)
        torch_us = microseconds(functools.partial(attention._decode, by_pairs, q, k, v))
        kernel_us = microseconds(functools.partial(attention._decode, by_tables, q, k, v))
        print(f"{n} | {keys} | {groups} x {per_group} x {dim} | {torch_us:.0f} | {kernel_us:.0f} | "
              f"{torch_us / kernel_us:.2f} | {(got - reference).abs().max().item():.1e}", flush=True)


if __name__ == "__main__":
    main()
