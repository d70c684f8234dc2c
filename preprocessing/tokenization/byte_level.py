"""Megatron's ``GPT2BPETokenizer`` and ``HuggingFaceTokenizer``, both over HuggingFace's ``tokenizers`` library.

``tokenizers`` (Rust, a few MB) rather than ``transformers``' ``AutoTokenizer``, which Megatron training calls:
the ids are the same (the tests hold them to ``transformers`` on the same files) without importing transformers
in every serving process. GPT-2's BPE is the byte-level BPE with GPT-2's split pattern, which Megatron's own
``gpt2_tokenization.py`` implements by hand.
"""

from __future__ import annotations

import json
import pathlib

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers

from .base import Tokenizer, TokenizerError
from .sentencepiece import piece_bytes

GPT2_EOD = "<|endoftext|>"


def byte_decoder() -> dict[str, int]:
    """GPT-2's printable stand-ins for bytes, reversed (the byte-level alphabet)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


class _ByteLevel(Tokenizer):
    """A ``tokenizers.Tokenizer``: ``_plain`` reads special-token texts as text, ``_parsing`` as their ids. The
    library splits on special tokens and adds BOS itself, so ``encode`` and ``decode`` are its own."""

    def _setup(self, plain: HFTokenizer, parsing: HFTokenizer, special: dict[str, int]) -> None:
        plain.encode_special_tokens = True  # special-token texts are split like any other text
        self._plain, self._parsing = plain, parsing
        super().__init__(special)
        self.vocab_size = max([plain.get_vocab_size(with_added_tokens=True), *(i + 1 for i in special.values())])

    def encode(self, text: str, parse_special: bool = False, leading: bool = True) -> list[int]:
        ids = (self._parsing if parse_special else self._plain).encode(text, add_special_tokens=leading).ids
        if parse_special and self.bos_id is not None and ids[:2] == [self.bos_id, self.bos_id]:
            ids = ids[1:]  # the text began with BOS (a chat template) and the post-processor added one too
        return ids

    def decode(self, ids, skip_special: bool = True) -> str:
        return self._plain.decode([int(i) for i in ids], skip_special_tokens=skip_special)

    def token_bytes(self) -> list[bytes | None]:
        """Byte-level vocabularies spell bytes with GPT-2's printable stand-ins; others (a sentencepiece model
        converted to ``tokenizer.json``: Metaspace, byte fallback) are read as sentencepiece pieces."""
        decoder = json.loads(self._plain.to_str()).get("decoder") or {}
        kinds = {decoder.get("type")} | {d.get("type") for d in decoder.get("decoders") or []}
        stand_ins = byte_decoder() if "ByteLevel" in kinds else None
        added = set(self._plain.get_added_tokens_decoder())
        out: list[bytes | None] = [None] * self.vocab_size
        for text, i in self._plain.get_vocab(with_added_tokens=True).items():
            if i in self.special_ids or i >= self.vocab_size:
                continue
            if i in added:  # an added token that is not special is written as itself
                out[i] = text.encode("utf-8")
            elif stand_ins is not None:
                out[i] = bytes(stand_ins[c] for c in text) if all(c in stand_ins for c in text) else None
            else:
                out[i] = piece_bytes(text, len(text) == 6 and text.startswith("<0x") and text.endswith(">"))
        return out


class GPT2BPETokenizer(_ByteLevel):
    type_name = "GPT2BPETokenizer"

    def __init__(self, vocab_file: pathlib.Path, merge_file: pathlib.Path):
        def build() -> HFTokenizer:
            try:
                bpe = models.BPE.from_file(str(vocab_file), str(merge_file))
            except Exception as err:  # noqa: BLE001 - the library raises a bare Exception on a malformed file
                raise TokenizerError(f"GPT2BPETokenizer: cannot read {vocab_file} and {merge_file}: {err}") from None
            tok = HFTokenizer(bpe)
            tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
            tok.decoder = decoders.ByteLevel()
            return tok

        plain, parsing = build(), build()
        eod = plain.token_to_id(GPT2_EOD)
        if eod is None:
            raise TokenizerError(f"GPT2BPETokenizer: {vocab_file} has no {GPT2_EOD!r}, Megatron's end of document")
        parsing.add_special_tokens([GPT2_EOD])  # already in the vocabulary: keeps its id
        self._setup(plain, parsing, {GPT2_EOD: eod})
        self.eos_id = self.pad_id = eod


def _token(value) -> str | None:
    """A special token as ``tokenizer_config.json`` writes it: a string or an AddedToken's fields."""
    return value.get("content") if isinstance(value, dict) else value


class HuggingFaceTokenizer(_ByteLevel):
    type_name = "HuggingFaceTokenizer"

    def __init__(self, directory: pathlib.Path):
        path = directory / "tokenizer.json"
        try:
            plain, parsing = HFTokenizer.from_file(str(path)), HFTokenizer.from_file(str(path))
        except Exception as err:  # noqa: BLE001 - the library raises a bare Exception on a malformed file
            raise TokenizerError(f"HuggingFaceTokenizer: cannot read {path}: {err}") from None
        config_path = directory / "tokenizer_config.json"
        try:
            config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        except (OSError, ValueError) as err:
            raise TokenizerError(f"HuggingFaceTokenizer: cannot read {config_path}: {err}") from None
        special = {t.content: i for i, t in plain.get_added_tokens_decoder().items() if t.special}
        self._setup(plain, parsing, special)

        def token_id(name: str) -> int | None:
            text = _token(config.get(name))
            return None if text is None else plain.token_to_id(text)

        self.eos_id = token_id("eos_token")
        if self.eos_id is None:
            raise TokenizerError(f"HuggingFaceTokenizer: {config_path} names no eos_token found in {path}; "
                                 "Megatron ends documents on it")
        self.bos_id, self.unk_id = token_id("bos_token"), token_id("unk_token")
        self.pad_id = token_id("pad_token")
        self.pad_id = self.eos_id if self.pad_id is None else self.pad_id
        self.chat_template = _chat_template(directory, config)
        self._names = {i: _token(config.get(k)) for k, i in (("eos_token", self.eos_id), ("bos_token", self.bos_id),
                                                              ("unk_token", self.unk_id), ("pad_token", self.pad_id))}
        # informational (/tokenizer_info): the post-processor itself puts BOS first when encoding
        probe = plain.encode("", add_special_tokens=True).ids
        self.leading = (self.bos_id,) if self.bos_id is not None and probe[:1] == [self.bos_id] else ()

    def token_text(self, token_id):
        if token_id is None:
            return None
        return self.special_ids.get(token_id) or self._plain.id_to_token(token_id)


def _chat_template(directory: pathlib.Path, config: dict) -> str | None:
    """The template transformers would use: ``chat_template.jinja`` beside the config, else the config's own (a
    string, or a list of named templates of which ``default`` is the one)."""
    file = directory / "chat_template.jinja"
    if file.is_file():
        return file.read_text()
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None
