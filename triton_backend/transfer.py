"""Host-to-device copies that never make the host wait for the device.

On CUDA, torch copies a pageable host tensor to the device synchronously: it first waits for every kernel queued
before it (``cudaStreamSynchronize``), so an upload in the middle of a step stalls the host until the device has
caught up, and the device then runs dry while the host launches what follows. Every upload a step makes goes
through ``upload``: staged in page-locked memory (torch's caching host allocator keeps the buffer until the copy
is done) and copied without waiting. On CPU the data is used where it is. ``tools/gpu_decode.py`` runs decode
steps under ``torch.cuda.set_sync_debug_mode("error")``, which fails on any copy that waits.
"""

from __future__ import annotations

import numpy as np
import torch


def staged(data, device) -> torch.Tensor:
    """``data`` (a numpy array, or a tensor on the CPU) as a CPU tensor to copy to ``device`` without waiting:
    page-locked for CUDA."""
    t = torch.from_numpy(np.ascontiguousarray(data)) if isinstance(data, np.ndarray) else data
    return t.pin_memory() if torch.device(device).type == "cuda" else t


def upload(data, device) -> torch.Tensor:
    """``data`` (a numpy array, or a tensor on the CPU) on ``device``."""
    return staged(data, device).to(device, non_blocking=True)
