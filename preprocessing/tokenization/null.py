"""Megatron's ``NullTokenizer``: the text is the ids, space-separated (benchmarks with no vocabulary)."""

from __future__ import annotations

from .base import Tokenizer, TokenizerError


class TextNotAccepted(ValueError):
    """A prompt this tokenizer cannot read (the rule is in the message)."""


class NullTokenizer(Tokenizer):
    type_name = "NullTokenizer"

    def __init__(self, vocab_size: int | None):
        if not vocab_size or vocab_size < 1:
            raise TokenizerError("NullTokenizer needs vocab_size (the checkpoint's args or TOKENIZER_VOCAB_SIZE)")
        super().__init__({})
        self.eos_id = self.pad_id = int(vocab_size)  # Megatron's: the id after the vocabulary
        self.vocab_size = int(vocab_size) + 1

    def _encode_plain(self, text: str) -> list[int]:
        try:
            ids = [int(x) for x in text.split(" ")]
        except ValueError:
            raise TextNotAccepted("NullTokenizer reads a prompt as token ids separated by single spaces") from None
        if any(not 0 <= i < self.vocab_size for i in ids):
            raise TextNotAccepted(f"NullTokenizer: token ids must be in [0, {self.vocab_size})")
        return ids

    def _decode_plain(self, ids: list[int]) -> str:
        return " ".join(str(i) for i in ids)

    def decode_continuation(self, prompt_ids, new_ids) -> str:
        text = self.decode(new_ids)
        return " " + text if text and len(prompt_ids) else text
