"""A real server (torchrun -> PyTriton -> tritonserver) in a subprocess on free ports, shared by the module."""

from __future__ import annotations

import dataclasses
import os
import pathlib
import signal
import subprocess
import sys
import time
import urllib.request

import psutil
import pytest

from tools.ports import free_ports

ROOT = pathlib.Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 300


@dataclasses.dataclass
class Server:
    http: str
    grpc: str
    metrics: str
    process: subprocess.Popen
    log: pathlib.Path
    api: str | None = None  # the HTTP API's host:port, when it runs (API=1, the default)

    def get(self, path: str, port_url: str | None = None, timeout: float = 5.0):
        with urllib.request.urlopen(f"http://{port_url or self.http}{path}", timeout=timeout) as r:
            return r.status, r.read()

    def tail(self, n: int = 60) -> str:
        """The log's first traceback (the cause, usually) and its last n lines."""
        lines = self.log.read_text(errors="replace").splitlines()
        causes = ("Traceback", "configuration error", "Signal (")  # the last: tritonserver's crash report
        first = next((i for i, line in enumerate(lines) if any(c in line for c in causes)), len(lines))
        head = lines[first:first + 30] if first < len(lines) - n else []
        return "\n".join([*head, *(["[...]"] if head else []), *lines[-n:]])


def ranks(env) -> int:
    """The job's ranks: TP x PP."""
    return int(env.get("TP") or 1) * int(env.get("PP") or 1)


def start_server(tmp: pathlib.Path, module: str = "triton_backend.server", launch: bool = False, **env) -> Server:
    """Start ``torchrun -m module`` (the server, or a test's wrapper of it) with ``env`` and wait until ready;
    ``launch``: as ``make serve`` does, through ``triton_backend.launch`` (which checks the layout, then runs
    torchrun with the server)."""
    http, grpc, metrics, api = free_ports(4)
    tmp.mkdir(parents=True, exist_ok=True)
    log = tmp / "server.log"
    environ = {**os.environ, "HTTP_PORT": str(http), "GRPC_PORT": str(grpc), "METRICS_PORT": str(metrics),
               "API_PORT": str(api), "DEVICE": "cpu", "HOST": "127.0.0.1", **env}
    torchrun = pathlib.Path(sys.executable).parent / "torchrun"
    command = [str(torchrun), "--standalone", "--nproc-per-node", str(ranks(environ)), "-m", module]
    process = subprocess.Popen(
        [sys.executable, "-m", "triton_backend.launch"] if launch else command,
        cwd=ROOT, env=environ, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
    )
    server = Server(f"127.0.0.1:{http}", f"127.0.0.1:{grpc}", f"127.0.0.1:{metrics}", process, log,
                    f"127.0.0.1:{api}" if (environ.get("API") or "1") == "1" else None)  # make exports it empty
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{server.tail()}")
        try:
            if all(server.get(f"/v2/models/{m}/ready", timeout=2)[0] == 200 for m in ("ensemble", "ensemble_stream")) \
                    and (server.api is None or server.get("/health", server.api, timeout=2)[0] == 200):
                return server
        except OSError:
            pass
        time.sleep(1)
    stop_server(server)
    raise RuntimeError(f"server not ready within {START_TIMEOUT_S} s:\n{server.tail()}")


def stop_server(server: Server, timeout: float = 60) -> int:
    """SIGTERM the whole job, then kill what is left; returns the exit code."""
    if server.process.poll() is None:
        os.killpg(server.process.pid, signal.SIGTERM)
        try:
            server.process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(server.process.pid, signal.SIGKILL)
            server.process.wait()
    return server.process.returncode


def job_processes(server: Server) -> list[psutil.Process]:
    """torchrun and everything it started (ranks, rank 0's serving process, tritonserver, the stubs)."""
    return [top := psutil.Process(server.process.pid)] + top.children(recursive=True)


def rank_process(server: Server, rank: int) -> psutil.Process:
    """The process torchrun started for ``rank``, told by the ``RANK`` torchrun puts in each worker's environment
    (rank 0's is the supervisor of ``ranks/session.py``; the real rank 0 runs in a session of its own below it)."""
    workers = [p for p in psutil.Process(server.process.pid).children() if p.environ().get("RANK") == str(rank)]
    if len(workers) != 1:
        raise LookupError(f"torchrun has {len(workers)} workers with RANK={rank}")
    return workers[0]


def shm_segments(pids) -> list[str]:
    """The PyTriton shared-memory segments in /dev/shm that these processes made."""
    return [p.name for p in pathlib.Path("/dev/shm").iterdir() if any(p.name.startswith(f"pytrtion{i}-") for i in pids)]


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    s = start_server(tmp_path_factory.mktemp("server"))
    yield s
    stop_server(s)


@pytest.fixture(autouse=True)
def _shared_server_lives(request):
    """The test during which the shared server exits fails with the server log's tail (the cause), and every later
    test that needs it says so, rather than each reporting a bare 'connection refused'."""
    if "server" not in request.fixturenames:
        yield
        return
    s = request.getfixturevalue("server")
    if s.process.poll() is not None:
        pytest.fail(f"the shared server exited ({s.process.returncode}) during an earlier test")
    yield
    if s.process.poll() is not None:
        pytest.fail(f"the shared server exited ({s.process.returncode}) during this test:\n{s.tail()}")
