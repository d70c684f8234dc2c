"""Write a small tokenizer of each file format Megatron checkpoints record, trained on the demo model's corpus.

    .venv/bin/python tools/make_tokenizers.py OUT

``OUT/gpt2/`` (``vocab.json`` + ``merges.txt``, GPT2BPETokenizer), ``OUT/tiktoken.json`` (TikTokenizer), and
``OUT/hf/`` (a Llama-3-style HuggingFace directory with a chat template, HuggingFaceTokenizer). No download is
needed; the same files back the tokenizer tests (``preprocessing/tokenization/build.py``).
"""

from __future__ import annotations

import argparse
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from preprocessing.tokenization import build  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=pathlib.Path)
    parser.add_argument("--vocab", type=int, default=2048, help="ids of each BPE")
    a = parser.parse_args()
    gpt2 = build.gpt2_bpe(a.out / "gpt2", vocab_size=a.vocab)
    build.tiktoken_vocabulary(a.out / "tiktoken.json", gpt2)
    build.huggingface_directory(a.out / "hf", vocab_size=a.vocab)
    print(f"wrote {gpt2}, {a.out / 'tiktoken.json'} and {a.out / 'hf'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
