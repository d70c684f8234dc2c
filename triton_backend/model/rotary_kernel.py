"""Rotary embedding of a step's q and k rows on CPU in C (``rotary.c``), bit for bit Megatron's unfused form.

Why: in torch operations a rotation is six small operations (two products, a split, a negation, a concatenation,
a sum) for q and six more for k, in every layer; on the ``long`` preset's capacity run that was 3-4 % of a step.
The C loop makes each element's three float32 roundings in torch's order, compiled without -ffast-math and
without fused multiply-adds (``-ffp-contract=off``), which would round differently: a test holds it to Megatron's
own function bit for bit. ``Rotary`` uses it for float32 CPU rows of the plain form; torch's operations
elsewhere, and where it cannot be built. How it is built and loaded: ``triton_backend/native.py``.
"""

from __future__ import annotations

import ctypes
import pathlib

import torch

from triton_backend import native


def _declare(library: ctypes.CDLL) -> None:
    pointer, i64 = ctypes.c_void_p, ctypes.c_int64
    library.rotate_rows.argtypes = [pointer, i64, i64, i64, i64, i64, pointer, pointer, i64, pointer]
    library.rotate_rows.restype = None


KERNEL = native.Kernel(pathlib.Path(__file__).with_name("rotary.c"), _declare, "CPU rotary kernel",
                       "torch operations rotate", extra_flags=("-fno-fast-math", "-ffp-contract=off"))


def applies(x: torch.Tensor, cos: torch.Tensor) -> bool:
    """Whether the kernel can rotate ``x`` ([rows, heads, d]) by ``cos`` (and sin, alike): float32 on CPU, each
    head's row contiguous, and built."""
    return x.device.type == "cpu" and x.dtype == cos.dtype == torch.float32 and x.stride(2) == 1 \
        and cos.is_contiguous() and KERNEL.library() is not None


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x`` ([rows, heads, d]) rotated by ``cos``/``sin`` ([rows, ..., rot], contiguous); a new contiguous tensor."""
    rows, heads, dim = x.shape
    rot = cos.shape[-1]
    out = torch.empty(rows, heads, dim, dtype=x.dtype)
    KERNEL.library().rotate_rows(x.data_ptr(), rows, heads, dim, x.stride(0), x.stride(1), cos.data_ptr(),
                                 sin.data_ptr(), rot, out.data_ptr())
    return out
