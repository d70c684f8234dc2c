"""Machines for the multi-node tests: Linux network namespaces joined by veth pairs (real TCP between them).

    host ── h<id> 10.<a>.1.254 ════ 10.<a>.1.1 c<id> ── node 0 ── v0<id> 10.<a>.0.1 ════ 10.<a>.0.2 v1<id> ── node 1

Node 0 also has a link to the host, through which the tests reach its Triton and API. Each node runs its own
``python -m triton_backend.launch`` (the ``make serve`` of that machine) with NNODES, NODE_RANK and MASTER_ADDR.
``close`` kills whatever runs in the namespaces and deletes them (and their links), however the run ended.
Needs root (``ip netns``); used by ``tests/functional/test_nodes.py`` and ``tools/bench_nodes.py``.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import random
import signal
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


class Nodes:
    def __init__(self, count: int = 2):
        tag = f"{random.randrange(16**4):04x}"
        self.net = random.randrange(100, 250)  # 10.<net>.0.0/16 for this test's links
        self.names = [f"mtn{i}-{tag}" for i in range(count)]
        self.links = (f"v0{tag}", f"v1{tag}")
        self.host_link = (f"h{tag}", f"c{tag}")
        self.processes: list[subprocess.Popen] = []
        try:
            for name in self.names:
                ip("netns", "add", name)
                ip("-n", name, "link", "set", "lo", "up")
            a, b = self.links
            ip("link", "add", a, "type", "veth", "peer", "name", b)
            ip("link", "set", a, "netns", self.names[0])
            ip("link", "set", b, "netns", self.names[1])
            ip("-n", self.names[0], "addr", "add", f"{self.address(0)}/24", "dev", a)
            ip("-n", self.names[1], "addr", "add", f"{self.address(1)}/24", "dev", b)
            h, c = self.host_link
            ip("link", "add", h, "type", "veth", "peer", "name", c)
            ip("link", "set", c, "netns", self.names[0])
            ip("addr", "add", f"10.{self.net}.1.254/24", "dev", h)
            ip("-n", self.names[0], "addr", "add", f"{self.public}/24", "dev", c)
            for ns, dev in ((self.names[0], a), (self.names[1], b), (self.names[0], c)):
                ip("-n", ns, "link", "set", dev, "up")
            ip("link", "set", h, "up")
        except BaseException:
            self.close()
            raise

    def address(self, node: int) -> str:
        """A node's address on the link between the nodes."""
        return f"10.{self.net}.0.{node + 1}"

    @property
    def public(self) -> str:
        """Node 0's address on its link to the host (where clients reach it)."""
        return f"10.{self.net}.1.1"

    def start(self, node: int, log: pathlib.Path, **env: str) -> subprocess.Popen:
        """``python -m triton_backend.launch`` on ``node`` with the job's variables and ``env``."""
        environ = {**os.environ, "NNODES": str(len(self.names)), "NODE_RANK": str(node),
                   "MASTER_ADDR": self.address(0), "MASTER_PORT": "29500", "DEVICE": "cpu", "HOST": "0.0.0.0",
                   **env}
        for name in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):  # launch.py picks the one reaching node 0
            environ.pop(name, None)
        process = subprocess.Popen(["ip", "netns", "exec", self.names[node], sys.executable, "-m",
                                    "triton_backend.launch"], cwd=ROOT, env=environ, stdout=log.open("w"),
                                   stderr=subprocess.STDOUT, start_new_session=True)
        self.processes.append(process)
        return process

    def pids(self, node: int) -> list[int]:
        """Every process running in ``node``'s namespace."""
        out = ip("netns", "pids", self.names[node], check=False).stdout
        return [int(p) for p in out.split()]

    def kill(self, node: int) -> None:
        """The machine dies: every process in its namespace gets SIGKILL."""
        for pid in self.pids(node):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def cut(self, node: int) -> None:
        """Its link to the other nodes goes down (no packet passes, no connection is reset)."""
        ip("-n", self.names[node], "link", "set", self.links[node], "down")

    def slow(self, node: int) -> str:
        """Shape its link: a 2 ms delay where the kernel has netem, else a 20 Mbit/s rate (tbf). Says which."""
        dev = self.links[node]
        tried = subprocess.run(["ip", "netns", "exec", self.names[node], "tc", "qdisc", "add", "dev", dev, "root",
                                "netem", "delay", "2ms"], capture_output=True, text=True)
        if tried.returncode == 0:
            return "netem delay 2ms"
        subprocess.run(["ip", "netns", "exec", self.names[node], "tc", "qdisc", "add", "dev", dev, "root", "tbf",
                        "rate", "20mbit", "burst", "32kbit", "latency", "50ms"], check=True, capture_output=True)
        return "tbf rate 20mbit"

    def close(self) -> None:
        for process in self.processes:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
        for node in range(len(self.names)):
            self.kill(node)
        deadline = time.monotonic() + 10
        while any(self.pids(n) for n in range(len(self.names))) and time.monotonic() < deadline:
            time.sleep(0.2)
        for name in self.names:
            ip("netns", "del", name, check=False)
        ip("link", "del", self.host_link[0], check=False)  # gone with the namespace; a half-made one is not


def wait_ready(http: str, process: subprocess.Popen, log: pathlib.Path, timeout_s: float = 300) -> None:
    """Until both ensembles answer ready on ``http`` (host:port); raises with the log's tail if ``process`` ends."""
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"node 0 exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if all(urllib.request.urlopen(f"http://{http}/v2/models/{m}/ready", timeout=2).status == 200
                   for m in ("ensemble", "ensemble_stream")):
                return
        except OSError:
            pass
        time.sleep(1)
    raise RuntimeError(f"node 0 not ready within {timeout_s} s:\n{log.read_text()[-3000:]}")
