"""Pipeline stages in-process: tokens/s with batches in flight against Megatron's one batch at a time, and each
rank's resident weights against one rank's, on the same weights (``make bench-pp``).

    .venv/bin/python tools/bench_pp.py [--checkpoint DIR] [--pp 2] [--tp 1] [--sequences 32] [--max-tokens 32]

The default checkpoint is the random-init ``gpt-350m`` preset that ``make bench-engine`` also uses
(``results/gpt-350m``, written once): a model whose steps are compute, not Python. On the demo model a
step takes milliseconds and both pipeline layouts are bound by the step's fixed costs.

Each layout is a job of local processes over gloo with one torch thread per rank (``ranks/local.py``): the
engine runs in-process on rank 0, without Triton. Every layout gets the same greedy requests, all submitted at
once, and must give the same tokens (checked); the figures are printed, never asserted.
"""

from __future__ import annotations

import argparse
import pathlib
import random
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from preprocessing.params import SamplingParams  # noqa: E402
from tools.bench_engine import BIG_CHECKPOINT, ensure_checkpoint  # noqa: E402
from triton_backend.ranks import local  # noqa: E402


def requests(n: int, max_tokens: int, vocab: int, seed: int = 0) -> list:
    rng = random.Random(seed)
    return [([rng.randrange(5, vocab) for _ in range(rng.randrange(8, 24))],
             SamplingParams(max_tokens=max_tokens, end_id=-1, temperature=0)) for _ in range(n)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=str(BIG_CHECKPOINT))
    parser.add_argument("--pp", type=int, default=2)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--sequences", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--kv-cache-mb", type=int, default=1024, help="KV cache per rank")
    parser.add_argument("--vocab", type=int, default=4000, help="prompt ids are drawn below this")
    a = parser.parse_args()
    if a.checkpoint == str(BIG_CHECKPOINT):
        ensure_checkpoint(BIG_CHECKPOINT)
    work = requests(a.sequences, a.max_tokens, a.vocab)
    layouts = [(f"TP={a.tp} x PP=1", a.tp, 1, 1), (f"PP={a.pp}, PP_MICROBATCHES=1", a.tp, a.pp, 1),
               (f"PP={a.pp}, PP_MICROBATCHES={a.pp}", a.tp, a.pp, a.pp)]
    results = {}
    for name, tp, pp, microbatches in layouts:
        result = local.spawn(tp * pp, local.generate, a.checkpoint, tp, pp, microbatches, work, max_slots=a.sequences,
                              kv_cache_mb=a.kv_cache_mb)[0]
        if result["fatal"] or any(o.error for o in result["outcomes"]):
            raise SystemExit(f"{name}: {result['fatal'] or [o.error for o in result['outcomes'] if o.error][0]}")
        tokens = sum(len(o.tokens) for o in result["outcomes"])
        results[name] = result
        steps = result["stats"]["steps"]
        print(f"{name:28s} {tokens / result['seconds']:8.1f} tokens/s  ({tokens} tokens in {result['seconds']:.2f} s, "
              f"{steps} steps; parameter MiB per rank: "
              f"{', '.join(f'{w / 2**20:.1f}' for w in result['weights'])})", flush=True)
    first, one, many = (results[name] for name, *_ in layouts)
    same = all(x.tokens == y.tokens == z.tokens
               for x, y, z in zip(first["outcomes"], one["outcomes"], many["outcomes"]))
    rate = {k: sum(len(o.tokens) for o in r["outcomes"]) / r["seconds"] for k, r in results.items()}
    print(f"batches in flight / one batch at a time: {rate[layouts[2][0]] / rate[layouts[1][0]]:.2f}x tokens/s")
    print(f"largest rank's parameters at PP={a.pp} / at PP=1: {max(many['weights']) / max(first['weights']):.2f}x")
    print(f"same tokens in every layout: {same}")


if __name__ == "__main__":
    main()
