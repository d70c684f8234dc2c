"""`make bench-guided`: what structured outputs cost, in-process on the served engine (no Triton).

    torchrun --standalone --nproc-per-node 1 -m tools.bench_guided [--seconds 20] [--streams 16]

1. Compile: a 20-property JSON schema the first time, then from the cache (ms).
2. Closed loop for ``--seconds``: ``--streams`` streams, half of them guided by a 10-property schema, each sent
   again as soon as it ends (temperature 1, its own seed): tokens/s of the guided and the unguided streams in
   that same run, and their ratio (target >= 0.85).
3. The same loop with no stream guided: the mixed run's tokens/s over it, and the engine's busy time per
   sequence and step in each (what the masks cost, apart from how full the batch stays: guided requests end
   sooner and are sent again more often).
4. Every guided output that ended with ``stop``: the share that parses and validates (target 100 %).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import threading
import time

import jsonschema
import torch

from preprocessing.params import SamplingParams
from tools.offline import BENCH_PROMPT
from triton_backend.config import ServerConfig
from triton_backend.model.gpt import init_parallel
from triton_backend.server import engine_cpus, load_engine, set_threads


def schema(properties: int) -> dict:
    kinds = [{"type": "integer", "minimum": 0, "maximum": 999}, {"type": "string", "maxLength": 8},
             {"type": "boolean"}, {"enum": ["red", "green", "blue"]}]
    props = {f"field_{i}": kinds[i % len(kinds)] for i in range(properties)}
    return {"type": "object", "properties": props, "required": list(props), "additionalProperties": False}


def closed_loop(engine, prompt: list[int], streams: int, guided: int, seconds: float, guide: str) -> dict:
    """Each stream submits again when its request ends; tokens counted per class until ``seconds`` pass."""
    counts = {"guided": 0, "plain": 0}
    outputs: list[tuple[str, str]] = []
    lock, stop = threading.Lock(), time.monotonic() + seconds
    seeds = iter(range(10**9))

    def run(k: int) -> None:
        kind = "guided" if k < guided else "plain"
        while time.monotonic() < stop:
            extra = {"guided_decoding_guide_type": "json_schema", "guided_decoding_guide": guide} if kind == "guided" \
                else {"end_id": -1}
            g = engine.submit(prompt, SamplingParams(max_tokens=96, temperature=1.0, seed=next(seeds), **extra))
            g.wait()
            with lock:
                counts[kind] += len(g.tokens)
                if kind == "guided":
                    outputs.append((g.finish_reason, engine.tokenizer.decode(g.tokens)))

    threads = [threading.Thread(target=run, args=(k,)) for k in range(streams)]
    before = dataclasses.replace(engine.stats)
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - started
    rows = engine.stats.rows_decoded - before.rows_decoded
    busy = engine.stats.step_seconds - before.step_seconds
    return {"guided_tps": counts["guided"] / elapsed, "plain_tps": counts["plain"] / elapsed,
            "total_tps": (counts["guided"] + counts["plain"]) / elapsed, "outputs": outputs,
            "us_per_row": 1e6 * busy / max(rows, 1), "rows_per_step": rows / max(1, engine.stats.steps - before.steps)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--streams", type=int, default=16)
    a = parser.parse_args()
    cfg = ServerConfig.from_env()
    cfg = ServerConfig(**{**cfg.__dict__, "max_slots": max(cfg.max_slots, a.streams)})
    set_threads(cfg)
    cpus = engine_cpus(cfg)
    init_parallel(1, cfg.device, timeout_s=cfg.load_timeout_s)
    engine = load_engine(cfg, None, cpus).start()
    try:
        engine.grammars.guide("regex", "[0-9]")  # the grammar engine's view of the vocabulary, built once
        twenty = json.dumps(schema(20))
        started = time.perf_counter()
        engine.grammars.guide("json_schema", twenty)
        first = time.perf_counter() - started
        started = time.perf_counter()
        engine.grammars.guide("json_schema", twenty)
        cached = time.perf_counter() - started
        print(f"20-property schema: compiled in {first * 1e3:.2f} ms (target < 100), from the cache in "
              f"{cached * 1e3:.3f} ms", flush=True)

        ten = schema(10)
        prompt = engine.tokenizer.encode(BENCH_PROMPT)
        engine.submit(prompt, SamplingParams(max_tokens=4, temperature=0.0)).wait()  # warm-up
        mixed = closed_loop(engine, prompt, a.streams, a.streams // 2, a.seconds, json.dumps(ten))
        plain = closed_loop(engine, prompt, a.streams, 0, a.seconds, "")
        ratio = mixed["guided_tps"] / mixed["plain_tps"]
        print(f"{a.streams} streams for {a.seconds:g} s, {a.streams // 2} guided by a 10-property schema: guided "
              f"{mixed['guided_tps']:.1f} tokens/s, unguided {mixed['plain_tps']:.1f} tokens/s, ratio {ratio:.2f} "
              f"(target >= 0.85)", flush=True)
        print(f"the same {a.streams} streams unguided: {plain['total_tps']:.1f} tokens/s; with half guided "
              f"{mixed['total_tps']:.1f} tokens/s ({mixed['total_tps'] / plain['total_tps']:.2f}x)", flush=True)
        print(f"engine time per sequence and step: unguided {plain['us_per_row']:.0f} us "
              f"({plain['rows_per_step']:.1f} rows a step), half guided {mixed['us_per_row']:.0f} us "
              f"({mixed['rows_per_step']:.1f} rows a step): {mixed['us_per_row'] / plain['us_per_row']:.2f}x",
              flush=True)
        stopped = [text for reason, text in mixed["outputs"] if reason == "stop"]
        good = 0
        for text in stopped:
            try:
                jsonschema.validate(json.loads(text), ten)
                good += 1
            except (ValueError, jsonschema.ValidationError):
                pass
        print(f"guided outputs: {len(mixed['outputs'])}, {len(stopped)} ended with stop, {good} of them parse and "
              f"validate ({100 * good / max(1, len(stopped)):.0f} %, target 100 %)", flush=True)
    finally:
        engine.stop()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
