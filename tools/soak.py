"""Load and soak (``make soak``): mixed unary and streaming requests, some cancelled, against a local server.

    .venv/bin/python tools/soak.py [--requests 5000] [--concurrency 64] [--cancel-share 0.1] [--tp 1]
    .venv/bin/python tools/soak.py --attach HTTP GRPC METRICS PID ...   # a server that is already running

Loopback only, bounded by --requests and --max-minutes. Prints one JSON summary and exits non-zero when a
request failed unexpectedly, when the running/waiting/KV gauges do not return to zero after the run, or when the
resident memory of a rank, of rank 0's serving process, of tritonserver or of a model's Python-backend stubs grew
by 10 % or more between the first and the last fifth of the run.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import itertools
import json
import os
import pathlib
import random
import signal
import sys
import threading
import time
import urllib.request

import psutil

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from client import GenerationClient  # noqa: E402
from triton_backend.ranks import session  # noqa: E402

PROMPTS = ["The for statement", "Exceptions are raised when", "A class definition", "The import statement",
           "Assignment statements are used to", "The with statement", "😀 漢字 and\nnewlines"]
KINDS = ["grpc", "http", "stream", "cancel"]  # unary gRPC, unary HTTP, a whole stream, a stream cancelled midway
MEMORY_GROWTH_LIMIT = 0.10


def llm_metrics(metrics_url: str) -> dict:
    with urllib.request.urlopen(f"http://{metrics_url}/metrics", timeout=5) as r:
        lines = r.read().decode().splitlines()
    return {name: float(value) for name, value in (line.rsplit(" ", 1) for line in lines
                                                   if line.startswith("llm_") and "{" not in line)}


def ranks(pids: list[int]) -> dict[str, list[psutil.Process]]:
    """The server's processes to watch, by role: each rank, rank 0's serving process, tritonserver, and Triton's
    Python-backend stubs (summed per model: preprocessing, postprocessing, PyTriton's proxies of megatron_gpt)."""
    found: dict[str, list[psutil.Process]] = {}
    for pid in pids:
        for p in [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]:
            try:
                args = p.cmdline()
            except psutil.Error:
                continue
            cmd = " ".join(args)
            if "triton_backend.server" in cmd and "torchrun" not in cmd:
                env = p.environ()
                if session.should_detach(env):
                    continue  # rank 0's supervisor (triton_backend/ranks/session.py), not the rank itself
                role = f"rank {env.get('RANK', '?')}"
            elif "triton_backend.serving.frontend" in cmd:
                role = "serving process"  # PyTriton's side of rank 0 (triton_backend/serving/frontend.py)
            elif args and args[0].endswith("tritonserver"):
                role = "tritonserver"
            elif len(args) > 1 and args[0].endswith("triton_python_backend_stub"):
                model = pathlib.Path(args[1]).parents[1].name  # <repository>/<model>/1/model.py
                role = f"{model} stubs" if model in ("preprocessing", "postprocessing") else "PyTriton proxy stubs"
            else:
                continue
            found.setdefault(role, []).append(p)
    return found


class MemoryWatch:
    """Samples the resident memory of each role's processes every ``every_s`` with the run's progress (0..1)."""

    def __init__(self, processes: dict[str, list[psutil.Process]], progress, every_s: float = 0.5):
        self.processes, self.progress, self.every_s = processes, progress, every_s
        self.samples: list[tuple[float, dict[str, int]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.wait(self.every_s):
            rss = {}
            for role, processes in self.processes.items():
                try:
                    rss[role] = sum(p.memory_info().rss for p in processes)
                except psutil.Error:
                    pass
            self.samples.append((self.progress(), rss))

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join()
        report = {}
        for role in self.processes:
            first = [s[role] for p, s in self.samples if p <= 0.2 and role in s]
            last = [s[role] for p, s in self.samples if p >= 0.8 and role in s]
            if first and last:
                a, b = sum(first) / len(first), sum(last) / len(last)
                report[role] = {"first_fifth_mib": round(a / 2**20, 1), "last_fifth_mib": round(b / 2**20, 1),
                                "growth": round(b / a - 1, 4)}
        return report


def one_request(i: int, kind: str, http: str, grpc: str, local: threading.local) -> str:
    """Run request ``i``; returns its outcome ("ok" or "cancelled"), raises on anything unexpected."""
    rng = random.Random(i)
    params = dict(max_tokens=rng.randint(4, 48), temperature=rng.choice([0.0, 0.7, 1.0]), top_p=0.95,
                  seed=i, end_id=-1 if rng.random() < 0.5 else None)
    if rng.random() < 0.2:
        params["stop_words"] = ["\n\n"]
    prompt = PROMPTS[i % len(PROMPTS)]
    if kind == "http":
        if not hasattr(local, "http"):
            local.http = GenerationClient(http, "http")
        result = local.http.generate(prompt, **params)
        return "ok" if result.finish_reason in ("stop", "length") else f"finish_reason {result.finish_reason!r}"
    if not hasattr(local, "grpc"):
        local.grpc = GenerationClient(grpc, "grpc")
    if kind == "grpc":
        local.grpc.generate(prompt, **params)
        return "ok"
    stop_after = None
    if kind == "cancel":
        # Cancelled mid-way, far from its last response: tritonserver 2.51 (inside PyTriton 0.7, the latest) can
        # crash when a stream is cancelled just as its final response goes out (docs/measured.md, known
        # limitations), so a cancelled request neither stops at a stop word or the end token nor runs short.
        params.update(max_tokens=max(params["max_tokens"], 64), end_id=-1)
        params.pop("stop_words", None)
        stop_after = rng.randint(1, 4)
    parts = 0
    for parts, _part in enumerate(local.grpc.stream(prompt, **params), 1):
        if parts == stop_after:
            return "cancelled"  # leaving the loop cancels the request
    return "ok"


def soak(http: str, grpc: str, metrics: str, pids: list[int], requests: int, concurrency: int,
         cancel_share: float, max_minutes: float = 30.0) -> dict:
    rng = random.Random(1234)
    kinds = [rng.choices(KINDS, weights=[0.45, 0.15, 0.40 - cancel_share, cancel_share])[0] for _ in range(requests)]
    counter, done = itertools.count(), itertools.count(1)
    finished = [0]
    outcomes: dict[str, int] = {}
    failures: list[str] = []
    lock = threading.Lock()
    deadline = time.monotonic() + 60 * max_minutes
    before = llm_metrics(metrics)
    watch = MemoryWatch(ranks(pids), lambda: finished[0] / requests)

    def worker():
        local = threading.local()
        while time.monotonic() < deadline:
            i = next(counter)
            if i >= requests:
                return
            try:
                outcome = one_request(i, kinds[i], http, grpc, local)
            except Exception as err:  # every failure is unexpected: the requests are valid
                outcome = "failed"
                with lock:
                    failures.append(f"{kinds[i]} #{i}: {type(err).__name__}: {str(err)[:200]}")
            with lock:
                outcomes[outcome] = outcomes.get(outcome, 0) + 1
                finished[0] = next(done)

    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        for f in [pool.submit(worker) for _ in range(concurrency)]:
            f.result()
    duration = time.monotonic() - started
    memory = watch.stop()
    settle = time.monotonic() + 15
    after = llm_metrics(metrics)
    while time.monotonic() < settle and any(after[g] for g in ("llm_running_sequences", "llm_waiting_sequences",
                                                               "llm_kv_cache_usage_ratio")):
        time.sleep(0.25)
        after = llm_metrics(metrics)
    return {
        "requests": finished[0], "concurrency": concurrency, "duration_s": round(duration, 1),
        "requests_per_s": round(finished[0] / duration, 1),
        "outcomes": outcomes, "failures": len(failures), "failure_examples": failures[:5],
        "kinds": {k: kinds[: finished[0]].count(k) for k in KINDS},
        "engine_cancelled": int(after["llm_requests_cancelled_total"] - before["llm_requests_cancelled_total"]),
        "output_tokens": int(after["llm_output_tokens_total"] - before["llm_output_tokens_total"]),
        "gauges_after": {g: after[g] for g in ("llm_running_sequences", "llm_waiting_sequences",
                                               "llm_kv_cache_usage_ratio")},
        "memory": memory,
    }


def verdict(summary: dict, requests: int) -> list[str]:
    problems = []
    if summary["failures"]:
        problems.append(f"{summary['failures']} requests failed")
    if summary["requests"] < requests:
        problems.append(f"only {summary['requests']} of {requests} requests ran within the time limit")
    if any(summary["gauges_after"].values()):
        problems.append(f"gauges not back to zero: {summary['gauges_after']}")
    for role, m in summary["memory"].items():
        if m["growth"] >= MEMORY_GROWTH_LIMIT:
            problems.append(f"{role} resident memory grew {100 * m['growth']:.1f} %")
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--cancel-share", type=float, default=0.1)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--max-minutes", type=float, default=30.0)
    parser.add_argument("--attach", nargs="+", metavar="HTTP GRPC METRICS PID", help="use a running server")
    a = parser.parse_args()
    proc = None
    if a.attach:
        http, grpc, metrics, *pids = a.attach
        pids = [int(p) for p in pids]
    else:
        from bench import start_server

        proc, grpc, http, metrics = start_server({"DEVICE": "cpu", "TP": str(a.tp)}, all_urls=True)
        pids = [proc.pid]
    try:
        summary = soak(http, grpc, metrics, pids, a.requests, a.concurrency, a.cancel_share, a.max_minutes)
    finally:
        if proc is not None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(60)
    problems = verdict(summary, a.requests)
    print(json.dumps({**summary, "problems": problems}, indent=1))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
