"""The CPU decode attention kernel (``paged_decode.c``): built with the system's C compiler on first use, cached,
called through ctypes.

Why hand-written C: a decode token's attention over the paged cache, written in torch operations
(``PagedAttention._decode``), is one small product per (block, key/value group) pair, 1 x 32 by 32 x 32 on the
demo model, which MKL's batched GEMM runs at a few GFLOP/s, plus about fifteen more operations per layer for the
softmax across each row's blocks, each with its Python and dispatch cost. Profiled, that was half of a 64-row step
on the ``long`` preset. No library does it for torch on CPU: Intel's extension for PyTorch, which has such a
kernel, stops at torch 2.8; vLLM's CPU kernels come only inside vLLM's own build; torch's FlexAttention needs
inductor to compile each shape. The kernel reads each row's keys and values once, in place, with the softmax
running across blocks (the loop in ``paged_decode.c``), and the torch version stays as the reference the tests
hold it to and as the path wherever the kernel does not apply (CUDA, other dtypes) or cannot be built.

How it is built and loaded (gcc, ctypes, a cache per source and CPU): ``triton_backend/native.py``.
"""

from __future__ import annotations

import ctypes
import pathlib

import numpy as np
import torch

from triton_backend import native

MAX_BLOCK, MAX_DIM, MAX_HEADS = 256, 512, 64  # as paged_decode.c's arrays allow


def _declare(library: ctypes.CDLL) -> None:
    pointer, i64 = ctypes.c_void_p, ctypes.c_int64
    library.paged_decode.argtypes = [pointer, pointer, pointer, pointer, pointer, pointer, i64, i64, i64, i64, i64,
                                     ctypes.c_float, pointer]
    library.paged_decode.restype = None
    library.store_kv.argtypes = [pointer, pointer, pointer, pointer, i64, i64, i64, i64, pointer, pointer, i64, i64,
                                 i64, i64]
    library.store_kv.restype = None


KERNEL = native.Kernel(pathlib.Path(__file__).with_name("paged_decode.c"), _declare,
                       "CPU decode attention kernel", "torch operations run it")


def library() -> ctypes.CDLL | None:
    """The built kernel, or None where it cannot be built (one log line, then the torch path serves)."""
    return KERNEL.library()


def applies(keys: torch.Tensor, heads_per_group: int) -> bool:
    """Whether the kernel can run attention over this layer's pool ``keys`` ([blocks, groups, block_size, d]) for
    ``heads_per_group`` query heads per group: float32 on CPU, a contiguous pool, shapes within its limits."""
    _, _, bs, d = keys.shape
    return keys.device.type == "cpu" and keys.dtype == torch.float32 and keys.is_contiguous() \
        and bs <= MAX_BLOCK and d <= MAX_DIM and heads_per_group <= MAX_HEADS


def decode(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, tables: np.ndarray, table_starts: np.ndarray,
           lengths: np.ndarray, scale: float) -> torch.Tensor:
    """Attention of ``q`` ([n, heads, d], one decode token per sequence) over each sequence's blocks: sequence i
    reads ``lengths[i]`` keys from the blocks ``tables[table_starts[i]:]`` of ``keys``/``values`` ([blocks,
    groups, block_size, d]). Returns [n, heads * d]. ``tables``, ``table_starts`` and ``lengths`` are contiguous
    int64 (``kv_cache.plan`` makes them once per step; each layer's call reads them as they are)."""
    n, h, d = q.shape
    _, g, bs, _ = keys.shape
    q = q.contiguous()
    out = torch.empty(n, h * d, dtype=torch.float32)
    KERNEL.library().paged_decode(q.data_ptr(), keys.data_ptr(), values.data_ptr(), tables.ctypes.data,
                                  table_starts.ctypes.data, lengths.ctypes.data, n, g, h // g, d, bs, scale,
                                  out.data_ptr())
    return out


def stores(keys: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether ``store`` can write ``k``/``v`` ([N, groups, d]) into the pool ``keys`` (and its values): float32 on
    CPU, a contiguous pool, each token's row of each group contiguous."""
    return keys.device.type == "cpu" and keys.dtype == k.dtype == v.dtype == torch.float32 \
        and keys.is_contiguous() and k.stride(2) == v.stride(2) == 1


def store(keys: torch.Tensor, values: torch.Tensor, k: torch.Tensor, v: torch.Tensor, blocks: np.ndarray,
          offsets: np.ndarray) -> None:
    """Token t's ``k``/``v`` ([N, groups, d]) into block ``blocks[t]`` at ``offsets[t]`` of ``keys``/``values``
    ([blocks, groups, block_size, d]); ``blocks`` and ``offsets`` contiguous int64 (``kv_cache.plan``)."""
    n, g, d = k.shape
    KERNEL.library().store_kv(keys.data_ptr(), values.data_ptr(), k.data_ptr(), v.data_ptr(), k.stride(0),
                              k.stride(1), v.stride(0), v.stride(1), blocks.ctypes.data, offsets.ctypes.data, n, g,
                              keys.shape[2], d)
