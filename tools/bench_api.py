"""The HTTP API's cost against Triton's own protocol, in one run on one server (``make bench-api``).

    .venv/bin/python tools/bench_api.py [--concurrency 16] [--requests-per-client 8] [--max-tokens 64] [--rounds 4]

1. Streaming: the same seeded requests through ``/v1/completions`` (SSE, read raw) and through
   ``ensemble_stream`` over gRPC (tritonclient), ``--rounds`` rounds alternating: output tokens/s and time to
   first token p50 of each, the tokens/s ratio and the TTFT added (issue 15's targets: >= 0.9x, <= 5 ms).
2. Scoring: a 200-token prompt through ``PUT /api`` with ``tokens_to_generate: 0`` (prompt log-probs, no
   generation) against generating one token for it, sequentially, alternating, each prompt new to the prefix
   cache: latency p50 of each and the ratio (target: scoring costs no more than one generated token).

``--rounds 0`` runs the scoring part alone, e.g. on the gpt-350m preset (``make bench-engine`` writes it):
``CHECKPOINT=results/gpt-350m .venv/bin/python tools/bench_api.py --rounds 0 --scoring-reps 5``.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import statistics
import sys
import threading
import time

import requests

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tools.bench import PROMPTS, percentile, run_clients, served_one, start_server, workload  # noqa: E402


def api_one(url):
    """One streamed completion over a kept-alive HTTP connection, read as raw server-sent events with the standard
    library's ``http.client``: the client's own cost stays as small as tritonclient's on the other side. Measured
    in one run: with ``requests`` as the client, its per-request work (on the same two cores as the server) added
    about 4 ms to the API's time to first token at concurrency 16; the ``openai`` package, which parses every
    chunk into pydantic models, more."""
    host, port = url.rsplit(":", 1)
    local = threading.local()

    def one(prompt, params):
        if not hasattr(local, "conn"):
            local.conn = http.client.HTTPConnection(host, int(port), timeout=300)
        body = {"model": "megatron-gpt", "prompt": prompt, "max_tokens": params["max_tokens"],
                "temperature": params["temperature"], "seed": params["seed"], "stream": True, "ignore_eos": True,
                "stream_options": {"include_usage": True}}
        start = time.perf_counter()
        first = last = None
        tokens = 0
        local.conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
        reply = local.conn.getresponse()
        if reply.status != 200:
            raise RuntimeError(f"HTTP {reply.status}: {reply.read()[:200]!r}")
        while line := reply.readline():
            if not line.startswith(b"data: {"):
                continue
            now = time.perf_counter()
            chunk = json.loads(line[6:])
            if chunk["choices"] and chunk["choices"][0]["text"]:
                first = first or now
                last = now
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
        return {"tokens": tokens, "ttft": first - start, "itl": (last - first) / (tokens - 1) if tokens > 1 else None}

    return one


def run(jobs, one):
    """Output tokens/s and time to first token p50 of ``jobs`` (``tools/bench.py``'s clients)."""
    records, wall = run_clients(jobs, one)
    return sum(r["tokens"] for r in records) / wall, percentile([r["ttft"] for r in records], 50)


def scoring(api_url: str, reps: int) -> dict:
    """200-token prompts: tokens_to_generate 0 with logprobs against 1 generated token without. Every prompt
    starts with a word of its own, so neither request finds the other's blocks in the prefix cache."""
    words = " ".join(PROMPTS * 40)
    tokens = requests.post(f"http://{api_url}/tokenize", json={"prompt": words}, timeout=60).json()["tokens"][:199]
    body = requests.post(f"http://{api_url}/detokenize", json={"tokens": tokens}, timeout=60).json()["prompt"]
    times = {"score (tokens_to_generate 0, logprobs)": [], "generate 1 token": []}
    for rep in range(reps):
        for name in times:
            prompt = f"{name.split()[0]}{rep} {body}"
            fields = {"tokens_to_generate": 0, "logprobs": True} if name.startswith("score") else \
                {"tokens_to_generate": 1, "top_k": 1}
            started = time.perf_counter()
            reply = requests.put(f"http://{api_url}/api", json={"prompts": [prompt], **fields}, timeout=120)
            reply.raise_for_status()
            times[name].append(time.perf_counter() - started)
    return {name: round(1000 * statistics.median(t), 1) for name, t in times.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--requests-per-client", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--scoring-reps", type=int, default=20)
    a = parser.parse_args()
    proc, grpc_url, _, _, api_url = start_server({"DEVICE": os.environ.get("DEVICE", "cpu")}, all_urls=True, api=True)
    try:
        jobs = workload(a.concurrency, a.requests_per_client, a.max_tokens)
        if a.rounds:  # 0: scoring only (a large model, CHECKPOINT=...)
            run(jobs[:2], served_one(grpc_url))  # warm up both paths
            run(jobs[:2], api_one(api_url))
        results = {"ensemble_stream (gRPC)": [], "/v1/completions (SSE)": []}
        for _ in range(a.rounds):
            results["ensemble_stream (gRPC)"].append(run(jobs, served_one(grpc_url)))
            results["/v1/completions (SSE)"].append(run(jobs, api_one(api_url)))
        if a.rounds:
            print(f"streaming, concurrency {a.concurrency}, {a.max_tokens} tokens each, {a.rounds} rounds alternating:")
        for name, rounds in results.items():
            for i, (tps, ttft) in enumerate(rounds):
                print(f"  {name:24s} round {i + 1}: {tps:8.1f} tokens/s, TTFT p50 {1000 * ttft:6.1f} ms")
        ratios, added = [], []
        for i in range(a.rounds):
            (g_tps, g_ttft), (o_tps, o_ttft) = results["ensemble_stream (gRPC)"][i], results["/v1/completions (SSE)"][i]
            ratios.append(o_tps / g_tps)
            added.append(1000 * (o_ttft - g_ttft))
            print(f"  round {i + 1}: API / ensemble_stream tokens/s = {ratios[-1]:.2f}x, "
                  f"TTFT added {added[-1]:+.1f} ms")
        if a.rounds:
            print(f"  median of {a.rounds} rounds: API / ensemble_stream tokens/s = {statistics.median(ratios):.2f}x "
                  f"(target >= 0.9), TTFT added {statistics.median(added):+.1f} ms (target <= 5)")
        scored = scoring(api_url, a.scoring_reps)
        print(f"scoring a 200-token prompt, p50 of {a.scoring_reps}: {json.dumps(scored)}")
        values = list(scored.values())
        print(f"  score / generate-one-token = {values[0] / values[1]:.2f}x")
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
