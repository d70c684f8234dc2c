"""Two pipeline stages served on one node against the same two stages on two nodes (``make bench-nodes``, root).

    sudo .venv/bin/python tools/bench_nodes.py [--rounds 2] [--concurrency 16] [--requests-per-client 4]

The two nodes are network namespaces joined by a veth pair (``tools/netns.py``): real TCP between the stages,
one torchrun each. The same streamed workload as ``tools/bench.py`` (seeded sampling, fixed lengths) runs
through ``ensemble_stream`` over gRPC at each layout in turn, alternating, and the ratio of output tokens/s is
printed per round: the cost of the network hop between the stages, on the same weights and machine.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import signal
import subprocess
import sys
import tempfile

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from tools.bench import run_clients, served_one, summarize, workload  # noqa: E402
from tools.netns import Nodes, wait_ready  # noqa: E402
from tools.ports import free_ports  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent


def measure(grpc: str, a) -> dict:
    records, wall = run_clients(workload(a.concurrency, a.requests_per_client, a.max_tokens), served_one(grpc))
    return summarize(records, wall)


def one_node(a, log: pathlib.Path) -> dict:
    http, grpc, metrics, api = free_ports(4)
    env = {**os.environ, "PP": "2", "DEVICE": "cpu", "HOST": "127.0.0.1", "HTTP_PORT": str(http),
           "GRPC_PORT": str(grpc), "METRICS_PORT": str(metrics), "API_PORT": str(api), "API": "0"}
    process = subprocess.Popen([sys.executable, "-m", "triton_backend.launch"], cwd=ROOT, env=env,
                               stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_ready(f"127.0.0.1:{http}", process, log)
        return measure(f"127.0.0.1:{grpc}", a)
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(60)


def two_nodes(a, directory: pathlib.Path) -> dict:
    nodes = Nodes(2)
    try:
        env = {"PP": "2", "API": "0", "HTTP_PORT": "8000", "GRPC_PORT": "8001", "METRICS_PORT": "8002"}
        nodes.start(1, directory / "node1.log", **env)
        leader = nodes.start(0, directory / "node0.log", **env)
        wait_ready(f"{nodes.public}:8000", leader, directory / "node0.log")
        return measure(f"{nodes.public}:8001", a)
    finally:
        nodes.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--requests-per-client", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=64)
    a = parser.parse_args()
    directory = pathlib.Path(tempfile.mkdtemp(prefix="bench_nodes_"))
    for round_ in range(1, a.rounds + 1):
        one = one_node(a, directory / "one_node.log")
        two = two_nodes(a, directory)
        print(f"round {round_}: PP=2 on one node {one['output_tokens_per_s']} tokens/s "
              f"(TTFT p50 {one['ttft_p50_ms']} ms, ITL p50 {one['itl_p50_ms']} ms); on two nodes "
              f"{two['output_tokens_per_s']} tokens/s (TTFT p50 {two['ttft_p50_ms']} ms, ITL p50 "
              f"{two['itl_p50_ms']} ms): {two['output_tokens_per_s'] / one['output_tokens_per_s']:.2f}x", flush=True)


if __name__ == "__main__":
    main()
