"""Decode speed of this tree's engine against another commit's, in one run (the figures a rewrite must keep).

    .venv/bin/python tools/probes/ab_engine.py --baseline 106c8a5 [--batch 1 16 64] [--rounds 2] [--max-tokens 64]

Checks the baseline out into a git worktree under /tmp, then runs ``tools.offline --bench`` (in-process, no
Triton) from each tree in turn, ``rounds`` times, on the same checkpoint (the demo model unless CHECKPOINT and
TOKENIZER are set) with the same Python. Prints each run and, per batch size, the median tokens/s of each tree
and their ratio (this tree over the baseline).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]


def worktree(ref: str) -> pathlib.Path:
    commit = subprocess.run(["git", "rev-parse", "--short", ref], cwd=ROOT, check=True, capture_output=True,
                            text=True).stdout.strip()
    path = pathlib.Path(f"/tmp/megatron_triton_ab_{commit}")
    if not path.exists():
        subprocess.run(["git", "worktree", "add", "--detach", str(path), commit], cwd=ROOT, check=True,
                       capture_output=True)
    return path


def bench(tree: pathlib.Path, batches: list[int], max_tokens: int) -> dict[int, float]:
    env = {**os.environ, "CHECKPOINT": os.environ.get("CHECKPOINT", str(ROOT / "demo_model" / "checkpoint")),
           "TOKENIZER": os.environ.get("TOKENIZER", str(ROOT / "demo_model" / "tokenizer.model"))}
    out = subprocess.run([sys.executable, "-m", "tools.offline", "--bench", "--max-tokens", str(max_tokens),
                          "--batch", *map(str, batches)], cwd=tree, env=env, check=True, capture_output=True,
                         text=True).stdout
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return {r["batch"]: r["tokens_per_s"] for r in rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", required=True, help="git ref to compare with")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=64)
    a = parser.parse_args()
    trees = {"this tree": ROOT, a.baseline: worktree(a.baseline)}
    runs: dict[str, list[dict[int, float]]] = {name: [] for name in trees}
    for round_ in range(a.rounds):
        for name, tree in trees.items():
            runs[name].append(bench(tree, a.batch, a.max_tokens))
            print(json.dumps({"round": round_, "tree": name, "tokens_per_s": runs[name][-1]}), flush=True)
    for batch in a.batch:
        ours, theirs = (statistics.median(r[batch] for r in runs[name]) for name in trees)
        print(json.dumps({"batch": batch, "tokens_per_s": ours, "baseline_tokens_per_s": theirs,
                          "ratio": round(ours / theirs, 2)}), flush=True)


if __name__ == "__main__":
    main()
