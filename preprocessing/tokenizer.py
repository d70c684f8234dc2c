"""A thin sentencepiece wrapper with the ids and the incremental decoding the pipeline needs."""

from __future__ import annotations

import pathlib

import sentencepiece as spm

# Tokens of context kept when decoding a continuation on its own: enough for sentencepiece's whitespace and
# byte-fallback rules to see the boundary, few enough that decoding stays cheap.
_CONTEXT_TOKENS = 8


class Tokenizer:
    def __init__(self, model_file: str | pathlib.Path):
        path = pathlib.Path(model_file)
        if not path.is_file():
            raise FileNotFoundError(f"sentencepiece model not found: {path}")
        self.sp = spm.SentencePieceProcessor(model_file=str(path))
        self.path = path

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    @property
    def eos_id(self) -> int:
        return self.sp.eos_id()

    @property
    def pad_id(self) -> int:
        pad = self.sp.pad_id()
        return pad if pad >= 0 else self.eos_id

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def decode(self, ids) -> str:
        return self.sp.decode([int(i) for i in ids])

    def decode_continuation(self, prompt_ids, new_ids) -> str:
        """Text that ``new_ids`` add after ``prompt_ids``, exactly as decoding the whole sequence gives it.

        Decoding the new ids alone would drop a leading space under tokenizers that add a dummy prefix.
        """
        context = [int(i) for i in prompt_ids[-_CONTEXT_TOKENS:]]
        head = self.decode(context)
        whole = self.decode(context + [int(i) for i in new_ids])
        return whole[len(head):] if whole.startswith(head) else self.decode(new_ids)
