"""Which tokenizer a checkpoint is served with: its type and files, as Megatron training recorded them.

Megatron stores ``tokenizer_type`` and the tokenizer's files (``tokenizer_model``, ``vocab_file``,
``merge_file``) in every checkpoint's ``args``, as paths on the training machine. ``TOKENIZER`` (a file or a
directory) replaces those paths and ``TOKENIZER_TYPE`` the type. A recorded path that does not exist here is
also looked for, by its file name, beside the checkpoint. Rank 0 resolves the spec once, checks its files,
and hands it to every other process of the job as JSON (``MEGATRON_TRITON_TOKENIZER``).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

from .base import TokenizerError

TYPES = ("GPT2BPETokenizer", "SentencePieceTokenizer", "GPTSentencePieceTokenizer", "Llama2Tokenizer",
         "HuggingFaceTokenizer", "TikTokenizer", "NullTokenizer")
SENTENCEPIECE_TYPES = ("SentencePieceTokenizer", "GPTSentencePieceTokenizer", "Llama2Tokenizer")
# The file names Megatron's examples and HuggingFace use, looked for inside a directory given as TOKENIZER.
GPT2_VOCAB_NAMES = ("vocab.json", "gpt2-vocab.json")
GPT2_MERGE_NAMES = ("merges.txt", "gpt2-merges.txt")
SENTENCEPIECE_NAMES = ("tokenizer.model",)


@dataclasses.dataclass(frozen=True)
class TokenizerSpec:
    """A tokenizer type and what builds it (Megatron's argument names)."""

    type: str
    files: dict = dataclasses.field(default_factory=dict)  # tokenizer_model / vocab_file / merge_file -> path
    vocab_size: int | None = None  # TikTokenizer, NullTokenizer
    tiktoken_pattern: str | None = None
    tiktoken_num_special_tokens: int | None = None
    special_tokens: tuple | None = None  # tokenizer_special_tokens
    vocab_extra_ids: int = 0

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> TokenizerSpec:
        values = json.loads(text)
        if values.get("special_tokens") is not None:
            values["special_tokens"] = tuple(values["special_tokens"])
        return cls(**values)

    def describe(self) -> str:
        files = ", ".join(f"{k}={v}" for k, v in self.files.items())
        return f"{self.type}" + (f" ({files})" if files else "")


def _guess_type(path: pathlib.Path) -> str | None:
    """The type of a TOKENIZER given to a checkpoint that records none, from what the path holds."""
    if path.is_dir():
        if (path / "tokenizer.json").is_file():
            return "HuggingFaceTokenizer"
        if any((path / n).is_file() for n in GPT2_VOCAB_NAMES):
            return "GPT2BPETokenizer"
        if any((path / n).is_file() for n in SENTENCEPIECE_NAMES):
            return "GPTSentencePieceTokenizer"
        return None
    if path.suffix == ".model":
        return "GPTSentencePieceTokenizer"  # raw sentencepiece ids, ending on the model's EOS
    if path.name == "tokenizer.json":
        return "HuggingFaceTokenizer"
    return None


def _locate(recorded, names: tuple[str, ...], override: pathlib.Path | None, near: list[pathlib.Path],
            what: str, arg: str) -> str:
    """The path of one file: inside/at TOKENIZER when given, else the recorded path or its name near the
    checkpoint. Raises naming the type, the arg and every place looked."""
    looked: list[pathlib.Path] = []
    if override is not None:
        candidates = [override / n for n in names] if override.is_dir() else [override]
        if override.is_dir() and recorded:
            candidates.append(override / pathlib.PurePath(str(recorded)).name)
    else:
        if not recorded:
            raise TokenizerError(f"{what}: the checkpoint's args record no {arg}; set TOKENIZER to the file")
        candidates = [pathlib.Path(str(recorded))] + [d / pathlib.PurePath(str(recorded)).name for d in near]
    for candidate in candidates:
        looked.append(candidate)
        if candidate.exists():
            return str(candidate.resolve())
    source = "TOKENIZER" if override is not None else f"the checkpoint's {arg}"
    raise TokenizerError(f"{what}: {arg} not found (from {source}); looked for "
                         f"{', '.join(str(p) for p in dict.fromkeys(looked))}. Set TOKENIZER to the tokenizer's "
                         "file or directory on this machine")


def resolve(args: dict | None, tokenizer: str | pathlib.Path | None = None, tokenizer_type: str | None = None,
            checkpoint: str | pathlib.Path | None = None) -> TokenizerSpec:
    """The spec the checkpoint's ``args`` and the TOKENIZER / TOKENIZER_TYPE overrides give; every file checked."""
    args = dict(args or {})
    override = pathlib.Path(tokenizer) if tokenizer else None
    if override is not None and not override.exists():
        raise TokenizerError(f"TOKENIZER={override} does not exist")
    kind = tokenizer_type or args.get("tokenizer_type") or (_guess_type(override) if override else None)
    if kind is None:
        raise TokenizerError("the checkpoint's args record no tokenizer_type and TOKENIZER does not tell one; set "
                             f"TOKENIZER_TYPE to one of {', '.join(TYPES)}")
    if kind not in TYPES:
        raise TokenizerError(f"tokenizer_type {kind!r} is not served; the types are {', '.join(TYPES)}")
    near = []
    if checkpoint is not None:
        root = pathlib.Path(checkpoint)
        near = [root, root.parent] + sorted(p for p in root.glob("iter_*") if p.is_dir())[-1:]
    what = f"tokenizer {kind}"
    files: dict[str, str] = {}
    if kind == "GPT2BPETokenizer":
        vocab_override = override
        merge_override = override
        if override is not None and override.is_file():  # the vocabulary; the merges beside it
            merge_override = override.parent
        files["vocab_file"] = _locate(args.get("vocab_file"), GPT2_VOCAB_NAMES, vocab_override, near, what,
                                      "vocab_file")
        files["merge_file"] = _locate(args.get("merge_file"), GPT2_MERGE_NAMES, merge_override, near, what,
                                      "merge_file")
    elif kind in SENTENCEPIECE_TYPES:
        files["tokenizer_model"] = _locate(args.get("tokenizer_model"), SENTENCEPIECE_NAMES, override, near, what,
                                           "tokenizer_model")
    elif kind == "HuggingFaceTokenizer":
        found = pathlib.Path(_locate(args.get("tokenizer_model"), ("tokenizer.json",), override, near, what,
                                     "tokenizer_model"))
        directory = found if found.is_dir() else found.parent
        if not (directory / "tokenizer.json").is_file():
            raise TokenizerError(f"{what}: {directory} holds no tokenizer.json (a HuggingFace tokenizer directory "
                                 "saved with save_pretrained is needed)")
        files["tokenizer_model"] = str(directory)
    elif kind == "TikTokenizer":
        files["tokenizer_model"] = _locate(args.get("tokenizer_model"), ("tokenizer.json", "vocab.json"), override,
                                           near, what, "tokenizer_model")
    special = args.get("tokenizer_special_tokens")
    return TokenizerSpec(
        type=kind, files=files, vocab_size=args.get("vocab_size"),
        tiktoken_pattern=args.get("tiktoken_pattern") or ("v2" if kind == "TikTokenizer" else None),
        tiktoken_num_special_tokens=args.get("tiktoken_num_special_tokens"),
        special_tokens=tuple(special) if special else None, vocab_extra_ids=int(args.get("vocab_extra_ids") or 0))
