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

Why ctypes and gcc rather than a torch C++ extension: the kernel needs no torch headers, and without them it
builds in under a second instead of a minute, with nothing to install (``torch.utils.cpp_extension`` needs
ninja). The library is cached per source, flags and CPU (``-march=native``), under ``KERNEL_CACHE`` (default
``~/.cache/megatron-triton``).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import pathlib
import shutil
import subprocess
import tempfile
import threading

import numpy as np
import torch

LOG = logging.getLogger(__name__)

SOURCE = pathlib.Path(__file__).with_name("paged_decode.c")
# -ffast-math for the compile only: linking a shared library with it (gcc 12) would add crtfastmath.o, which
# flushes denormals to zero in the whole process when the library loads.
FLAGS = ["-O3", "-march=native", "-ffast-math", "-fopenmp-simd", "-fPIC"]
MAX_BLOCK, MAX_DIM, MAX_HEADS = 256, 512, 64  # as paged_decode.c's arrays allow

_lock = threading.Lock()
_library: ctypes.CDLL | None = None
_failed = False


def _cpu_signature() -> str:
    """What ``-march=native`` depends on: the CPU's model and flags."""
    try:
        lines = pathlib.Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return os.uname().machine
    wanted = [line for line in lines if line.startswith(("model name", "flags"))][:2]
    return "\n".join(wanted) or os.uname().machine


def _cache_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get("KERNEL_CACHE") or pathlib.Path.home() / ".cache" / "megatron-triton")


def _build() -> ctypes.CDLL:
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if compiler is None:
        raise RuntimeError("no C compiler (cc or gcc) on PATH")
    source = SOURCE.read_bytes()
    key = hashlib.sha256(source + " ".join(FLAGS).encode() + _cpu_signature().encode() + compiler.encode())
    path = _cache_dir() / f"paged_decode-{key.hexdigest()[:16]}.so"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=path.parent) as work:  # built aside, then moved: ranks may race
            built, objects = pathlib.Path(work) / path.name, pathlib.Path(work) / "paged_decode.o"
            for command in ([compiler, *FLAGS, "-c", str(SOURCE), "-o", str(objects)],
                            [compiler, "-shared", str(objects), "-o", str(built), "-lm"]):
                run = subprocess.run(command, capture_output=True, text=True)
                if run.returncode:
                    raise RuntimeError(f"{compiler} failed: {run.stderr.strip()[-500:]}")
            os.replace(built, path)
    library = ctypes.CDLL(str(path))
    f = library.paged_decode
    pointer, i64 = ctypes.c_void_p, ctypes.c_int64
    f.argtypes = [pointer, pointer, pointer, pointer, pointer, pointer, i64, i64, i64, i64, i64, ctypes.c_float,
                  pointer]
    f.restype = None
    return library


def library() -> ctypes.CDLL | None:
    """The built kernel, or None where it cannot be built (one log line, then the torch path serves)."""
    global _library, _failed
    with _lock:
        if _library is None and not _failed:
            try:
                _library = _build()
            except (OSError, RuntimeError) as err:
                _failed = True
                LOG.warning("the CPU decode attention kernel is not available, torch operations run it: %s", err)
        return _library


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
    (_library or library()).paged_decode(q.data_ptr(), keys.data_ptr(), values.data_ptr(), tables.ctypes.data,
                           table_starts.ctypes.data, lengths.ctypes.data, n, g, h // g, d, bs, scale,
                           out.data_ptr())
    return out
