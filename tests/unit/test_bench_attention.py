"""``tools/bench_attention.py``'s byte count: what each kind of operation moves, and the CUDA graphs' decode step
counted from its own operations (the figure `make bench-attention` prints)."""

from __future__ import annotations

import torch

from tools import bench_attention as bench


def test_the_count_charges_gathers_copies_and_products_and_not_views():
    base = torch.empty(100, 8, dtype=torch.float32, device="meta")
    ids = torch.arange(10, device="meta")
    count = bench.ByteCount()
    with count:
        rows = base[ids]  # a gather: reads and writes 10 x 8 floats, reads 10 ids
        view = rows.t()
        copy = view.contiguous()  # a copy: reads and writes 80 floats
        product = torch.mm(rows, base.t())  # reads both operands, writes 10 x 100
    assert [name for name, _ in count.ops] == ["index.Tensor", "t.default", "clone.default", "t.default",
                                               "mm.default"]
    assert [moved for _, moved in count.ops] == [2 * 320 + 80, 0, 640, 0, 320 + 3200 + 4000]
    assert copy.shape == (8, 10) and product.shape == (10, 100)


def test_the_cuda_graphs_decode_step_copies_each_rows_keys_and_values_twice_before_attention():
    contexts = [96, 64, 32]  # 3, 2 and 1 blocks: padded to 4 rows (a bucket) of 4 blocks
    count = bench.cuda_graphs_bytes(contexts)
    element = 2  # bfloat16
    gathered = 4 * 4 * bench.BLOCK * bench.GROUPS * bench.HEAD_DIM * element  # one of K, V, as the bucket pads it
    moved = dict(count.ops)
    assert [m for name, m in count.ops if name == "clone.default"] == [2 * gathered] * 2
    assert moved["scaled_dot_product_attention (fused)"] >= 2 * gathered
    assert count.total >= 5 * gathered > 5 * bench.needed(contexts)  # the padding's share comes on top
    assert bench.cpu_kernel_bytes(contexts) < 1.1 * bench.needed(contexts)
