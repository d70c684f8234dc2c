"""The tokenizer layer: every tokenizer type Megatron training records, with Megatron's ids.

``resolve`` turns a checkpoint's ``args`` (and the TOKENIZER / TOKENIZER_TYPE overrides) into a
``TokenizerSpec``; ``load`` builds the tokenizer it names. Every way in (preprocessing, postprocessing, rank 0's
engine, the HTTP API) loads the same spec, so the ids agree everywhere.
"""

from __future__ import annotations

import functools
import os
import pathlib

from .base import Tokenizer, TokenizerError
from .null import TextNotAccepted
from .spec import TYPES, TokenizerSpec, resolve

ENV = "MEGATRON_TRITON_TOKENIZER"  # the resolved spec, as JSON, for every process of the job

__all__ = ["ENV", "TYPES", "TextNotAccepted", "Tokenizer", "TokenizerError", "TokenizerSpec", "from_env", "load",
           "load_path", "resolve"]


def load(spec: TokenizerSpec) -> Tokenizer:
    """The tokenizer ``spec`` names; ``TokenizerError`` when its files do not make one."""
    files = {k: pathlib.Path(v) for k, v in spec.files.items()}
    for arg, path in files.items():
        if not path.exists():
            raise TokenizerError(f"tokenizer {spec.type}: {arg} {path} does not exist")
    kind = spec.type
    if kind in ("SentencePieceTokenizer", "GPTSentencePieceTokenizer", "Llama2Tokenizer"):
        from . import sentencepiece

        cls = getattr(sentencepiece, kind)
        if kind == "SentencePieceTokenizer":
            return cls(files["tokenizer_model"], spec.vocab_extra_ids)
        return cls(files["tokenizer_model"])
    if kind in ("GPT2BPETokenizer", "HuggingFaceTokenizer"):
        from . import byte_level

        if kind == "GPT2BPETokenizer":
            return byte_level.GPT2BPETokenizer(files["vocab_file"], files["merge_file"])
        return byte_level.HuggingFaceTokenizer(files["tokenizer_model"])
    if kind == "TikTokenizer":
        from .tiktoken_json import TikTokenizer

        return TikTokenizer(files["tokenizer_model"], spec.tiktoken_pattern or "v2", spec.vocab_size,
                            spec.tiktoken_num_special_tokens, spec.special_tokens)
    if kind == "NullTokenizer":
        from .null import NullTokenizer

        return NullTokenizer(spec.vocab_size)
    raise TokenizerError(f"tokenizer_type {kind!r} is not served; the types are {', '.join(TYPES)}")


def load_path(path: str | pathlib.Path, tokenizer_type: str | None = None) -> Tokenizer:
    """A tokenizer from a file or directory alone (its type guessed from what it holds unless given)."""
    return load(resolve(None, path, tokenizer_type))


@functools.lru_cache(maxsize=4)
def _cached(text: str) -> Tokenizer:
    return load(TokenizerSpec.from_json(text))


def from_env(env=os.environ) -> Tokenizer:
    """The job's tokenizer, from the spec rank 0 exported (one instance per process and spec)."""
    return _cached(env[ENV])
