"""The paged KV cache's figures, in-process on the engine (no Triton), on the ``long`` preset (``make bench``).

    .venv/bin/python tools/bench_cache.py [--scenario capacity prefix chunked] [--checkpoint DIR] [--rounds N]
                                          [--streams 8 ...] [--prefill-tokens N ...]

1. capacity: a KV budget that holds 8 full 4,096-token contexts; 128 requests (prompts of 16-512 random tokens,
   16-256 output tokens) from 64 clients at once. Paged blocks against the slot layout (every sequence takes
   a whole context when admitted, ``Engine(reserve_context=True)``), same budget, same requests: peak
   running sequences and output tokens/s.
2. prefix: 32 requests, one after another, that share a 1,500-token prefix and each add 20 tokens of their own;
   time to first token with prefix caching and without, and the cache's hit rate.
3. chunked: 8 greedy streams decoding while a 3,500-token prompt arrives; the streams' worst gap between tokens
   while it is read against their inter-token p50, and its time to first token against the same prompt alone.

Builds the ``long`` checkpoint (random weights) under /tmp on first use. Prints one JSON line per figure.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import random
import statistics
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from preprocessing.params import SamplingParams  # noqa: E402
from triton_backend import checkpoints  # noqa: E402
from triton_backend.engine.engine import Engine  # noqa: E402
from triton_backend.model.gpt import CachedGPT, build_model, init_parallel  # noqa: E402

VOCAB = 4096
LONG_CHECKPOINT = pathlib.Path("/tmp/megatron_triton_long_checkpoint")


def long_checkpoint() -> pathlib.Path:
    if not (LONG_CHECKPOINT / "latest_checkpointed_iteration.txt").exists():
        subprocess.run([sys.executable, "-m", "triton_backend.make_checkpoint", "--random", "long", "--vocab",
                        str(VOCAB), "--out", str(LONG_CHECKPOINT)], cwd=ROOT, check=True)
    return LONG_CHECKPOINT


class Bench:
    def __init__(self, checkpoint: pathlib.Path):
        init_parallel(1, "cpu")
        self.arch = checkpoints.read_architecture(checkpoint, 1)
        self.model = build_model(self.arch)
        checkpoints.load_weights(self.model, checkpoint, self.arch)
        self.context = min(self.arch.seq_length, self.arch.max_position_embeddings)

    def engine(self, contexts: int | None = None, max_slots: int = 64, **kw) -> Engine:
        """An engine whose cache holds ``contexts`` full contexts (default: ``max_slots`` of them)."""
        blocks = (contexts or max_slots) * -(-self.context // CachedGPT.BLOCK_SIZE)
        gpt = CachedGPT(self.model, self.arch, max_slots=max_slots, num_blocks=blocks)
        return Engine(gpt, VOCAB, eos_id=0, **kw).start()


def run_clients(engine: Engine, requests: list[tuple[list[int], SamplingParams]], concurrency: int) -> dict:
    """Submit ``requests`` from ``concurrency`` clients (each sends its next when the last finishes)."""
    pending, live, done = list(requests), [], []
    started = time.perf_counter()
    while pending or live:
        while pending and len(live) < concurrency:
            live.append(engine.submit(*pending.pop(0)))
        time.sleep(0.001)
        done += [g for g in live if g.done]
        live = [g for g in live if not g.done]
    wall = time.perf_counter() - started
    if any(g.error for g in done):
        raise RuntimeError(next(g.error for g in done if g.error))
    tokens = sum(len(g.tokens) for g in done)
    return {"output_tokens_per_s": round(tokens / wall, 1), "seconds": round(wall, 1),
            "peak_running": engine.stats.peak_running, "preemptions": engine.stats.preemptions}


def capacity(bench: Bench, rounds: int = 1) -> None:
    """The slot layout, then paged blocks, ``rounds`` times (this machine's spread shows between the rounds)."""
    rng = random.Random(0)
    requests = [([rng.randrange(3, VOCAB) for _ in range(rng.randint(16, 512))],
                  SamplingParams(max_tokens=rng.randint(16, 256), temperature=0.8, seed=i, end_id=-1))
                for i in range(128)]
    for _ in range(rounds):
        rows = {}
        for layout, reserve in (("slots", True), ("paged", False)):
            engine = bench.engine(contexts=8, reserve_context=reserve)
            try:
                rows[layout] = run_clients(engine, requests, concurrency=64)
            finally:
                engine.stop()
            print(json.dumps({"scenario": "capacity", "layout": layout, "kv_contexts": 8, **rows[layout]}),
                  flush=True)
        print(json.dumps({"scenario": "capacity", "peak_running_ratio": round(
            rows["paged"]["peak_running"] / rows["slots"]["peak_running"], 2), "tokens_per_s_ratio": round(
            rows["paged"]["output_tokens_per_s"] / rows["slots"]["output_tokens_per_s"], 2),
            "targets": ">= 4 and >= 2"}), flush=True)


def prefix(bench: Bench) -> None:
    rng = random.Random(1)
    shared = [rng.randrange(3, VOCAB) for _ in range(1500)]
    requests = [shared + [rng.randrange(3, VOCAB) for _ in range(20)] for _ in range(32)]
    ttft = {}
    for caching in (False, True):
        engine = bench.engine(max_slots=8, prefix_caching=caching)
        try:
            times = []
            for prompt in requests:
                g = engine.submit(prompt, SamplingParams(max_tokens=4, temperature=0.0, end_id=-1))
                g.wait(600)
                times.append(g.first_token_at - g.submitted)
            load = engine.load()
        finally:
            engine.stop()
        ttft[caching] = statistics.median(times)
        hit = load["prefix_hit_tokens"] / max(1, load["prefix_queried_tokens"])
        print(json.dumps({"scenario": "prefix", "prefix_caching": caching, "ttft_p50_ms": round(1e3 * ttft[caching], 1),
                          "hit_rate": round(hit, 3)}), flush=True)
    print(json.dumps({"scenario": "prefix", "ttft_ratio_without_over_with": round(ttft[False] / ttft[True], 2),
                      "target": ">= 5"}), flush=True)


def chunked(bench: Bench, prefill_tokens: int | None = None, streams: int = 8) -> None:
    rng = random.Random(2)
    long_prompt = [rng.randrange(3, VOCAB) for _ in range(3500)]
    greedy = SamplingParams(max_tokens=1, temperature=0.0, end_id=-1)
    engine = bench.engine(max_slots=streams + 8, **({"prefill_tokens": prefill_tokens} if prefill_tokens else {}))
    try:
        engine.submit(long_prompt[:100], greedy).wait(600)  # warm-up
        alone = engine.submit(long_prompt, greedy)
        alone.wait(600)
        alone_ttft = alone.first_token_at - alone.submitted
        stamps: dict[int, list[float]] = {}

        def stamp(g):
            stamps.setdefault(id(g), []).append(time.perf_counter())

        running = [engine.submit([rng.randrange(3, VOCAB) for _ in range(64)],
                                 SamplingParams(max_tokens=300, temperature=0.0, end_id=-1), listener=stamp)
                   for _ in range(streams)]
        while not all(len(stamps.get(id(g), ())) >= 20 for g in running):
            time.sleep(0.001)
        arrived = time.perf_counter()
        late = engine.submit(long_prompt[::-1], greedy)  # not the cached prompt
        late.wait(600)
        first = time.perf_counter()
        for g in running:
            g.wait(600)
    finally:
        engine.stop()
    whole = bench.engine(max_slots=16, prefill_tokens=bench.context)  # the prompt in one step, as before chunking
    try:
        g = whole.submit(long_prompt, greedy)
        g.wait(600)
        whole_ttft = g.first_token_at - g.submitted
    finally:
        whole.stop()
    gaps = [b - a for g in running for a, b in zip(stamps[id(g)], stamps[id(g)][1:])]
    during = [b - a for g in running for a, b in zip(stamps[id(g)], stamps[id(g)][1:]) if b > arrived and a < first]
    itl = statistics.median(gaps)
    ttft = late.first_token_at - late.submitted
    worst = max(during, default=0)
    print(json.dumps({"scenario": "chunked", "streams": streams, "prefill_tokens": engine.prefill_tokens,
                      "itl_p50_ms": round(1e3 * itl, 2), "worst_gap_while_prefilling_ms": round(1e3 * worst, 2),
                      "gap_over_itl": round(worst / itl, 2), "ttft_ms": round(1e3 * ttft, 1),
                      "ttft_alone_ms": round(1e3 * alone_ttft, 1), "ttft_over_alone": round(ttft / alone_ttft, 2),
                      "ttft_alone_unchunked_ms": round(1e3 * whole_ttft, 1),
                      "targets": "gap_over_itl <= 3, ttft_over_alone <= 3"}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenario", nargs="+", choices=["capacity", "prefix", "chunked"],
                        default=["capacity", "prefix", "chunked"])
    parser.add_argument("--checkpoint", type=pathlib.Path)
    parser.add_argument("--prefill-tokens", type=int, nargs="+", help="chunked: these budgets (default: the engine's)")
    parser.add_argument("--rounds", type=int, default=1, help="capacity: run both layouts this many times")
    parser.add_argument("--streams", type=int, nargs="+", default=[8],
                        help="chunked: streams decoding while the long prompt arrives (the issue's figure: 8)")
    a = parser.parse_args()
    # As the server sets them on CPU (half the cores; there the serving processes need the rest).
    torch.set_num_threads(int(os.environ.get("TORCH_THREADS", "0")) or max(1, (os.cpu_count() or 2) // 2))
    bench = Bench(a.checkpoint or long_checkpoint())
    for name in a.scenario:
        if name == "chunked":
            for budget in a.prefill_tokens or [None]:
                for streams in a.streams:
                    chunked(bench, budget, streams)
        elif name == "capacity":
            capacity(bench, a.rounds)
        else:
            globals()[name](bench)


if __name__ == "__main__":
    main()
