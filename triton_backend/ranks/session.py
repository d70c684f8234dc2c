"""Rank 0 in a session of its own, so that torchrun's SIGTERM can drain the server instead of cutting it.

torchrun starts each rank as a session leader and stops it with ``killpg``: the signal reaches every process
in the rank's group, tritonserver and its backend stubs included, and Triton then closes its endpoints while
streams are still running. So, under torchrun, rank 0's process only supervises: it starts the real rank 0 in
a new session, forwards SIGTERM/SIGINT to it (which drains, see ``server.watch``) and exits with its code.
If the supervisor dies (torchrun's SIGKILL after its grace period), the real rank 0 kills its whole session.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys

import psutil

ENV = "MEGATRON_TRITON_RANK0_SESSION"  # set in the real rank 0's environment
PR_SET_PDEATHSIG = 1
PARENT_GONE = signal.SIGUSR1


def should_detach(env=os.environ) -> bool:
    """Rank 0 started by torchrun, and not the detached process itself (so: rank 0's supervisor)."""
    return env.get("RANK") == "0" and "TORCHELASTIC_RUN_ID" in env and ENV not in env


def supervise(module: str) -> int:
    """Run ``python -m module`` as the real rank 0 in a new session; forward stop signals; return its exit code."""
    child = subprocess.Popen([sys.executable, "-u", "-m", module], env={**os.environ, ENV: "1"},
                             start_new_session=True, preexec_fn=_signal_me_when_parent_dies)

    def forward(signum, _frame):
        try:
            child.send_signal(signum)
        except ProcessLookupError:
            pass

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    return child.wait()


def _signal_me_when_parent_dies() -> None:  # runs in the child between fork and exec
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(PARENT_GONE))


def end_session_when_parent_dies() -> None:
    """In the real rank 0: when the supervisor is gone, take down this session (Triton and its stubs too)."""
    if os.environ.get(ENV) != "1":
        return

    def end(_signum, _frame):
        os.killpg(os.getpgid(0), signal.SIGKILL)

    signal.signal(PARENT_GONE, end)
    if os.getppid() == 1:  # the supervisor died before the handler was in place
        end(PARENT_GONE, None)


def torchrun_agent() -> psutil.Process:
    """The torchrun process that started this rank (one level further up for the detached rank 0)."""
    parent = psutil.Process().parent()
    return parent.parent() if os.environ.get(ENV) == "1" else parent
