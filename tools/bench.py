"""Benchmark the served ensemble against the same engine in-process (``make bench``).

    .venv/bin/python tools/bench.py [--concurrency 1 4 16 64] [--requests-per-client 8] [--max-tokens 64]
                                    [--mixed-requests 160] [--peer]

1. Starts the server (TP=1, demo model unless CHECKPOINT/TOKENIZER are set) on free loopback ports and, at
   each concurrency, streams requests through ``ensemble_stream`` over gRPC from that many clients: output
   tokens/s, requests/s, time to first token p50/p99, inter-token latency p50. Then perf_analyzer sends the
   same load (``--no-perf-analyzer``: not): its output tokens/s, from a client that takes less of the CPU.
2. Runs the same workload in-process on the engine (no Triton), and prints served/in-process ratios.
3. Mixed output lengths (8..256 tokens), in-process: in-flight batching (a freed slot is refilled at once)
   against batch-at-a-time serving of the same requests at the same batch size.
4. With ``--peer`` (``make bench``): transformers' ``generate()`` on the same weights at each concurrency's batch
   size, and the served tokens/s over it.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import pathlib
import queue
import random
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.request

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tools.ports import free_ports  # noqa: E402

SERVER_LOG = pathlib.Path("/tmp/megatron_triton_bench_server.log")

PROMPTS = ["The for statement", "Exceptions are raised when", "A class definition", "The import statement",
           "Assignment statements are used to", "The with statement"]


def percentile(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(q / 100 * len(values)))] if values else float("nan")


def summarize(records, wall):
    tokens = sum(r["tokens"] for r in records)
    itl = [r["itl"] for r in records if r["itl"] is not None]
    return {"output_tokens_per_s": round(tokens / wall, 1), "requests_per_s": round(len(records) / wall, 2),
            "ttft_p50_ms": round(1000 * percentile([r["ttft"] for r in records], 50), 1),
            "ttft_p99_ms": round(1000 * percentile([r["ttft"] for r in records], 99), 1),
            "itl_p50_ms": round(1000 * statistics.median(itl), 2) if itl else None}


def workload(concurrency, per_client, max_tokens):
    """(client, prompt, params) for every request: the same list served and in-process."""
    return [[(PROMPTS[(c + i) % len(PROMPTS)], dict(max_tokens=max_tokens, temperature=0.8, seed=c * 1000 + i,
                                                     end_id=-1)) for i in range(per_client)]
            for c in range(concurrency)]


def run_clients(jobs, one):
    """Each client's requests in order, from a thread of its own; returns the records and the wall time. The clock
    starts once every client has sent one 1-token request of its own: a served client's gRPC channel and stream
    are then open, as perf_analyzer's are before it measures (opening 16 of them inside the run put up to 300 ms
    into the first requests' TTFT)."""
    started = []
    ready = threading.Barrier(len(jobs), action=lambda: started.append(time.perf_counter()))

    def client(js):
        try:
            one(js[0][0], {**js[0][1], "max_tokens": 1})
        except BaseException:
            ready.abort()  # the other clients' wait raises rather than hangs
            raise
        ready.wait()
        return [one(p, kw) for p, kw in js]

    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        records = [r for rs in pool.map(client, jobs) for r in rs]
    return records, time.perf_counter() - started[0]


def served_one(url):
    from client import GenerationClient

    local = threading.local()

    def one(prompt, params):
        if not hasattr(local, "client"):
            local.client = GenerationClient(url, "grpc")
        start = time.perf_counter()
        first = last = None
        tokens = 0
        for part in local.client.stream(prompt, **params):
            now = time.perf_counter()
            if part.num_output_tokens > tokens:
                first = first or now
                last = now
                tokens = part.num_output_tokens
        itl = (last - first) / (tokens - 1) if tokens > 1 else None
        return {"tokens": tokens, "ttft": first - start, "itl": itl}

    return one


def perf_analyzer(url: str, concurrency: int, max_tokens: int) -> dict:
    """perf_analyzer (Triton's C++ load generator, the tool users measure with) on ``ensemble_stream`` at
    ``concurrency``, the same prompts and sampling as ``workload``: its steady-state requests/s times ``max_tokens``
    (every request makes exactly that many: ``end_id`` -1). Beside the Python clients it takes less of the CPU the
    server shares on a small machine."""
    import sysconfig
    import tempfile

    rows = [{"text_input": [prompt], "max_tokens": [max_tokens], "end_id": [-1], "temperature": [0.8], "seed": [i]}
            for i, prompt in enumerate(PROMPTS)]
    site = pathlib.Path(sysconfig.get_paths()["purelib"])
    env = {**os.environ, "LD_LIBRARY_PATH": str(site / "nvidia" / "cuda_runtime" / "lib")}
    with tempfile.NamedTemporaryFile("w", suffix=".json") as data:
        json.dump({"data": rows}, data)
        data.flush()
        run = subprocess.run(
            [str(pathlib.Path(sys.executable).parent / "perf_analyzer"), "-m", "ensemble_stream", "-u", url, "-i",
             "grpc", "--streaming", "--async", "--input-data", data.name, "--concurrency-range",
             f"{concurrency}:{concurrency}", "--measurement-interval", "4000", "--max-trials", "3",
             "--stability-percentage", "100", "--warmup-request-count", str(concurrency)],  # 2.50 hangs on fewer
            env=env, capture_output=True, text=True, timeout=600)
    found = re.search(rf"Concurrency: {concurrency}, throughput: ([\d.]+) infer/sec, latency (\d+) usec", run.stdout)
    if run.returncode or not found:
        raise RuntimeError(f"perf_analyzer failed ({run.returncode}): {(run.stdout + run.stderr)[-800:]}")
    return {"output_tokens_per_s": round(float(found.group(1)) * max_tokens, 1),
            "requests_per_s": round(float(found.group(1)), 2), "latency_avg_ms": round(int(found.group(2)) / 1000, 1)}


def engine_one(engine, tokenizer):
    from preprocessing.params import SamplingParams

    def one(prompt, params):
        stamps = []
        start = time.perf_counter()
        # track_text: the engine detokenizes as it goes, as it does for a served stream (same work, same text)
        g = engine.submit(tokenizer.encode(prompt), SamplingParams(**params),
                          listener=lambda g: stamps.append(time.perf_counter()), track_text=True)
        g.wait()
        first, last = stamps[0], stamps[-1]
        tokens = len(g.tokens)
        return {"tokens": tokens, "ttft": first - start, "itl": (last - first) / (tokens - 1) if tokens > 1 else None}

    return one


def start_server(env, all_urls: bool = False, api: bool = False):
    """A server on free loopback ports; returns the process and the gRPC url (or gRPC, HTTP, metrics urls; with
    ``api``, the HTTP API's url after them, once it answers)."""
    ports = free_ports(4)
    env = {**os.environ, **env, "HTTP_PORT": str(ports[0]), "GRPC_PORT": str(ports[1]),
           "METRICS_PORT": str(ports[2]), "API_PORT": str(ports[3]), "HOST": "127.0.0.1"}
    torchrun = pathlib.Path(sys.executable).parent / "torchrun"
    log = SERVER_LOG.open("w")  # noqa: SIM115 - lives as long as the server
    proc = subprocess.Popen([str(torchrun), "--standalone", "--nproc-per-node", env.get("TP", "1"), "-m",
                             "triton_backend.server"],
                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{ports[0]}/v2/models/ensemble/ready", timeout=2):
                pass
            if api:
                with urllib.request.urlopen(f"http://127.0.0.1:{ports[3]}/health", timeout=2):
                    pass
            urls = [f"127.0.0.1:{port}" for port in (ports[1], ports[0], ports[2])]
            urls += [f"127.0.0.1:{ports[3]}"] if api else []
            return (proc, *urls) if all_urls else (proc, urls[0])
        except OSError:
            if proc.poll() is not None:
                break
            time.sleep(1)
    raise RuntimeError(f"server did not become ready; see {SERVER_LOG}")


def mixed_lengths(engine, tokenizer, requests, batch):
    """Output tokens/s for in-flight batching vs batch-at-a-time on the same mixed-length requests."""
    from preprocessing.params import SamplingParams

    rng = random.Random(0)
    items = [(tokenizer.encode(PROMPTS[i % len(PROMPTS)]),
              SamplingParams(max_tokens=rng.choice([8, 16, 32, 64, 128, 256 - 16]), temperature=0.8, seed=i,
                             end_id=-1)) for i in range(requests)]
    total = sum(p.max_tokens for _, p in items)
    start = time.perf_counter()
    for i in range(0, len(items), batch):  # a batch must finish before the next starts
        for g in [engine.submit(ids, p) for ids, p in items[i : i + batch]]:
            g.wait()
    static = total / (time.perf_counter() - start)
    start = time.perf_counter()
    finished: queue.Queue = queue.Queue()

    def submit(ids, p):
        engine.submit(ids, p, listener=lambda g: g.done and finished.put(g))

    pending = list(items)
    for _ in range(min(batch, len(pending))):
        submit(*pending.pop(0))
    for _ in range(len(items)):  # keep `batch` requests in flight: a finished one is replaced at once
        finished.get()
        if pending:
            submit(*pending.pop(0))
    inflight = total / (time.perf_counter() - start)
    return {"requests": requests, "batch": batch, "output_tokens": total, "batch_at_a_time_tokens_per_s":
            round(static, 1), "in_flight_tokens_per_s": round(inflight, 1), "ratio": round(inflight / static, 2)}


def peer(engine, tokenizer, cpus, results: dict, max_tokens: int) -> None:
    """transformers' ``generate()`` on the engine's own weights, pinned as the engine is, at each concurrency's
    batch size (``bench_engine.hf_bench``: the first prompt, greedy, ``max_tokens`` each), and the served run's
    tokens/s over it. The served run samples at temperature 0.8, which costs it more than greedy choice costs
    ``generate()``: the comparison leans against the server."""
    from tools import hf_reference
    from tools.bench_engine import PinnedWorker, hf_bench

    hf = hf_reference.hf_from_megatron(engine.gpt.model, engine.gpt.arch)
    worker = PinnedWorker(cpus)
    prompt = tokenizer.encode(PROMPTS[0])
    for c, row in results.items():
        theirs = worker.run(hf_bench, hf, prompt, c, max_tokens, tokenizer.vocab_size, tokenizer.pad_id)
        row["transformers"] = theirs["tokens_per_s"]
        over = {f"{k}_over_transformers": round(row[k]["output_tokens_per_s"] / theirs["tokens_per_s"], 2)
                for k in ("served", "perf_analyzer") if k in row}
        print(json.dumps({"concurrency": c, "transformers_batch": c, "transformers_tokens_per_s":
                          theirs["tokens_per_s"], **over}), flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    # Eight each, so that the start (every client's prompt at once) and the end (the last requests finishing with
    # few others beside them) are a small part of each run: with three, they were a third of it.
    parser.add_argument("--requests-per-client", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    # Enough requests that the end of the run, where the last long requests finish with few others beside
    # them, does not dominate (at 48 the in-flight run spent about a third of its time there).
    parser.add_argument("--mixed-requests", type=int, default=160)
    parser.add_argument("--peer", action="store_true",
                        help="also run transformers' generate() on the same weights at each concurrency's batch size "
                             "(needs requirements-bench.txt)")
    parser.add_argument("--no-perf-analyzer", dest="perf_analyzer", action="store_false",
                        help="serve only the Python clients' load (perf_analyzer also measures each concurrency)")
    a = parser.parse_args()

    from triton_backend.config import ServerConfig
    from triton_backend.engine.engine import EngineStats
    from triton_backend.model.gpt import init_parallel
    from triton_backend.server import engine_cpus, load_engine, set_threads

    cfg = ServerConfig.from_env()
    cfg.device = "cpu"
    set_threads(cfg)  # the same torch threads as the server's engine
    results = {}
    # Ready means every part the server starts is up: the HTTP API's process (on unless API=0) imports for a
    # second or two after Triton answers, and at --concurrency 16 alone that fell inside the measured run.
    proc, grpc_url = start_server({"DEVICE": "cpu"}, api=(os.environ.get("API") or "1") == "1")
    every_core = os.sched_getaffinity(0)
    # The client threads keep off the engine thread's core, as they do in-process (engine_cpus pins the same
    # way): a remote client would not compete for it at all.
    engine_cpus(cfg)
    try:
        served_one(grpc_url)(PROMPTS[0], dict(max_tokens=4))  # warm-up
        for c in a.concurrency:
            records, wall = run_clients(workload(c, a.requests_per_client, a.max_tokens), served_one(grpc_url))
            results[c] = {"served": summarize(records, wall)}
            if a.perf_analyzer:
                results[c]["perf_analyzer"] = perf_analyzer(grpc_url, c, a.max_tokens)
            print(json.dumps({"concurrency": c, **results[c]}), flush=True)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(60)
    # Rank 0's own account of its steps, for all the served concurrencies together (see EngineStats.summary).
    steps = [line.split("engine: ", 1)[1] for line in SERVER_LOG.read_text(errors="replace").splitlines()
             if " engine: " in line]
    print(json.dumps({"served_engine": steps[-1] if steps else None}), flush=True)

    os.sched_setaffinity(0, every_core)
    cpus = engine_cpus(cfg)  # pinned as the server pins: this thread, gloo's and the clients off the engine's core
    init_parallel(1, "cpu")
    engine = load_engine(cfg, cpus=cpus).start()
    tokenizer = engine.tokenizer
    try:
        for c in a.concurrency:
            engine.stats = EngineStats()  # this concurrency's steps only
            records, wall = run_clients(workload(c, a.requests_per_client, a.max_tokens), engine_one(engine, tokenizer))
            results[c]["in_process"] = summarize(records, wall)
            local = results[c]["in_process"]
            ratios = {f"{k}_over_in_process": round(results[c][k]["output_tokens_per_s"] /
                                                    local["output_tokens_per_s"], 2)
                      for k in ("served", "perf_analyzer") if k in results[c]}
            print(json.dumps({"concurrency": c, "in_process": local, **ratios,
                              "in_process_engine": engine.stats.summary()}), flush=True)
        mixed = mixed_lengths(engine, tokenizer, a.mixed_requests, 16)
        print(json.dumps({"mixed_lengths": mixed}), flush=True)
        if a.peer:
            peer(engine, tokenizer, cpus, results, a.max_tokens)
    finally:
        engine.stop()
    cs = a.concurrency
    if 1 in results and 16 in results:
        scale = results[16]["served"]["output_tokens_per_s"] / results[1]["served"]["output_tokens_per_s"]
        print(json.dumps({"served_c16_over_c1": round(scale, 2)}))
    # "served": the Python clients' run (TTFT and ITL come from it); "perf_analyzer": the same load from perf_analyzer
    print("\nconcurrency | served tok/s | / in-process | perf_analyzer tok/s | / in-process | in-process tok/s | "
          "TTFT p50/p99 ms | ITL p50 ms"
          + (" | transformers tok/s | served / it | perf_analyzer / it" if a.peer else ""))
    for c in cs:
        s, i, pa = results[c]["served"], results[c]["in_process"], results[c].get("perf_analyzer")
        hf = results[c].get("transformers")
        pa_cells = f"{pa['output_tokens_per_s']:>19} | {pa['output_tokens_per_s'] / i['output_tokens_per_s']:>12.2f}" \
            if pa else f"{'-':>19} | {'-':>12}"
        print(f"{c:>11} | {s['output_tokens_per_s']:>12} | {s['output_tokens_per_s'] / i['output_tokens_per_s']:>12.2f}"
              f" | {pa_cells} | {i['output_tokens_per_s']:>16} | {s['ttft_p50_ms']}/{s['ttft_p99_ms']} | "
              f"{s['itl_p50_ms']}"
              + (f" | {hf:>18} | {s['output_tokens_per_s'] / hf:.2f}"
                 + (f" | {pa['output_tokens_per_s'] / hf:.2f}" if pa else " | -") if hf else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
