"""What the pipeline needs of a tokenizer, whatever its type: Megatron's ids, safe incremental text, special tokens.

Each type (``sentencepiece.py``, ``byte_level.py``, ``tiktoken_json.py``, ``null.py``) gives the ids Megatron
training's own tokenizer class gives for that type (``megatron/training/tokenizer/tokenizer.py``); this base
adds what serving needs on top, the same for all of them:

- Special-token texts in a prompt (``<|endoftext|>``, ``</s>``, ``<EOD>``, ...) stay text unless the request
  asks for them to be read as control tokens (``parse_special``): a user's prompt must not be able to end a
  document or fake a chat turn by typing one.
- Generated text leaves special tokens out (as vLLM does by default); ``decode(..., skip_special=False)``
  keeps them, for ``/detokenize``.
- ``decode_continuation`` gives the text a few tokens add after others, exactly as decoding the whole
  sequence gives it, so that streamed deltas concatenate to the unary text under every type.
"""

from __future__ import annotations

import re

# Tokens of context kept when decoding a continuation on its own: enough for whitespace, byte-fallback and
# byte-level rules to see the boundary, few enough that decoding stays cheap.
CONTEXT_TOKENS = 8


class TokenizerError(ValueError):
    """The tokenizer cannot be built: a missing file, an unknown type, a vocabulary that breaks its format."""


class Tokenizer:
    """Megatron's ids for one tokenizer type. Subclasses set the ids below and implement ``_encode_plain`` and
    ``_decode_plain`` (text with no special tokens in it, and ids with none among them)."""

    type_name = ""
    vocab_size: int  # ids this tokenizer can produce: every id is in [0, vocab_size)
    eos_id: int  # Megatron's EOD: generation ends on it (end_id's default)
    bos_id: int | None = None
    pad_id: int
    unk_id: int | None = None
    chat_template: str | None = None  # the tokenizer's own (HuggingFace tokenizer_config.json), if any
    leading: tuple[int, ...] = ()  # what Megatron's tokenize puts before every text (Llama2Tokenizer: BOS)

    def __init__(self, special_tokens: dict[str, int]):
        self.special_tokens = dict(special_tokens)  # text -> id
        self.special_ids = {i: t for t, i in self.special_tokens.items()}
        # Longest first, so that a special token that contains a shorter one is matched whole.
        texts = sorted(self.special_tokens, key=len, reverse=True)
        self._special_re = re.compile("|".join(map(re.escape, texts))) if texts else None

    # --- what subclasses provide -------------------------------------------------------------------------------
    def _encode_plain(self, text: str) -> list[int]:
        raise NotImplementedError

    def _decode_plain(self, ids: list[int]) -> str:
        raise NotImplementedError

    # --- the interface -----------------------------------------------------------------------------------------
    def token_text(self, token_id: int | None) -> str | None:
        """The text of a special token id (or None)."""
        return None if token_id is None else self.special_ids.get(token_id)

    def encode(self, text: str, parse_special: bool = False, leading: bool = True) -> list[int]:
        """Megatron's ids for ``text``: with the BOS its tokenize adds, for types that add one, unless ``leading``
        is false (a fragment inside a text: a stop or bad word).

        With ``parse_special``, special-token texts become their ids, and a text that starts with the BOS text
        gets no second BOS (a chat template that writes ``{{ bos_token }}``)."""
        lead = list(self.leading) if leading else []
        if not parse_special or self._special_re is None:
            return lead + self._encode_plain(text)
        ids, start = [], 0
        for match in self._special_re.finditer(text):
            if match.start() > start:
                ids += self._encode_plain(text[start : match.start()])
            ids.append(self.special_tokens[match.group()])
            start = match.end()
        if start < len(text):
            ids += self._encode_plain(text[start:])
        return ids if lead and ids[: len(lead)] == lead else lead + ids

    def decode(self, ids, skip_special: bool = True) -> str:
        """Text of ``ids``; special tokens left out, or written as their text with ``skip_special=False``."""
        ids = [int(i) for i in ids]
        if not self.special_ids:
            return self._decode_plain(ids)
        parts, run = [], []
        for i in ids:
            if i in self.special_ids:
                if run:
                    parts.append(self._decode_plain(run))
                    run = []
                if not skip_special:
                    parts.append(self.special_ids[i])
            else:
                run.append(i)
        if run:
            parts.append(self._decode_plain(run))
        return "".join(parts)

    def decode_continuation(self, prompt_ids, new_ids) -> str:
        """Text that ``new_ids`` add after ``prompt_ids``, exactly as decoding the whole sequence gives it.

        Decoding the new ids alone would drop a leading space under tokenizers that add a dummy prefix, and
        split characters whose bytes straddle the boundary under byte-level ones.
        """
        context = [int(i) for i in prompt_ids[-CONTEXT_TOKENS:]]
        head = self.decode(context)
        whole = self.decode(context + [int(i) for i in new_ids])
        return whole[len(head):] if whole.startswith(head) else self.decode(new_ids)

    def token_bytes(self) -> list[bytes | None]:
        """Each id's bytes as it appears in text (None: a special or control token, never part of text): the
        vocabulary a grammar engine masks (``triton_backend/engine/grammar.py``)."""
        raise NotImplementedError(f"{self.type_name} has no text per token")

    def info(self) -> dict:
        """What ``/tokenizer_info`` shows."""
        return {"tokenizer_class": self.type_name, "vocab_size": self.vocab_size,
                "eos_token": self.token_text(self.eos_id), "bos_token": self.token_text(self.bos_id),
                "pad_token": self.token_text(self.pad_id), "unk_token": self.token_text(self.unk_id),
                "eos_token_id": self.eos_id, "bos_token_id": self.bos_id, "pad_token_id": self.pad_id,
                "add_bos_token": bool(self.leading)}
