"""The request surface: one dataclass whose fields, defaults and rules drive validation everywhere.

The ensemble's scalar inputs (docs/triton.md's tensor table), the tensors preprocessing hands to ``megatron_gpt``
and the checks rank 0 runs before anything reaches the model all come from ``SamplingParams``, so names
and rules cannot drift between the client, the preprocessing model and the engine.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np


class InvalidRequest(ValueError):
    """A request broke a rule; the message names the tensor, the value and the rule."""

    PREFIX = "invalid input"

    def __init__(self, field: str, value, rule: str):
        self.field, self.value, self.rule = field, value, rule
        super().__init__(f"{self.PREFIX} '{field}' = {value!r}: {rule}")


@dataclasses.dataclass(frozen=True)
class Scalar:
    """How one scalar request field travels: Triton type and numpy dtype (same for ensemble and model)."""

    triton_type: str
    dtype: type
    required: bool = False


# Ensemble name -> wire spec. The internal tensor of megatron_gpt is the upper-case name.
SCALARS: dict[str, Scalar] = {
    "max_tokens": Scalar("TYPE_INT32", np.int32, required=True),
    "min_length": Scalar("TYPE_INT32", np.int32),
    "end_id": Scalar("TYPE_INT32", np.int32),
    "temperature": Scalar("TYPE_FP32", np.float32),
    "top_k": Scalar("TYPE_INT32", np.int32),
    "top_p": Scalar("TYPE_FP32", np.float32),
    "repetition_penalty": Scalar("TYPE_FP32", np.float32),
    "presence_penalty": Scalar("TYPE_FP32", np.float32),
    "frequency_penalty": Scalar("TYPE_FP32", np.float32),
    "seed": Scalar("TYPE_UINT64", np.uint64),
    "return_log_probs": Scalar("TYPE_BOOL", np.bool_),
    "exclude_input_in_output": Scalar("TYPE_BOOL", np.bool_),
    "return_prompt_log_probs": Scalar("TYPE_BOOL", np.bool_),
    "top_log_probs": Scalar("TYPE_INT32", np.int32),
    "top_p_decay": Scalar("TYPE_FP32", np.float32),
    "top_p_bound": Scalar("TYPE_FP32", np.float32),
    "add_bos": Scalar("TYPE_BOOL", np.bool_),
    "add_special_tokens": Scalar("TYPE_BOOL", np.bool_),
    # Structured outputs (DESIGN.md): TensorRT-LLM's tensor names
    "guided_decoding_guide_type": Scalar("TYPE_STRING", np.object_),
    "guided_decoding_guide": Scalar("TYPE_STRING", np.object_),
}

MAX_SEED = 2**64 - 1
GUIDE_TYPES = ("json", "json_schema", "regex", "ebnf_grammar", "choice")
MAX_GUIDE_CHARS = 256 * 1024  # a schema, regex, grammar or list of choices
MAX_TOP_LOG_PROBS = 20  # alternatives per position, as OpenAI allows

# String-list inputs ([-1] per request): ensemble name -> (most words, longest word in characters).
WORD_LISTS: dict[str, tuple[int, int]] = {"stop_words": (64, 256), "bad_words": (256, 256)}


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """Everything that decides what one request generates. ``None`` end_id means the tokenizer's EOS."""

    max_tokens: int
    min_length: int = 0
    end_id: int | None = None
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    return_log_probs: bool = False
    exclude_input_in_output: bool = True
    stop_words: tuple[str, ...] = ()
    bad_words: tuple[str, ...] = ()
    # Scoring and alternatives (DESIGN.md "Scoring and alternatives")
    return_prompt_log_probs: bool = False  # the log-prob of every prompt token after the first
    top_log_probs: int = 0  # the most likely tokens and their log-probs at every position returned
    # Megatron's: after each generated token top_p becomes max(top_p * top_p_decay, top_p_bound) (0: off)
    top_p_decay: float = 0.0
    top_p_bound: float = 0.0
    add_bos: bool = False  # the tokenizer's end-of-document token before the prompt (Megatron's add_BOS)
    # Special-token texts in the prompt (``</s>``, ``<|eot_id|>``, ...) read as those tokens; else they are text
    add_special_tokens: bool = False
    # What the output must match (``triton_backend/engine/grammar.py``): a type of GUIDE_TYPES and its text
    guided_decoding_guide_type: str = ""
    guided_decoding_guide: str = ""

    def top_p_at(self, generated: int) -> float:
        """The top_p that the token after ``generated`` generated tokens is drawn with."""
        if not self.top_p_decay:
            return self.top_p
        return max(self.top_p * self.top_p_decay ** generated, self.top_p_bound)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def check(self, vocab_size: int, prompt_tokens: int, context: int) -> None:
        """Raise ``InvalidRequest`` naming the first field that breaks its rule (docs/triton.md's tensor table)."""
        finite = ("temperature", "top_p", "repetition_penalty", "presence_penalty", "frequency_penalty", "top_p_decay",
                  "top_p_bound")
        for name in finite:
            value = getattr(self, name)
            if not math.isfinite(value):
                raise InvalidRequest(name, value, "must be a finite number")
        if prompt_tokens < 1:
            raise InvalidRequest("text_input", "", "must not be empty")
        scoring = self.return_prompt_log_probs  # may generate nothing: the prompt may fill the context
        if prompt_tokens > context or (prompt_tokens == context and not scoring):
            raise InvalidRequest(
                "text_input", f"<{prompt_tokens} tokens>", f"the prompt must be shorter than the model context "
                f"({context} tokens) to leave room for at least one generated token")
        room, least = context - prompt_tokens, 0 if scoring else 1
        if not least <= self.max_tokens <= room:
            raise InvalidRequest(
                "max_tokens", self.max_tokens, f"must be between {least} and {room} (context {context} minus the "
                f"{prompt_tokens}-token prompt)")
        if not 0 <= self.top_log_probs <= MAX_TOP_LOG_PROBS:
            raise InvalidRequest("top_log_probs", self.top_log_probs, f"must be between 0 and {MAX_TOP_LOG_PROBS}")
        if not 0 <= self.min_length <= self.max_tokens:
            raise InvalidRequest("min_length", self.min_length, f"must be between 0 and max_tokens ({self.max_tokens})")
        if self.end_id is not None and not -1 <= self.end_id < vocab_size:
            raise InvalidRequest("end_id", self.end_id, f"must be -1 (no EOS stop) or a token id below {vocab_size}")
        if self.temperature < 0:
            raise InvalidRequest("temperature", self.temperature, "must be >= 0 (0 means greedy)")
        if not 0 <= self.top_k <= vocab_size:
            raise InvalidRequest("top_k", self.top_k, f"must be between 0 (off) and the vocabulary size {vocab_size}")
        if not 0 < self.top_p <= 1:
            raise InvalidRequest("top_p", self.top_p, "must be in (0, 1]")
        for name in ("top_p_decay", "top_p_bound"):
            if not 0 <= getattr(self, name) <= 1:
                raise InvalidRequest(name, getattr(self, name), "must be between 0 (off) and 1")
        if self.repetition_penalty <= 0:
            raise InvalidRequest("repetition_penalty", self.repetition_penalty, "must be > 0 (1 means off)")
        if self.seed is not None and not 0 <= self.seed <= MAX_SEED:
            raise InvalidRequest("seed", self.seed, "must be an unsigned 64-bit integer")
        kind, guide = self.guided_decoding_guide_type, self.guided_decoding_guide
        if kind and kind not in GUIDE_TYPES:
            raise InvalidRequest("guided_decoding_guide_type", kind[:32], f"must be one of {', '.join(GUIDE_TYPES)}")
        if guide and not kind:
            raise InvalidRequest("guided_decoding_guide", guide[:32], "needs guided_decoding_guide_type")
        if kind not in ("", "json") and not guide:
            raise InvalidRequest("guided_decoding_guide", "", f"is required with guided_decoding_guide_type {kind!r}")
        if len(guide) > MAX_GUIDE_CHARS:
            raise InvalidRequest("guided_decoding_guide", f"<{len(guide)} characters>",
                                 f"at most {MAX_GUIDE_CHARS} characters")
        for name, (most, longest) in WORD_LISTS.items():
            words = getattr(self, name)
            if len(words) > most:
                raise InvalidRequest(name, f"<{len(words)} words>", f"at most {most} words")
            for word in words:
                if not 0 < len(word) <= longest:
                    raise InvalidRequest(name, word[:32], f"each word must have 1 to {longest} characters")


def text(value, field: str) -> str:
    """A string tensor's value as text; it must be UTF-8."""
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidRequest(field, value[:32], "must be valid UTF-8") from None
    return str(value)


def words(values, field: str) -> tuple[str, ...]:
    """One row's string-list tensor as text; every entry must be UTF-8."""
    return tuple(text(value, field) for value in values)


def from_tensors(values: dict, upper: bool = False) -> SamplingParams:
    """Build ``SamplingParams`` from one row's values (``None`` or absent means: use the default).

    Scalars are numpy scalars, word lists 1-D arrays of bytes. ``upper`` reads megatron_gpt's internal
    names (MAX_TOKENS ...) instead of the ensemble's.
    """
    kwargs = {}
    for name in WORD_LISTS:
        key = name.upper() if upper else name
        if values.get(key) is not None:
            kwargs[name] = words(values[key], key)
    for name, spec in SCALARS.items():
        key = name.upper() if upper else name
        value = values.get(key)
        if value is None:
            if spec.required:
                raise InvalidRequest(key, None, "is required")
            continue
        if spec.dtype is np.object_:
            kwargs[name] = text(value, key)
        else:
            kwargs[name] = bool(value) if spec.dtype is np.bool_ else (float(value) if spec.dtype is np.float32
                                                                       else int(value))
    return SamplingParams(**kwargs)
