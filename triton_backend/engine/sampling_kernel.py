"""Greedy and temperature sampling on CPU in C (``sampling.c``), for the rows without top-k, top-p, penalties or
bans; ``sampling.sample`` runs torch's operations for the others, and for every row where the kernel does not
apply (CUDA, other dtypes) or cannot be built.

Why hand-written: drawing a token at a temperature in torch operations is eight passes over the vocabulary, each
writing a [rows, vocab] tensor (the row maximum, the shift, the scale, the exponential, the cumulative sum, the
search, the model's log-sum-exp: 0.66 ms at 43 rows of 4,096, 8 % of a step of the capacity benchmark), where
the kernel reads each row twice and keeps a row's weights in cache. No library samples per row with a caller's
own uniform draw: torch's ``multinomial`` draws from a global or per-call generator, which would tie a seeded
request's tokens to the batch around it. How it is built and loaded: ``triton_backend/native.py``.
"""

from __future__ import annotations

import ctypes
import pathlib

import torch

from triton_backend import native

KEEP, GREEDY, TEMPERATURE = 0, 1, 2  # what the kernel does for a row besides its log-sum-exp


def _declare(library: ctypes.CDLL) -> None:
    pointer, i64 = ctypes.c_void_p, ctypes.c_int64
    library.sample_rows.argtypes = [pointer, i64, i64, i64, pointer, pointer, pointer, pointer, pointer, pointer]
    library.sample_rows.restype = None


# 512-bit vectors where the CPU has them (gcc prefers 256 on most): the exponentials bound this kernel, and
# glibc's 16-wide expf made it 1.3x faster at 43 and 16 temperature rows (tools/probes/sampling_cost.py); the decode
# kernel, bound by memory and its 8-wide sums, gained nothing from them.
KERNEL = native.Kernel(pathlib.Path(__file__).with_name("sampling.c"), _declare, "CPU sampling kernel",
                       "torch operations sample", extra_flags=("-mprefer-vector-width=512",))


def applies(logits: torch.Tensor) -> bool:
    """Whether the kernel can read ``logits`` ([rows, vocab]): float32 on CPU, each row contiguous, and built."""
    return logits.device.type == "cpu" and logits.dtype == torch.float32 and logits.stride(1) == 1 \
        and KERNEL.library() is not None


def sample_rows(logits: torch.Tensor, modes: list[int], temperatures: list[float], uniforms: list[float]):
    """Row i's log-sum-exp and, by ``modes[i]``, its greedy or temperature token (``sampling.c`` says how);
    rows whose mode is ``KEEP`` get -1. Returns (chosen [rows] int64, log-sum-exp [rows] float32)."""
    n, vocab = logits.shape
    chosen = torch.full((n,), -1, dtype=torch.long)
    lse = torch.empty(n, dtype=torch.float32)
    mode = torch.tensor(modes, dtype=torch.int32)
    temperature = torch.tensor(temperatures, dtype=torch.float32)
    uniform = torch.tensor(uniforms, dtype=torch.float32)
    scratch = torch.empty(vocab, dtype=torch.float32)
    KERNEL.library().sample_rows(logits.data_ptr(), logits.stride(0), vocab, n, mode.data_ptr(),
                                 temperature.data_ptr(), uniform.data_ptr(), chosen.data_ptr(), lse.data_ptr(),
                                 scratch.data_ptr())
    return chosen, lse
