"""Generate or benchmark in-process, without Triton: the same engine, rank protocol and model rank 0 serves.

    torchrun --standalone --nproc-per-node 2 -m tools.offline --prompt "The for statement"
    torchrun --standalone --nproc-per-node 1 -m tools.offline --bench --batch 1 8 32

Prints one JSON line per prompt (or per benchmark batch size) on rank 0.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import time

import torch

from preprocessing.params import SamplingParams
from preprocessing.tokenization import Tokenizer
from triton_backend.config import ServerConfig
from triton_backend.model.gpt import init_parallel
from triton_backend.ranks.protocol import follow, make_group
from triton_backend.server import engine_cpus, load_engine, load_gpt, set_threads

BENCH_PROMPT = "The for statement is used to iterate over the elements of a sequence"


def bench(engine, tokenizer: Tokenizer, batch: int, max_tokens: int) -> dict:
    """Tokens/s of ``batch`` concurrent greedy requests generating exactly ``max_tokens`` each."""
    prompt = tokenizer.encode(BENCH_PROMPT)
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, end_id=-1)
    engine.submit(prompt, SamplingParams(max_tokens=2, temperature=0.0)).wait()  # warm-up
    started, clock = time.perf_counter(), time.monotonic()  # the engine stamps first tokens on the monotonic clock
    gens = [engine.submit(prompt, params) for _ in range(batch)]
    for g in gens:  # waits without polling: a polling loop takes the interpreter lock from the engine thread
        g.wait()
    seconds = time.perf_counter() - started
    stamps = [g.first_token_at for g in gens]
    first = max(stamps) - clock if all(stamps) else None  # when every request had its first token
    tokens = sum(len(g.tokens) for g in gens)
    return {"batch": batch, "output_tokens": tokens, "seconds": round(seconds, 3),
            "tokens_per_s": round(tokens / seconds, 1), "first_token_s": round(first or seconds, 4),
            "step_ms": round(1000 * (seconds - (first or 0)) / max(1, max_tokens - 1), 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=pathlib.Path)
    parser.add_argument("--tokenizer", type=pathlib.Path)
    parser.add_argument("--prompt", action="append", default=[])
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--bench", action="store_true")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    a = parser.parse_args()

    overrides = {k: v for k, v in (("checkpoint", a.checkpoint), ("tokenizer", a.tokenizer)) if v}
    env_cfg = ServerConfig.from_env()
    cfg = ServerConfig(**{**env_cfg.__dict__, **overrides,
                          "tensor_parallel": int(os.environ.get("WORLD_SIZE", "1")),
                          "max_slots": max(env_cfg.max_slots, *a.batch)})
    set_threads(cfg)  # torch's threads as the server sets them (two threads on the engine's one pinned core
    # ran a batch-1 step 3x slower)
    cpus = engine_cpus(cfg)  # before init_parallel, as the server does
    init_parallel(cfg.tensor_parallel, cfg.device, timeout_s=cfg.load_timeout_s)
    group = make_group(cfg.collective_timeout_s) if cfg.tensor_parallel > 1 else None
    if torch.distributed.get_rank() != 0:
        follow(load_gpt(cfg), group)
        torch.distributed.destroy_process_group()
        return
    started = time.perf_counter()
    engine = load_engine(cfg, group, cpus).start()
    load_s = time.perf_counter() - started
    tokenizer = engine.tokenizer
    try:
        if a.bench:
            for batch in a.batch:
                row = bench(engine, tokenizer, batch, a.max_tokens)
                print(json.dumps({"tp": cfg.tensor_parallel, "device": cfg.device, "dtype": cfg.dtype,
                                  "load_s": round(load_s, 1), **row}), flush=True)
        for prompt in a.prompt:
            ids = tokenizer.encode(prompt)
            g = engine.submit(ids, SamplingParams(max_tokens=a.max_tokens, temperature=a.temperature, seed=0))
            g.wait()
            print(json.dumps({"prompt": prompt, "text": tokenizer.decode_continuation(ids, g.tokens),
                              "finish_reason": g.finish_reason, "error": g.error}, ensure_ascii=False), flush=True)
    finally:
        engine.stop()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
