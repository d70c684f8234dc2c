"""Pipeline stages in-process: tokens/s with batches in flight against Megatron's one batch at a time, and each
rank's resident weights against one rank's, on the same weights (``make bench-pp``).

    .venv/bin/python tools/bench_pp.py [--checkpoint DIR] [--pp 2] [--tp 1] [--sequences 32] [--max-tokens 32]
                                       [--pp-layers balanced]

Layouts: one stage; Megatron's way (the recorded or even split, one batch at a time); batches in flight on the
same split; batches in flight on ``--pp-layers`` (``PP_LAYERS``; default ``balanced``, which gives the last
stage, which also computes the logits, fewer layers where the vocabulary is large) when that split differs.
The pipeline layouts run ``--rounds`` times, alternating; ratios are of pooled tokens/s, against Megatron's way.

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


def side_by_side(a, work: list) -> float:
    """Tokens/s of ``a.pp`` independent one-rank engines run at once, each with its share of ``work``: what this
    machine gives processes that compute at the same time (its cores share one memory bus), the ceiling of
    batches in flight, whose stages compute at the same time."""
    import concurrent.futures

    shares = [work[i::a.pp] for i in range(a.pp)]
    with concurrent.futures.ThreadPoolExecutor(a.pp) as pool:
        jobs = [pool.submit(local.spawn, 1, local.generate, a.checkpoint, 1, 1, 1, share,
                            max_slots=a.sequences, kv_cache_mb=a.kv_cache_mb) for share in shares]
        results = [job.result()[0] for job in jobs]
    tokens = sum(len(o.tokens) for r in results for o in r["outcomes"])
    return tokens / max(r["seconds"] for r in results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=str(BIG_CHECKPOINT))
    parser.add_argument("--pp", type=int, default=2)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--sequences", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--kv-cache-mb", type=int, default=1024, help="KV cache per rank")
    parser.add_argument("--vocab", type=int, default=4000, help="prompt ids are drawn below this")
    parser.add_argument("--pp-layers", default="balanced", help="PP_LAYERS of the last layout (run when it is not "
                        "the checkpoint's own split)")
    parser.add_argument("--rounds", type=int, default=2, help="the PP layouts run this many times, alternating")
    a = parser.parse_args()
    if a.checkpoint == str(BIG_CHECKPOINT):
        ensure_checkpoint(BIG_CHECKPOINT)
    work = requests(a.sequences, a.max_tokens, a.vocab)
    from triton_backend import checkpoints

    split = checkpoints.read_architecture(a.checkpoint, a.tp, a.pp, a.pp_layers).stage_layers(a.pp)
    even = checkpoints.read_architecture(a.checkpoint, a.tp, a.pp).stage_layers(a.pp)
    sizes = "+".join(str(len(s)) for s in split)
    one, many = f"PP={a.pp}, PP_MICROBATCHES=1", f"PP={a.pp}, PP_MICROBATCHES={a.pp}"
    layouts = {f"TP={a.tp} x PP=1": (1, 1, ""), one: (a.pp, 1, ""), many: (a.pp, a.pp, "")}
    if split != even:
        layouts[f"{many}, PP_LAYERS={sizes}"] = (a.pp, a.pp, a.pp_layers)
    names = list(layouts)
    tokens, seconds, weights, outcomes = {}, {}, {}, {}
    # Rounds alternate the layouts: this machine's speed drifts, and a ratio of pooled figures evens it out.
    for round_ in range(a.rounds):
        for name in names[1 if round_ else 0:]:
            pp, microbatches, layers = layouts[name]
            result = local.spawn(a.tp * pp, local.generate, a.checkpoint, a.tp, pp, microbatches, work,
                                 max_slots=a.sequences, kv_cache_mb=a.kv_cache_mb, pp_layers=layers)[0]
            if result["fatal"] or any(o.error for o in result["outcomes"]):
                raise SystemExit(f"{name}: {result['fatal'] or [o.error for o in result['outcomes'] if o.error][0]}")
            n = sum(len(o.tokens) for o in result["outcomes"])
            tokens[name] = tokens.get(name, 0) + n
            seconds[name] = seconds.get(name, 0) + result["seconds"]
            weights[name] = result["weights"]
            outcomes.setdefault(name, []).append([o.tokens for o in result["outcomes"]])
            print(f"round {round_ + 1}: {name:40s} {n / result['seconds']:8.1f} tokens/s  ({n} tokens in "
                  f"{result['seconds']:.2f} s, {result['stats']['steps']} steps; parameter MiB per rank: "
                  f"{', '.join(f'{w / 2**20:.1f}' for w in result['weights'])})", flush=True)
    rate = {name: tokens[name] / seconds[name] for name in names}
    for name in names[2:]:
        print(f"{name} / one batch at a time, pooled over {a.rounds} rounds: {rate[name] / rate[one]:.2f}x tokens/s; "
              f"largest rank's parameters / PP=1's: {max(weights[name]) / max(weights[names[0]]):.2f}x")
    if a.tp == 1:
        together = side_by_side(a, work)
        print(f"{a.pp} one-rank engines at once, {a.sequences // a.pp} sequences each / one engine with all "
              f"{a.sequences}: {together / rate[names[0]]:.2f}x tokens/s (the most batches in flight can give on "
              "this machine)")
    texts = [run for name in names for run in outcomes[name]]
    print(f"same tokens in every layout and round: {all(t == texts[0] for t in texts)}")

if __name__ == "__main__":
    main()
