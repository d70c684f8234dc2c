"""Where the CPU goes while the server serves: CPU seconds of each of the job's processes, by role, and of the
load's own client, over one run of ``tools/bench.py``'s workload from its Python clients and one from
perf_analyzer (docs/measured.md, "Served, with the load from perf_analyzer").

    .venv/bin/python tools/probes/served_cpu.py [--concurrency 16] [--requests-per-client 8]

Each row: CPU seconds and the share of one core over the run's wall time (warm-ups included).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import resource
import signal
import sys
import time

import psutil

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))

from tools.bench import PROMPTS, perf_analyzer, run_clients, served_one, start_server, workload  # noqa: E402
from tools.soak import ranks  # noqa: E402


def roles(pid: int) -> dict[str, list[psutil.Process]]:
    """``soak.ranks``' roles, and the HTTP API's process."""
    found = ranks([pid])
    found["HTTP API"] = [p for p in psutil.Process(pid).children(recursive=True)
                         if p.cmdline()[1:3] == ["-m", "api"]]
    return found


def cpu_by_process(pid: int) -> dict[int, tuple[str, float]]:
    """Each of the job's processes: its role and the CPU seconds it has used so far."""
    found = {}
    for role, ps in roles(pid).items():
        for p in ps:
            try:
                found[p.pid] = (role, sum(p.cpu_times()[:2]))
            except psutil.NoSuchProcess:
                pass
    return found


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def measure(name: str, pid: int, run, client_cpu) -> None:
    """CPU seconds of every role over ``run()`` (which returns the output tokens/s it measured), and of its client;
    a process that started during the run counts all its CPU."""
    before, client_before, start = cpu_by_process(pid), client_cpu(), time.perf_counter()
    tokens_per_s = run()
    wall = time.perf_counter() - start
    client = client_cpu() - client_before
    by_role: dict[str, float] = {}
    for p, (role, seconds) in cpu_by_process(pid).items():
        by_role[role] = by_role.get(role, 0.0) + seconds - before.get(p, (role, 0.0))[1]
    print(f"\n{name}: {tokens_per_s:,.0f} output tokens/s; CPU over {wall:.2f} s")
    for seconds, role in sorted(((s, r) for r, s in by_role.items()), reverse=True) + [(client, "the load's client")]:
        print(f"  {role:<22} {seconds:6.2f} s  {100 * seconds / wall:5.1f} % of a core")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--requests-per-client", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    a = parser.parse_args()

    from triton_backend.config import ServerConfig
    from triton_backend.server import engine_cpus

    cfg = ServerConfig.from_env()
    cfg.device = "cpu"
    proc, url = start_server({"DEVICE": "cpu"}, api=True)
    engine_cpus(cfg)  # the clients keep off the engine thread's core, as in tools/bench.py
    try:
        served_one(url)(PROMPTS[0], dict(max_tokens=4))  # warm-up
        this = psutil.Process()
        jobs = workload(a.concurrency, a.requests_per_client, a.max_tokens)

        def python_clients() -> float:
            records, wall = run_clients(jobs, served_one(url))
            return sum(r["tokens"] for r in records) / wall

        measure("Python clients", proc.pid, python_clients, lambda: sum(this.cpu_times()[:2]))
        measure("perf_analyzer", proc.pid,
                lambda: perf_analyzer(url, a.concurrency, a.max_tokens)["output_tokens_per_s"], children_cpu)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
