"""Megatron's ``TikTokenizer``: its own JSON vocabulary over the ``tiktoken`` library.

The file is a JSON list of ``{"rank", "token_bytes" (base64), "token_str"}``, the first 256 entries the single
bytes. The special tokens (``tokenizer_special_tokens``, by default ``<unk> <s> </s>``, padded with
``<SPECIAL_i>`` up to ``tiktoken_num_special_tokens``) take ids 0 .. N-1 and every rank is shifted up by N; the
vocabulary is cut to ``vocab_size`` (default 2**17) ids in all. Text is split by pattern ``v1`` or ``v2``.
"""

from __future__ import annotations

import base64
import binascii
import json
import pathlib

import tiktoken

from .base import Tokenizer, TokenizerError

PATTERNS = {
    "v1": r"[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+",
    "v2": r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|"
          r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}|"
          r" ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+",
}
DEFAULT_SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")
DEFAULT_VOCAB_SIZE = 2**17
DEFAULT_NUM_SPECIAL_TOKENS = 1000


def read_ranks(path: pathlib.Path, limit: int) -> dict[bytes, int]:
    """The JSON vocabulary's first ``limit`` entries as tiktoken's mergeable ranks, checked as Megatron checks them
    (with errors that say which entry breaks which rule)."""
    try:
        vocab = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise TokenizerError(f"TikTokenizer: cannot read {path}: {err}") from None
    if not isinstance(vocab, list):
        raise TokenizerError(f"TikTokenizer: {path} must hold a JSON list of {{rank, token_bytes, token_str}}")
    ranks: dict[bytes, int] = {}
    for i, entry in enumerate(vocab[:limit]):
        if not isinstance(entry, dict) or entry.get("rank") != i or "token_bytes" not in entry:
            raise TokenizerError(f"TikTokenizer: {path} entry {i} must be {{rank: {i}, token_bytes, token_str}}")
        try:
            token = base64.b64decode(entry["token_bytes"], validate=True)
        except (binascii.Error, TypeError):
            raise TokenizerError(f"TikTokenizer: {path} entry {i}: token_bytes is not base64") from None
        if i < 256 and token != bytes([i]):
            raise TokenizerError(f"TikTokenizer: {path} entry {i} must be the single byte {i}")
        if token in ranks:
            raise TokenizerError(f"TikTokenizer: {path} entry {i} repeats entry {ranks[token]}")
        ranks[token] = i
    return ranks


class TikTokenizer(Tokenizer):
    type_name = "TikTokenizer"

    def __init__(self, path: pathlib.Path, pattern: str = "v2", vocab_size: int | None = None,
                 num_special_tokens: int | None = None, special_tokens=None):
        if pattern not in PATTERNS:
            raise TokenizerError(f"TikTokenizer: tiktoken_pattern must be 'v1' or 'v2', got {pattern!r}")
        vocab_size = vocab_size or DEFAULT_VOCAB_SIZE
        num_special = DEFAULT_NUM_SPECIAL_TOKENS if num_special_tokens is None else num_special_tokens
        names = list(special_tokens or DEFAULT_SPECIAL_TOKENS)
        if len(set(names)) != len(names) or not set(DEFAULT_SPECIAL_TOKENS) <= set(names):
            raise TokenizerError(f"TikTokenizer: tokenizer_special_tokens must be distinct and include "
                                 f"{' '.join(DEFAULT_SPECIAL_TOKENS)}, got {names}")
        if not len(names) <= num_special < vocab_size:
            raise TokenizerError(f"TikTokenizer: tiktoken_num_special_tokens={num_special} must be at least the "
                                 f"{len(names)} special tokens and below vocab_size={vocab_size}")
        names += [f"<SPECIAL_{i}>" for i in range(len(names), num_special)]
        inner = read_ranks(path, vocab_size - num_special)
        if len(inner) != vocab_size - num_special:
            raise TokenizerError(f"TikTokenizer: {path} has {len(inner)} entries; vocab_size={vocab_size} needs "
                                 f"{vocab_size - num_special} after the {num_special} special tokens")
        special = {name: i for i, name in enumerate(names)}
        self._model = tiktoken.Encoding(name=path.stem, pat_str=PATTERNS[pattern],
                                        mergeable_ranks={t: r + num_special for t, r in inner.items()},
                                        special_tokens=special)
        super().__init__(special)
        self._bytes = {r + num_special: t for t, r in inner.items()}
        self.vocab_size = vocab_size
        self.unk_id, self.bos_id, self.eos_id = (special[t] for t in DEFAULT_SPECIAL_TOKENS)
        self.pad_id = special.get("<pad>", self.eos_id)

    def _encode_plain(self, text: str) -> list[int]:
        return self._model.encode_ordinary(text)

    def _decode_plain(self, ids: list[int]) -> str:
        return self._model.decode(ids)

    def token_bytes(self) -> list[bytes | None]:
        return [self._bytes.get(i) for i in range(self.vocab_size)]
