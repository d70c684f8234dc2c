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


def test_the_cuda_graphs_decode_step_reads_each_rows_blocks_in_place_once():
    contexts = [96, 64, 32]  # 3, 2 and 1 whole blocks: padded to 4 rows (a bucket)
    count = bench.cuda_graphs_bytes(contexts)
    element = 2  # bfloat16
    block = bench.BLOCK * bench.GROUPS * bench.HEAD_DIM * element  # one block of keys (or values) of one layer
    moved = dict(count.ops)
    # the kernel: the 6 blocks of keys and values the rows hold (the padding row none), their list entries, and
    # the queries in and out (4 rows, padding included)
    queries = 4 * bench.HEADS * bench.HEAD_DIM * element
    assert moved["flex_attention (fused)"] == 6 * 2 * block + 6 * 8 + 4 * 4 + 2 * queries
    # nothing else moves a block's worth: no copy of any row's keys, only the one new key and value per row it
    # writes and the mask's small tables
    assert max(m for name, m in count.ops if name != "flex_attention (fused)") < block
    assert count.total < 1.2 * bench.needed(contexts)
    assert bench.cpu_kernel_bytes(contexts) < 1.1 * bench.needed(contexts)


def test_the_kernels_count_follows_its_block_lists():
    """Rows holding more blocks are charged for them: the count is read from the mask, not from the contexts."""
    short, long = (bench.cuda_graphs_bytes(c) for c in ([32] * 4, [32 * 5] * 4))
    kernel = [dict(c.ops)["flex_attention (fused)"] for c in (short, long)]
    block = bench.BLOCK * bench.GROUPS * bench.HEAD_DIM * 2
    assert kernel[1] - kernel[0] == 4 * 4 * (2 * block + 8)
