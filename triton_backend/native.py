"""Small C kernels of our own (``model/paged_decode.c``, ``model/rotary.c``, ``engine/sampling.c``): built with the
system's C compiler on first use, cached, called through ctypes.

Why ctypes and gcc rather than a torch C++ extension: the kernels need no torch headers, and without them one
builds in under a second instead of a minute, with nothing to install (``torch.utils.cpp_extension`` needs
ninja). A library is cached per source, flags, compiler and CPU (``-march=native``), under ``KERNEL_CACHE``
(default ``~/.cache/megatron-triton``). Where none can be built (no compiler), each kernel's torch operations
serve instead, after one log line.
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
from collections.abc import Callable

LOG = logging.getLogger(__name__)

# -ffast-math for the compile only: linking a shared library with it (gcc 12) would add crtfastmath.o, which
# flushes denormals to zero in the whole process when the library loads.
FLAGS = ["-O3", "-march=native", "-ffast-math", "-fopenmp-simd", "-fPIC"]


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


def build(source: pathlib.Path, extra_flags: tuple[str, ...] = ()) -> ctypes.CDLL:
    """The shared library of ``source``, compiled now or found in the cache."""
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if compiler is None:
        raise RuntimeError("no C compiler (cc or gcc) on PATH")
    text = source.read_bytes()
    flags = [*FLAGS, *extra_flags]
    key = hashlib.sha256(text + " ".join(flags).encode() + _cpu_signature().encode() + compiler.encode())
    path = _cache_dir() / f"{source.stem}-{key.hexdigest()[:16]}.so"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=path.parent) as work:  # built aside, then moved: ranks may race
            built, objects = pathlib.Path(work) / path.name, pathlib.Path(work) / f"{source.stem}.o"
            for command in ([compiler, *flags, "-c", str(source), "-o", str(objects)],
                            [compiler, "-shared", str(objects), "-o", str(built), "-lm"]):
                run = subprocess.run(command, capture_output=True, text=True)
                if run.returncode:
                    raise RuntimeError(f"{compiler} failed: {run.stderr.strip()[-500:]}")
            os.replace(built, path)
    return ctypes.CDLL(str(path))


class Kernel:
    """One C source's library, built once per process on first use (``FLAGS`` and ``extra_flags``); ``declare``
    sets its functions' argument types. ``library()`` is None where it cannot be built: ``what`` and ``fallback``
    word the one log line."""

    def __init__(self, source: pathlib.Path, declare: Callable[[ctypes.CDLL], None], what: str, fallback: str,
                 extra_flags: tuple[str, ...] = ()):
        self.source, self.declare, self.what, self.fallback = source, declare, what, fallback
        self.extra_flags = extra_flags
        self._lock = threading.Lock()
        self._library: ctypes.CDLL | None = None
        self._failed = False

    def library(self) -> ctypes.CDLL | None:
        if self._library is not None or self._failed:  # read without the lock once settled: it never changes
            return self._library
        with self._lock:
            if self._library is None and not self._failed:
                try:
                    library = build(self.source, self.extra_flags)
                    self.declare(library)
                    self._library = library
                except (OSError, RuntimeError) as err:
                    self._failed = True
                    LOG.warning("the %s is not available, %s: %s", self.what, self.fallback, err)
            return self._library
