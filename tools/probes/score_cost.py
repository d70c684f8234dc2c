"""The engine alone: scoring a prompt (its log-probs, nothing generated) against generating one token for it.

    .venv/bin/torchrun --standalone --nproc-per-node 1 -m tools.probes.score_cost [--tokens 200] [--reps 25]

The same engine the server runs (``CHECKPOINT``, ``TOKENIZER`` and the other settings from the environment), in
one process without Triton; each prompt is new to the prefix cache. Prints the p50 of each and the ratio
(``make bench-api`` measures the same comparison end to end through ``PUT /api``).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

from preprocessing.params import SamplingParams
from triton_backend.config import ServerConfig
from triton_backend.model.gpt import init_parallel
from triton_backend.server import engine_cpus, load_engine, set_threads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--reps", type=int, default=25)
    a = parser.parse_args()
    cfg = ServerConfig.from_env()
    set_threads(cfg)
    cpus = engine_cpus(cfg)
    init_parallel(1, cfg.device, timeout_s=cfg.load_timeout_s)
    engine = load_engine(cfg, None, cpus).start()
    rng = random.Random(0)
    asks = {"score": SamplingParams(max_tokens=0, return_prompt_log_probs=True),
            "generate 1 token": SamplingParams(max_tokens=1, top_k=1)}
    times: dict[str, list[float]] = {name: [] for name in asks}
    try:
        for rep in range(a.reps + 3):  # the first three warm up
            for name, params in asks.items():
                prompt = [rng.randrange(10, 4000) for _ in range(a.tokens)]
                started = time.perf_counter()
                g = engine.submit(prompt, params)
                g.wait()
                if g.error:
                    raise RuntimeError(g.error)
                if rep >= 3:
                    times[name].append(time.perf_counter() - started)
    finally:
        engine.stop()
    p50 = {name: round(1000 * statistics.median(t), 2) for name, t in times.items()}
    print(json.dumps({"prompt_tokens": a.tokens, "p50_ms": p50,
                      "score_over_generate_one": round(p50["score"] / p50["generate 1 token"], 2)}))


if __name__ == "__main__":
    main()
