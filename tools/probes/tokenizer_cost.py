"""What tokenization costs per request and per generated token, for each tokenizer format, in one process.

    .venv/bin/python tools/probes/tokenizer_cost.py [--tokens 64] [--served-tokens-per-s 2168]

For the bench's prompts (``tools/bench.py``): encoding each prompt (what preprocessing does), and following 64
generated tokens one at a time as the serving process does for a stream (``TextTracker``: incremental decoding,
text held back at a split character), under the demo model's sentencepiece, a GPT-2 BPE, a Llama-3-style
HuggingFace tokenizer (``tokenizers``' byte-level BPE) and a TikTokenizer; and, as the peer, transformers'
``AutoTokenizer`` on the same HuggingFace files (what Megatron training and vLLM call) behind the same
incremental decoding. With ``--served-tokens-per-s`` (a
served run's output tokens/s, e.g. from ``tools/probes/served_cpu.py --concurrency 64``), prints the share of a served
token's time that tokenizing its request and detokenizing it take.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))

from preprocessing.detokenize import TextTracker  # noqa: E402
from preprocessing.tokenization import Tokenizer, build, load, load_path, resolve  # noqa: E402
from tools.bench import PROMPTS  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[2]


class TransformersPeer(Tokenizer):
    """transformers' ``AutoTokenizer`` behind the same interface (and so the same incremental decoding)."""

    def __init__(self, directory: pathlib.Path):
        from transformers import AutoTokenizer

        super().__init__({})
        self.auto = AutoTokenizer.from_pretrained(str(directory))

    def encode(self, text, parse_special=False, leading=True):
        return self.auto(text, add_special_tokens=leading, split_special_tokens=not parse_special).input_ids

    def decode(self, ids, skip_special=True):
        return self.auto.decode([int(i) for i in ids], skip_special_tokens=skip_special)


def tokenizers(workdir: pathlib.Path) -> dict:
    gpt2 = build.gpt2_bpe(workdir / "gpt2")
    tik = build.tiktoken_vocabulary(workdir / "tiktoken.json", gpt2)
    hf = build.huggingface_directory(workdir / "hf")
    return {
        "sentencepiece (demo)": load_path(ROOT / "demo_model" / "tokenizer.model"),
        "GPT-2 BPE": load_path(gpt2),
        "HuggingFace byte-level": load_path(hf),
        "  transformers (peer)": TransformersPeer(hf),
        "TikTokenizer": load(resolve({"tokenizer_type": "TikTokenizer", "tokenizer_model": str(tik),
                                      "vocab_size": 1000 + len(json.loads(tik.read_text()))})),
    }


def cost(tok, tokens: int, rounds: int = 5) -> tuple[float, float]:
    """Microseconds to encode one prompt, and to follow one generated token."""
    texts = [t[:600] for t in build.corpus()[10:10 + len(PROMPTS)]]  # continuations to replay: real text
    started = time.perf_counter()
    for _ in range(rounds):
        prompts = [tok.encode(p) for p in PROMPTS]
    encode_us = (time.perf_counter() - started) / (rounds * len(PROMPTS)) * 1e6
    streams = [tok.encode(t, leading=False)[:tokens] for t in texts]
    started, followed = time.perf_counter(), 0
    for _ in range(rounds):
        for prompt, ids in zip(prompts, streams):
            tracker = TextTracker(tok, prompt, ("\n\n\n",))
            for token in ids:
                tracker.add(token)
                tracker.stable_length(False)
            followed += len(ids)
    return encode_us, (time.perf_counter() - started) / followed * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=64, help="generated tokens per request")
    parser.add_argument("--served-tokens-per-s", type=float, help="a served run's output tokens/s, for the share")
    a = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        found = tokenizers(pathlib.Path(tmp))
        print(f"{'tokenizer':<24} {'encode a prompt':>16} {'per generated token':>20}"
              + (f" {'share of a served token':>24}" if a.served_tokens_per_s else ""))
        for name, tok in found.items():
            encode_us, token_us = cost(tok, a.tokens)
            line = f"{name:<24} {encode_us:13.1f} us {token_us:17.1f} us"
            if a.served_tokens_per_s:
                per_token_us = 1e6 / a.served_tokens_per_s
                share = (encode_us / a.tokens + token_us) / per_token_us
                line += f" {100 * share:23.1f} %"
            print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
