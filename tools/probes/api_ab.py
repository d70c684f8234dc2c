"""This tree's HTTP API against another commit's, side by side on one server: which API change costs time.

    .venv/bin/python tools/probes/api_ab.py --baseline REF [--rounds 4] [--concurrency 16]

One server (this tree: Triton, the engine and its own API process); a second API process runs ``REF``'s ``api``
package (from a git worktree) against the same Triton, on the same cores as the server's own API (the server
keeps the engine's cores to the engine thread) unless ``--baseline-on-every-core``. The same seeded streamed
completions (``tools/bench_api.py``'s client) go through each API in turn, ``--rounds`` rounds alternating, plus
``ensemble_stream`` over gRPC as the floor: tokens/s and time to first token p50 of each, and the median TTFT each
API adds over the floor.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

import psutil

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tools.bench import served_one, start_server, workload  # noqa: E402
from tools.bench_api import api_one, run  # noqa: E402
from tools.ports import free_ports  # noqa: E402


def baseline_api(ref: str, grpc: str, env: dict) -> tuple[subprocess.Popen, str, pathlib.Path]:
    """``REF``'s API in a worktree, on a port of its own, against this server's Triton."""
    tree = pathlib.Path(tempfile.mkdtemp(prefix="api_ab_")) / "tree"
    subprocess.run(["git", "worktree", "add", "--detach", str(tree), ref], cwd=ROOT, check=True, capture_output=True)
    (port,) = free_ports(1)
    env = {**os.environ, **env, "TRITON_GRPC_URL": grpc, "API_PORT": str(port), "HOST": "127.0.0.1"}
    proc = subprocess.Popen([sys.executable, "-m", "api"], cwd=tree, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.STDOUT)
    url = f"127.0.0.1:{port}"
    for _ in range(120):
        try:
            with urllib.request.urlopen(f"http://{url}/health", timeout=2):
                return proc, url, tree
        except OSError:
            time.sleep(1)
    raise RuntimeError("the baseline API did not answer")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", required=True)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--requests-per-client", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--baseline-on-every-core", action="store_true",
                        help="leave the baseline API unpinned (by default it gets the server's API's cores)")
    a = parser.parse_args()
    server, grpc, _http, _metrics, api = start_server({"DEVICE": os.environ.get("DEVICE", "cpu")}, all_urls=True,
                                                      api=True)
    env = {"MEGATRON_TRITON_CONTEXT": "256", "TOKENIZER": str(ROOT / "demo_model" / "tokenizer.model")}
    base, base_url, tree = baseline_api(a.baseline, grpc, env)
    # the same cores as the server's own API process (the server keeps its engine's cores to the engine thread)
    ours = next(p for p in psutil.Process(server.pid).children(recursive=True) if p.cmdline()[-2:] == ["-m", "api"])
    if not a.baseline_on_every_core:
        os.sched_setaffinity(base.pid, ours.cpu_affinity())
    print(f"this tree's API on cores {sorted(ours.cpu_affinity())}, {a.baseline}'s on "
          f"{sorted(os.sched_getaffinity(base.pid))}", flush=True)
    jobs = workload(a.concurrency, a.requests_per_client, a.max_tokens)
    added = {"this tree": [], a.baseline: []}
    try:
        for r in range(a.rounds):
            floor_tps, floor_ttft = run(jobs, served_one(grpc))
            print(f"round {r + 1}: ensemble_stream {floor_tps:7.1f} tokens/s, TTFT p50 {1e3 * floor_ttft:6.1f} ms")
            order = [("this tree", api), (a.baseline, base_url)][:: 1 if r % 2 == 0 else -1]
            for name, url in order:
                tps, ttft = run(jobs, api_one(url))
                added[name].append(1e3 * (ttft - floor_ttft))
                print(f"  {name:>12}: {tps:7.1f} tokens/s, TTFT p50 {1e3 * ttft:6.1f} ms "
                      f"(+{1e3 * (ttft - floor_ttft):.1f} ms)", flush=True)
        for name, values in added.items():
            print(f"median TTFT added, {name}: {statistics.median(values):+.1f} ms")
    finally:
        base.terminate()
        os.killpg(server.pid, signal.SIGTERM)
        base.wait(30)
        server.wait(60)
        subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT, capture_output=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
