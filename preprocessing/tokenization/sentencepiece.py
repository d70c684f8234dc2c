"""The three sentencepiece types of Megatron training, over the ``sentencepiece`` library.

- ``SentencePieceTokenizer``: the model's pieces, then ``<CLS> <SEP> <EOD> <MASK>`` (and ``<PAD>`` / ``<BOS>`` /
  ``<EOS>`` where the model has none) appended after them; documents end on ``<EOD>``, not on the model's
  ``</s>``.
- ``GPTSentencePieceTokenizer``: the model's own ids; documents end on its EOS.
- ``Llama2Tokenizer``: the model's own ids with BOS before every text; documents end on its EOS.
"""

from __future__ import annotations

import pathlib

import sentencepiece as spm

from .base import Tokenizer, TokenizerError


def _processor(path: pathlib.Path) -> spm.SentencePieceProcessor:
    try:
        return spm.SentencePieceProcessor(model_file=str(path))
    except (OSError, RuntimeError) as err:
        raise TokenizerError(f"{path} is not a sentencepiece model: {err}") from None


def piece_bytes(piece: str, byte: bool = False) -> bytes:
    """A sentencepiece piece's bytes in text: a byte-fallback piece (``byte``, written ``<0x0A>``) is that byte;
    elsewhere U+2581 is a space."""
    if byte:
        return bytes([int(piece[3:5], 16)])
    return piece.replace("\u2581", " ").encode("utf-8")


def _control_pieces(sp: spm.SentencePieceProcessor) -> dict[str, int]:
    """The model's control pieces (``<s>``, ``</s>``, a pad): never produced from text, dropped by its decode."""
    return {sp.id_to_piece(i): i for i in range(sp.get_piece_size()) if sp.is_control(i)}


class GPTSentencePieceTokenizer(Tokenizer):
    type_name = "GPTSentencePieceTokenizer"

    def __init__(self, path: pathlib.Path):
        self.path, self.sp = path, _processor(path)
        super().__init__(_control_pieces(self.sp))
        self.vocab_size = self.sp.get_piece_size()
        self.eos_id = self.sp.eos_id()
        self.bos_id = self.sp.bos_id() if self.sp.bos_id() >= 0 else None
        self.unk_id = self.sp.unk_id() if self.sp.unk_id() >= 0 else None
        self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else self.eos_id

    def _encode_plain(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def _decode_plain(self, ids: list[int]) -> str:
        return self.sp.decode(ids)

    def token_bytes(self) -> list[bytes | None]:
        sp, out = self.sp, []
        for i in range(sp.get_piece_size()):
            if sp.is_control(i) or sp.is_unknown(i) or i in self.special_ids:
                out.append(None)
            else:
                out.append(piece_bytes(sp.id_to_piece(i), sp.is_byte(i)))
        return out + [None] * (self.vocab_size - len(out))  # Megatron's added ids (SentencePieceTokenizer)

    def token_text(self, token_id):
        if token_id is not None and 0 <= token_id < self.sp.get_piece_size():
            return self.sp.id_to_piece(token_id)
        return super().token_text(token_id)


class Llama2Tokenizer(GPTSentencePieceTokenizer):
    type_name = "Llama2Tokenizer"

    def __init__(self, path: pathlib.Path):
        super().__init__(path)
        if self.bos_id is None:
            raise TokenizerError(f"Llama2Tokenizer: {path} has no BOS piece, and this type puts BOS before every text")
        self.leading = (self.bos_id,)


class SentencePieceTokenizer(GPTSentencePieceTokenizer):
    type_name = "SentencePieceTokenizer"

    def __init__(self, path: pathlib.Path, vocab_extra_ids: int = 0):
        super().__init__(path)
        sp = self.sp
        vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
        special: dict[str, int] = {}

        def add(text: str) -> int:  # as Megatron appends them: a text already in the vocabulary keeps its id
            vocab.setdefault(text, len(vocab))
            special[text] = vocab[text]
            return vocab[text]

        def model_piece(piece_id: int, fallback: str) -> str:
            return sp.id_to_piece(piece_id) if 0 <= piece_id < sp.get_piece_size() else fallback

        for text in ("<CLS>", "<SEP>"):
            add(text)
        self.eos_id = add("<EOD>")  # Megatron's eod
        add("<MASK>")
        self.pad_id = add(model_piece(sp.pad_id(), "<PAD>"))
        self.bos_id = add(model_piece(sp.bos_id(), "<BOS>"))
        self.model_eos_id = add(model_piece(sp.eos_id(), "<EOS>"))
        for i in range(vocab_extra_ids):
            add(f"<extra_id_{i}>")
        Tokenizer.__init__(self, special)
        self.vocab_size = len(vocab)

    def token_text(self, token_id):
        return self.special_ids.get(token_id) or super().token_text(token_id)
