"""`make bench-attention`: the bytes decode attention moves per step against the bytes it must read, per path.

    .venv/bin/python tools/bench_attention.py [--rows 1 64] [--context 1024 4096 8192]

What a decode step must read in each layer is its rows' live keys and values (context x groups x head_dim x 2
x the element size, per row). What each path moves:

* ``cuda (graphs)``: the CUDA default, decode steps replayed as CUDA graphs (``model/graphs.py``): the real
  static step (the refill of its FlexAttention mask, the store of the new keys and values, the attention call)
  run with the cache on meta tensors (shapes and dtypes, no memory) under a dispatch mode that adds up, for
  every operation, the bytes it reads and writes (a gather reads and writes what it gathers, a view moves
  nothing, any other operation reads its inputs and writes its outputs). FlexAttention's kernel is counted
  from its own inputs (``flex_bytes``): the blocks its block mask lists, read in place, once per key-value
  group. Rows are padded to its buckets, as the server pads them; the mask's refill, made once per step, is
  charged to this one layer in full.
* ``cpu (kernel)``: the CPU decode kernel (``model/paged_decode.c``) reads each row's blocks where they are,
  through the block table: its rows' blocks (the last one whole), the queries and the outputs.

The geometry is Llama-3-8B's attention (8 key-value groups of 32 query heads, head_dim 128) in bfloat16, with
this cache's 32-token blocks. The last line is ``decode attention bytes moved/needed at 64 x 4096: X`` for the
CUDA path (target: 1.2).
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys
import types
from unittest import mock

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
from triton_backend.cache.kv_cache import PagedKVCache
from triton_backend.model import flex_paged
from triton_backend.model.graphs import StaticInputs, bucket, refill_mask, static_attend, static_inputs, static_mask

GROUPS, HEADS, HEAD_DIM, BLOCK, DTYPE = 8, 32, 128, 32, torch.bfloat16
SDPA = ("_scaled_dot_product", "scaled_dot_product")


def nbytes(value) -> int:
    tensors = [v for v in (value if isinstance(value, (list, tuple)) else [value]) if isinstance(v, torch.Tensor)]
    return sum(t.numel() * t.element_size() for t in tensors)


class ByteCount(TorchDispatchMode):
    """Adds up the bytes each operation reads and writes (see the module's docstring); ``ops`` keeps each one."""

    def __init__(self):
        super().__init__()
        self.total, self.ops = 0, []

    def __torch_dispatch__(self, func, types_, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.__name__
        inputs = list(args) + list((kwargs or {}).values())
        flat = [t for a in inputs for t in (a if isinstance(a, (list, tuple)) else [a]) if isinstance(t, torch.Tensor)]
        if func.is_view or name.split(".")[0] in ("view", "_unsafe_view", "expand", "transpose", "t", "empty",
                                                   "empty_like", "scalar_tensor"):
            moved = 0  # an alias or an allocation
        elif name.startswith("index.") or name.startswith("index_select"):
            moved = 2 * nbytes(out) + nbytes(flat[1:])
        elif name.startswith("index_put"):  # writes its values where the indices say, reads values and indices
            moved = 2 * nbytes(flat[2:])
        else:
            moved = nbytes(flat) + nbytes(out)
        self.total += moved
        self.ops.append((name, moved))
        return out


def needed(contexts: list[int]) -> int:
    return sum(contexts) * GROUPS * HEAD_DIM * 2 * torch.finfo(DTYPE).bits // 8


def cuda_graphs_bytes(contexts: list[int]) -> ByteCount:
    """One layer of the CUDA graphs' decode step over rows with these context lengths (the new token included):
    the refill of the step's mask, the store of its keys and values, and FlexAttention's kernel."""
    rows, block_counts = len(contexts), [math.ceil(c / BLOCK) for c in contexts]
    num_blocks = sum(block_counts)
    cache = PagedKVCache(1, num_blocks, BLOCK, GROUPS, HEAD_DIM, DTYPE, "meta", scratch=True, group_major=True)
    size = bucket(rows)
    positions = np.array([c - 1 for c in contexts], dtype=np.int64)
    host = static_inputs(positions, np.arange(num_blocks, dtype=np.int64), np.array(block_counts), size,
                         max(block_counts), BLOCK, num_blocks)
    # the mask's small integer tensors are real (the kernel's byte count reads them); the cache is on meta
    inputs = StaticInputs.empty(size, max(block_counts), num_blocks, "cpu")
    inputs.fill(host)
    mask = static_mask(cache, inputs, None)
    attention = types.SimpleNamespace(rotate=lambda q, k, positions: (q, k), softmax_scale=HEAD_DIM ** -0.5,
                                      layer_index=0,
                                      store=lambda c, blocks, offsets, k, v: (_store(c.keys[0], blocks, offsets, k),
                                                                              _store(c.values[0], blocks, offsets, v)))
    q = torch.empty(size, HEADS, HEAD_DIM, dtype=DTYPE, device="meta")
    k, v = (torch.empty(size, GROUPS, HEAD_DIM, dtype=DTYPE, device="meta") for _ in range(2))
    count = ByteCount()

    def flex_kernel(query, key, value, block_mask, *_):
        out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
        moved = flex_bytes(query, key, block_mask) + nbytes(out)
        count.total += moved
        count.ops.append(("flex_attention (fused)", moved))
        return out

    with mock.patch.object(flex_paged, "kernel", lambda device_type, decode=True: flex_kernel), count:
        refill_mask(mask, cache, inputs, None)
        static_attend(cache, inputs, mask)(attention, q, k, v)
    return count


def flex_bytes(query: torch.Tensor, key: torch.Tensor, block_mask) -> int:
    """What FlexAttention's kernel reads, from its own inputs: the queries; for each row and query tile, the blocks
    its list names (keys and values, once per group: the decoding kernel serves a group's query heads together)
    with their list entries and the owner entries the mask function looks up; the lists' counts."""
    _, groups, _, d = key.shape
    counts = block_mask.kv_num_blocks
    blocks = int(counts.sum())
    kv = blocks * block_mask.BLOCK_SIZE[1] * groups * d * 2 * key.element_size()
    return nbytes(query) + kv + blocks * (4 + 4) + nbytes(counts)


def _store(part, blocks, offsets, t):
    # as PagedAttention.store writes a step's keys and values (the indices are real, the cache on meta)
    part[blocks.to(part.device), :, offsets.to(part.device)] = t
    return part


def cpu_kernel_bytes(contexts: list[int]) -> int:
    """The CPU kernel: each row's blocks read in place (whole blocks), its query read and its output written."""
    element = torch.finfo(DTYPE).bits // 8
    blocks = sum(math.ceil(c / BLOCK) for c in contexts)
    return blocks * BLOCK * GROUPS * HEAD_DIM * 2 * element + 2 * len(contexts) * HEADS * HEAD_DIM * element


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--context", type=int, nargs="+", default=[1024, 4096, 8192])
    a = parser.parse_args()
    print("rows x context | needed MB | cuda (graphs) MB | / needed | cpu (kernel) MB | / needed")
    for rows in a.rows:
        for context in a.context:
            contexts = [context] * rows
            want = needed(contexts)
            graphs = cuda_graphs_bytes(contexts).total
            cpu = cpu_kernel_bytes(contexts)
            print(f"{rows:4d} x {context:6d} | {want / 1e6:9.1f} | {graphs / 1e6:16.1f} | {graphs / want:8.2f} | "
                  f"{cpu / 1e6:15.1f} | {cpu / want:8.2f}")
            print(json.dumps({"rows": rows, "context": context, "needed_bytes": want, "cuda_graphs_bytes": graphs,
                              "cpu_kernel_bytes": cpu}))
    contexts = [4096] * 64
    ratio = cuda_graphs_bytes(contexts).total / needed(contexts)
    print(f"decode attention bytes moved/needed at 64 x 4096: {ratio:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
