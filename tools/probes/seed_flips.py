"""How often a seeded request's text changes with what else is batched beside it (the engine in-process).

    .venv/bin/python -m tools.probes.seed_flips --requests 64 --max-tokens 64

Each seeded request runs alone, then again packed among other requests of different prompts and lengths (so its
rows meet other batch sizes, prompt packings and cache spans). Sampling draws the same numbers whatever the batch
(one generator per request), but the model's logits differ in their last bits between batch compositions (other
matrix shapes take other summation orders), and a draw that falls within that difference of a boundary between
two tokens picks the other one. Prints the share of requests whose text changed, of tokens that differ, and the
largest logit difference seen at the same position, for the demo model (or ``CHECKPOINT``).
"""

from __future__ import annotations

import argparse
import json
import random

import torch

from preprocessing.params import SamplingParams
from triton_backend.config import ServerConfig
from triton_backend.model.gpt import init_parallel
from triton_backend.server import load_engine

PROMPTS = ["The for statement", "A class definition", "Exceptions are raised", "The import system",
           "Lambda expressions", "Assignment statements", "The while loop", "Comparisons"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=1.0)
    a = parser.parse_args()
    cfg = ServerConfig(**{**ServerConfig.from_env().__dict__, "tensor_parallel": 1})
    init_parallel(1, cfg.device)
    engine = load_engine(cfg).start()
    tokenizer = engine.tokenizer
    rng = random.Random(0)
    try:
        def params(seed: int, n: int = a.max_tokens) -> SamplingParams:
            return SamplingParams(max_tokens=n, temperature=a.temperature, seed=seed, end_id=-1,
                                  return_log_probs=True)

        asked = [(tokenizer.encode(PROMPTS[i % len(PROMPTS)]), params(1000 + i)) for i in range(a.requests)]
        alone = []
        for prompt, p in asked:
            g = engine.submit(prompt, p)
            g.wait()
            alone.append(g)
        batched = []
        for start in range(0, len(asked), 8):  # each in a crowd of 8 to 31 others with their own lengths
            crowd = [engine.submit(tokenizer.encode(rng.choice(PROMPTS) * rng.randint(1, 4)),
                                   params(rng.randrange(2**32), rng.randint(4, a.max_tokens)))
                     for _ in range(rng.randint(8, 31))]
            ours = [engine.submit(prompt, p) for prompt, p in asked[start:start + 8]]
            for g in ours + crowd:
                g.wait()
            batched += ours
        changed = sum(x.tokens != y.tokens for x, y in zip(alone, batched))
        differing = sum(sum(s != t for s, t in zip(x.tokens, y.tokens)) for x, y in zip(alone, batched))
        first = [next((i for i, (s, t) in enumerate(zip(x.tokens, y.tokens)) if s != t), None)
                 for x, y in zip(alone, batched)]
        # Log-probs of the same token at the same position, before any divergence: the logits' own difference.
        gap = max((abs(p - q) for x, y, f in zip(alone, batched, first)
                   for p, q in zip(x.logprobs[:f], y.logprobs[:f])), default=0.0)
        tokens = sum(len(x.tokens) for x in alone)
        print(json.dumps({"requests": len(asked), "texts_changed": changed,
                          "share_changed": round(changed / len(asked), 4), "tokens_compared": tokens,
                          "tokens_differing_after_a_flip": differing,
                          "first_flip_positions": sorted(f for f in first if f is not None),
                          "max_logprob_difference_same_token": gap, "torch_threads": torch.get_num_threads()}))
    finally:
        engine.stop()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
