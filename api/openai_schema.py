"""OpenAI's request bodies (completions, chat), strict: a wrong JSON type or an unknown field is a 400 naming it.

Fields the server cannot honour yet are declared so that they are refused by name (``unsupported``), never
silently ignored.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from .structured import Guided
from .text import Text
from .tool_calls import Tool, ToolChoice

MAX_SEED = 2**64 - 1
Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False


class _Sampling(_Strict, Guided):
    """What both endpoints share: OpenAI's sampling fields, structured outputs and vLLM's extras."""

    model: str
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    n: Annotated[int, Field(ge=1, le=16)] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Text | Annotated[list[Text], Field(max_length=64)] | None = None
    seed: Annotated[int, Field(ge=0, le=MAX_SEED)] | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    user: str | None = None  # accepted for compatibility; the server keeps no per-user state
    # vLLM's extras
    top_k: Annotated[int, Field(ge=-1)] | None = None  # -1 or 0: off
    min_tokens: Annotated[int, Field(ge=0)] = 0
    repetition_penalty: Annotated[float, Field(gt=0.0)] | None = None
    ignore_eos: bool = False
    bad_words: Annotated[list[Text], Field(max_length=256)] | None = None
    # refused by name unless left at their neutral value
    logit_bias: dict[str, float] | None = None


class CompletionRequest(_Sampling):
    prompt: Text | Annotated[list[Text], Field(min_length=1, max_length=128)] | list[int] | list[list[int]]
    max_tokens: Annotated[int, Field(ge=0)] | None = 16
    echo: bool = False
    logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    best_of: int | None = None
    suffix: str | None = None
    # vLLM's field; here: special-token texts in the prompt are read as those tokens (else they stay text).
    add_special_tokens: bool = False


class TextPart(_Strict):
    type: Literal["text"]
    text: Text


class CalledFunction(_Strict):
    name: Text
    arguments: Text


class ToolCall(_Strict):
    id: str
    type: Literal["function"]
    function: CalledFunction


class Message(_Strict):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: Text | list[TextPart] | None = None  # None only beside an assistant's tool_calls
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant's earlier calls
    tool_call_id: Text | None = None  # a tool message answers this call


class ChatRequest(_Sampling):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    # Special-token texts in the rendered messages read as those tokens; default: when the template is the
    # model's own (CHAT_TEMPLATE or the tokenizer's), not the built-in one.
    add_special_tokens: bool | None = None
    tools: Annotated[list[Tool], Field(max_length=128)] | None = None
    tool_choice: ToolChoice | None = None  # default: "auto" with tools, "none" without
    parallel_tool_calls: bool = True


def unsupported(request: _Sampling) -> str | None:
    """The first field set to something this server cannot do yet (its name), or None."""
    neutral = {"logit_bias": (None, {}), "best_of": (None, 1), "suffix": (None,)}
    for name, allowed in neutral.items():
        if name in type(request).model_fields and getattr(request, name) not in allowed:
            return name
    return None
