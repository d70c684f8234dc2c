"""What the preprocessing and postprocessing models do, as plain functions over numpy arrays.

The Python-backend models in ``model_repository/`` only move tensors in and out of these, so everything
here is unit-tested without Triton.
"""

from __future__ import annotations

import json
import os

import numpy as np

from . import tokenization
from .params import SCALARS, WORD_LISTS, InvalidRequest, from_tensors
from .tokenization import TextNotAccepted, Tokenizer


def _text(value, field: str) -> str:
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError as err:
            raise InvalidRequest(field, value[:32], f"must be valid UTF-8 ({err.reason} at byte {err.start})") from None
    return str(value)


def _flag(values: dict, name: str, row: int, default: bool) -> bool:
    value = values.get(name)
    return default if value is None else bool(value[row][0])


# The request size limit on prompts: no tokenizer turns more than this many bytes into one token in practice, so
# a longer prompt cannot fit the context anyway.
PROMPT_BYTES_PER_TOKEN = 64


def max_prompt_bytes(context: int) -> int:
    return PROMPT_BYTES_PER_TOKEN * context


class GenerationFailed(RuntimeError):
    """megatron_gpt reported a row error; ``invalid`` tells a broken rule (the client's) from a server fault."""

    def __init__(self, message: str):
        super().__init__(message)
        self.invalid = message.startswith(InvalidRequest.PREFIX)


class Preprocessor:
    """Text and sampling parameters in; validated, padded token ids out."""

    def __init__(self, tokenizer: Tokenizer, context: int):
        self.tokenizer, self.context = tokenizer, context

    @classmethod
    def from_env(cls) -> Preprocessor:
        """The tokenizer and context length the server exported for the pipeline models."""
        return cls(tokenization.from_env(), int(os.environ["MEGATRON_TRITON_CONTEXT"]))

    def __call__(self, values: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``values`` maps lower-case ensemble names to [batch, 1] arrays (absent: default).

        Returns INPUT_IDS (padded to the context so that the dynamic batcher can merge any requests) and
        INPUT_LENGTH; raises ``InvalidRequest`` for the first rule a row breaks.
        """
        texts = values.get("text_input")
        if texts is None:
            raise InvalidRequest("text_input", None, "is required")
        rows = len(texts)
        for name in WORD_LISTS:  # the ensemble passes word lists to megatron_gpt, where PyTriton cannot take
            value = values.get(name)  # a zero-size tensor
            if value is not None and value.size == 0 and rows:
                raise InvalidRequest(name, [], "must hold at least one word; leave the input out for none")
        ids = np.zeros((rows, self.context), np.int32)
        lengths = np.zeros((rows, 1), np.int32)
        limit = max_prompt_bytes(self.context)
        for row in range(rows):
            raw = texts[row][0]
            if len(raw) > limit:  # refused before tokenizing: a huge prompt must not cost the server much
                raise InvalidRequest("text_input", f"<{len(raw)} bytes>", f"must be at most {limit} bytes "
                                     f"({PROMPT_BYTES_PER_TOKEN} per token of the {self.context}-token context)")
            row_values = {name: values[name][row][0] for name in SCALARS if values.get(name) is not None}
            row_values |= {name: values[name][row] for name in WORD_LISTS if values.get(name) is not None}
            params = from_tensors(row_values)
            try:
                prompt = self.tokenizer.encode(_text(raw, "text_input"), parse_special=params.add_special_tokens)
            except TextNotAccepted as err:
                raise InvalidRequest("text_input", _text(raw, "text_input")[:32], str(err)) from None
            if params.add_bos:
                if self.tokenizer.eos_id < 0:
                    raise InvalidRequest("add_bos", True, "this tokenizer has no end-of-document token to add")
                prompt = [self.tokenizer.eos_id, *prompt]
            params.check(self.tokenizer.vocab_size, len(prompt), self.context)
            ids[row, : len(prompt)] = prompt
            lengths[row, 0] = len(prompt)
        return {"INPUT_IDS": ids, "INPUT_LENGTH": lengths}


class Postprocessor:
    """Generated ids in; text (with the prompt first when ``exclude_input_in_output`` is false) and log-probs out."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer

    @classmethod
    def from_env(cls) -> Postprocessor:
        return cls(tokenization.from_env())

    def __call__(self, values: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Raises ``GenerationFailed`` with megatron_gpt's message when a row carries an ERROR."""
        errors = values.get("ERROR")
        if errors is not None:
            message = next((e[0] for e in errors if e[0]), b"")
            if message:
                raise GenerationFailed(_text(message, "ERROR"))
        out_ids, out_len, limit = values["OUTPUT_IDS"], values["OUTPUT_LENGTH"], values.get("TEXT_LIMIT")
        # Streaming responses carry their new text (rank 0 detokenizes incrementally, holding back partial
        # characters and possible stop words) and how many log-probs are valid.
        deltas, counts = values.get("TEXT_DELTA"), values.get("LOG_PROBS_LENGTH")
        if counts is None:  # unary: as many as generated tokens, when asked for
            asked = [_flag(values, "RETURN_LOG_PROBS", row, False) for row in range(len(out_ids))]
            counts = out_len * np.array(asked, dtype=np.int32)[:, None]
        texts = np.empty((len(out_ids), 1), dtype=object)
        # Log-probs not asked for come back empty (docs/triton.md's output table); asked-for ones trimmed to the
        # longest row.
        width = int(counts.max()) if len(counts) else 0
        logprobs = np.zeros((len(out_ids), width), np.float32)
        if width:
            logprobs[:] = values["OUTPUT_LOG_PROBS"][:, :width]
        logprobs[np.arange(width)[None, :] >= counts] = 0.0  # rows shorter than the widest
        for row in range(len(out_ids)):
            if deltas is not None:
                text = _text(deltas[row][0], "TEXT_DELTA")
            else:
                prompt = values["INPUT_IDS"][row][: int(values["INPUT_LENGTH"][row][0])]
                text = self.tokenizer.decode_continuation(prompt, out_ids[row][: int(out_len[row][0])])
                if limit is not None and limit[row][0] >= 0:  # a stop word ended generation inside this text
                    text = text[: int(limit[row][0])]
            if not _flag(values, "EXCLUDE_INPUT_IN_OUTPUT", row, True):
                text = _text(values["TEXT_INPUT"][row][0], "text_input") + text
            texts[row, 0] = text.encode("utf-8")
        return {"TEXT_OUTPUT": texts, "OUT_OUTPUT_LOG_PROBS": logprobs, **score_tensors(values.get("SCORES"),
                                                                                       len(out_ids))}


def score_tensors(scores, rows: int) -> dict[str, np.ndarray]:
    """The scoring outputs (DESIGN.md "Scoring and alternatives") from megatron_gpt's SCORES, one JSON object
    per row (empty when nothing was asked): per-position lists, right-padded across the rows of a batch
    (empty strings, zero log-probs)."""
    parsed = [json.loads(s[0]) if scores is not None and s[0] else {} for s in (scores if scores is not None
                                                                              else [[b""]] * rows)]

    def flat(key: str, dtype, fill):
        width = max([len(p.get(key, [])) for p in parsed] + [0])
        out = np.full((rows, width), fill, dtype=dtype)
        for row, p in enumerate(parsed):
            values = p.get(key, [])
            out[row, : len(values)] = [v.encode("utf-8") for v in values] if dtype is object else values
        return out

    def nested(key: str):
        """[rows, positions, alternatives] texts and log-probs from [[texts, values], ...] per position."""
        positions = max([len(p.get(key, [])) for p in parsed] + [0])
        k = max([len(t) for p in parsed for t, _ in p.get(key, [])] + [0])
        texts = np.full((rows, positions, k), b"", dtype=object)
        values = np.zeros((rows, positions, k), np.float32)
        for row, p in enumerate(parsed):
            for i, (t, v) in enumerate(p.get(key, [])):
                texts[row, i, : len(t)] = [x.encode("utf-8") for x in t]
                values[row, i, : len(v)] = v
        return values, texts

    output_top, output_top_texts = nested("output_top")
    prompt_top, prompt_top_texts = nested("prompt_top")
    return {"OUTPUT_TOKENS": flat("output_tokens", object, b""), "PROMPT_TOKENS": flat("prompt_tokens", object, b""),
            "OUTPUT_TOKEN_IDS": flat("output_ids", np.int32, -1), "PROMPT_TOKEN_IDS": flat("prompt_ids", np.int32, -1),
            "PROMPT_LOG_PROBS": flat("prompt_log_probs", np.float32, 0.0),
            "OUTPUT_TOP_LOG_PROBS": output_top, "OUTPUT_TOP_TOKENS": output_top_texts,
            "PROMPT_TOP_LOG_PROBS": prompt_top, "PROMPT_TOP_TOKENS": prompt_top_texts}
