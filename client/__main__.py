"""python -m client "prompt" [--url localhost:8000] [--protocol http|grpc] [--max-tokens 64] [...]"""

from __future__ import annotations

import argparse
import json
import sys

from .generate import GenerationClient, GenerationError


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m client", description="Generate text with the served ensemble.")
    parser.add_argument("prompt")
    parser.add_argument("--url", default=None, help="host:port (default localhost:8000 for http, :8001 for grpc)")
    parser.add_argument("--protocol", choices=["http", "grpc"], default="http")
    parser.add_argument("--model", default="ensemble")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--min-length", type=int)
    parser.add_argument("--temperature", type=float)
    parser.add_argument("--top-k", type=int)
    parser.add_argument("--top-p", type=float)
    parser.add_argument("--repetition-penalty", type=float)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--end-id", type=int)
    parser.add_argument("--json", action="store_true", help="print every output as JSON")
    a = parser.parse_args(argv)
    url = a.url or ("localhost:8000" if a.protocol == "http" else "localhost:8001")
    params = dict(max_tokens=a.max_tokens, min_length=a.min_length, temperature=a.temperature, top_k=a.top_k,
                  top_p=a.top_p, repetition_penalty=a.repetition_penalty, seed=a.seed, end_id=a.end_id,
                  return_log_probs=True if a.json else None)
    try:
        with GenerationClient(url, a.protocol, a.model) as client:
            result = client.generate(a.prompt, **params)
    except GenerationError as err:
        print(f"error ({err.status}): {err}", file=sys.stderr)
        return 1
    print(json.dumps(result.__dict__, ensure_ascii=False) if a.json else result.text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
