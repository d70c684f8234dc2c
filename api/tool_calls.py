"""Chat ``tools`` and ``tool_choice``: the grammar that forces a call, and the calls read back from the text.

- ``required``: the output is a JSON array of one or more ``{"name": ..., "parameters": {...}}`` objects (vLLM's
  shape; one only when ``parallel_tool_calls`` is false), forced by a JSON schema.
- a named function: the output is that function's arguments, forced by its parameters' schema.
- ``auto``: the model writes text, in which calls are found in the tool-call format of the chat template
  (``FORMATS``): Hermes' ``<tool_call>{...}</tool_call>`` (the default template's, and Qwen's), Mistral's
  ``[TOOL_CALLS][...]``, or Llama 3's bare ``{"name": ..., "parameters": ...}`` message.
- ``none``: the tools are left out of the prompt, and nothing is read as a call.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from . import structured
from .errors import ApiError
from .text import Text

NAME = r"^[A-Za-z0-9_-]{1,64}$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class Function(_Strict):
    name: Annotated[str, Field(pattern=NAME)]
    description: Text | None = None
    parameters: dict | None = None
    strict: bool | None = None


class Tool(_Strict):
    type: Literal["function"]
    function: Function


class NamedFunction(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: NamedFunction


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


def parameters_schema(function: Function) -> dict:
    return function.parameters if function.parameters is not None else {"type": "object"}


def required_schema(tools: list[Tool], parallel: bool) -> dict:
    """One or more calls of the given tools (vLLM's shape for ``tool_choice: required``)."""
    calls = [{"type": "object", "additionalProperties": False, "required": ["name", "parameters"],
              "properties": {"name": {"const": t.function.name}, "parameters": parameters_schema(t.function)}}
             for t in tools]
    schema = {"type": "array", "minItems": 1, "items": calls[0] if len(calls) == 1 else {"anyOf": calls}}
    if not parallel:
        schema["maxItems"] = 1
    return schema


def call(name: str, arguments) -> dict:
    """One ``message.tool_calls`` entry; ``arguments`` is sent as JSON text, as OpenAI sends it."""
    text = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function", "function": {"name": name, "arguments": text}}


def from_required(text: str) -> list[dict] | None:
    """The calls of a ``required`` answer, or None when it is not one (cut short by ``max_tokens``)."""
    try:
        items = json.loads(text)
    except ValueError:
        return None
    return [call(item["name"], item["parameters"]) for item in items]


# --- auto: the calls in free text ------------------------------------------------------------------------------
FORMATS = ("hermes", "mistral", "llama3_json")


def template_format(source: str) -> str:
    """The tool-call format a chat template teaches its model (Hermes' when it says nothing)."""
    if "[TOOL_CALLS]" in source:
        return "mistral"
    if "<tool_call>" in source or "tool_call" not in source and "<|python_tag|>" not in source:
        return "hermes"
    return "llama3_json"


_HERMES = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)


def _calls(payload) -> list[dict] | None:
    """Calls from decoded JSON: one ``{name, arguments | parameters}`` object or a list of them."""
    items = payload if isinstance(payload, list) else [payload]
    out = []
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            return None
        arguments = item.get("arguments", item.get("parameters", {}))
        out.append(call(item["name"], arguments))
    return out or None


def from_text(text: str, fmt: str, names: set[str], strip: bool = True) -> tuple[str | None, list[dict]]:
    """(the content left, the calls) of an ``auto`` answer; a call of a function not offered stays text. The
    content is stripped of the blanks around the calls unless ``strip`` is false (the rest of a stream, whose
    beginning was sent already)."""

    def offered(calls):
        return calls is not None and all(c["function"]["name"] in names for c in calls)

    if fmt == "hermes":
        calls, rest = [], text
        for match in _HERMES.finditer(text):
            try:
                found = _calls(json.loads(match.group(1)))
            except ValueError:
                found = None
            if offered(found):
                calls += found
                rest = rest.replace(match.group(0), "", 1)
        rest = rest.strip() if strip else rest
        return (rest or None) if calls else text, calls
    if fmt == "mistral":
        head, marker, tail = text.partition("[TOOL_CALLS]")
        try:
            found = _calls(json.loads(tail)) if marker else None
        except ValueError:
            found = None
        return ((head.strip() if strip else head) or None, found) if offered(found) else (text, [])
    try:
        found = _calls(json.loads(text))
    except ValueError:
        found = None
    return (None, found) if offered(found) else (text, [])


def for_request(body, template: str) -> tuple[tuple[str, str, str] | None, Answer | None]:
    """The guide a chat request generates under (its own, or the one its ``tool_choice`` forces) and how its
    answer is read for tool calls (None: plain text); raises ``ApiError`` for a choice that cannot be."""
    guide = structured.guide(body)
    choice = body.tool_choice or ("auto" if body.tools else "none")
    if not body.tools:
        if choice != "none":
            raise ApiError(400, "'tool_choice' needs 'tools'", "tool_choice")
        return guide, None
    if choice == "none":
        return guide, None
    if guide is not None:
        raise ApiError(400, f"'{guide[2]}' and tools both constrain the output; with tools, set tool_choice "
                            f"'none' to use '{guide[2]}'", guide[2])
    if choice == "auto":
        return None, Answer("auto", body.tools, template_format(template))
    if choice == "required":
        schema = required_schema(body.tools, body.parallel_tool_calls)
        return ("json_schema", json.dumps(schema), "tools"), Answer("required", body.tools)
    named = next((t for t in body.tools if t.function.name == choice.function.name), None)
    if named is None:
        raise ApiError(400, f"'tool_choice' names '{choice.function.name}', which is not one of the tools",
                       "tool_choice")
    schema = parameters_schema(named.function)
    return ("json_schema", json.dumps(schema), "tools"), Answer("named", body.tools,
                                                                             named=named.function.name)


# --- streaming ----------------------------------------------------------------------------------------------------
class ArgumentsStream:
    """Stream deltas of a forced answer as ``delta.tool_calls``: each call's id and name first, then its arguments
    in fragments as they are generated. ``named``: the whole text is one call's arguments; else the text is the
    ``required`` array, read as it grows (the grammar fixes its layout: ``{"name": "f", "parameters": ...}``)."""

    def __init__(self, named: str | None = None):
        self.named = named
        self.index = -1  # the call being streamed
        self._text = ""
        self._seen = 0  # characters of ``_text`` already read
        self._depth = 0  # brackets open at ``_seen``
        self._string = self._escaped = False
        self._arguments_from = None  # where the current call's arguments begin in ``_text``
        self._sent = 0  # where the arguments sent so far end

    def feed(self, delta: str) -> list[dict]:
        if self.named is not None:
            out = [] if self.index == 0 else [self._open(self.named)]
            return out + ([self._fragment(delta)] if delta else [])
        self._text += delta
        out = []
        for i in range(self._seen, len(self._text)):
            c = self._text[i]
            if self._string:
                self._string = not (c == '"' and not self._escaped)
                self._escaped = c == "\\" and not self._escaped
                continue
            if c == '"':
                self._string = True
            elif c in "[{":
                self._depth += 1
            elif c in "]}":
                self._depth -= 1
                if self._depth == 1 and self._arguments_from is not None:  # the call object closed
                    out += self._arguments(i)
                    self._arguments_from = None
            if self._arguments_from is None and self._depth == 2 and self._text.endswith('"parameters": ', 0, i + 1):
                head = json.loads(self._text[self._text.rindex("{", 0, i):i + 1].removesuffix(', "parameters": ')
                                  + "}")
                out.append(self._open(head["name"]))
                self._arguments_from = self._sent = i + 1
        self._seen = len(self._text)
        if self._arguments_from is not None:
            out += self._arguments(len(self._text))
        return out

    def _arguments(self, end: int) -> list[dict]:
        piece, self._sent = self._text[self._sent:end], max(end, self._sent)
        return [self._fragment(piece)] if piece else []

    def _open(self, name: str) -> dict:
        self.index += 1
        opened = call(name, "")
        return {"index": self.index, **opened}

    def _fragment(self, text: str) -> dict:
        return {"index": self.index, "function": {"arguments": text}}


class Answer:
    """What one chat request with tools does with its text: ``final`` for a whole answer, ``stream`` (one per
    choice) for its deltas. ``mode``: "required", "named" or "auto"."""

    def __init__(self, mode: str, tools: list[Tool], fmt: str = "hermes", named: str | None = None):
        self.mode, self.fmt, self.named = mode, fmt, named
        self.names = {t.function.name for t in tools}

    def final(self, text: str, finish_reason: str) -> tuple[str | None, list[dict], str]:
        """(content, tool calls, finish_reason) of a whole answer. A forced answer cut short by ``max_tokens``
        is no call: its text comes back as content, with ``length``."""
        if self.mode != "auto":
            calls = None if finish_reason != "stop" else (
                [call(self.named, text)] if self.mode == "named" else from_required(text))
            return (None, calls, "tool_calls") if calls else (text, [], finish_reason)
        content, calls = from_text(text, self.fmt, self.names)
        return (content, calls, "tool_calls") if calls else (text, [], finish_reason)

    def stream(self) -> AnswerStream:
        return AnswerStream(self)


class AnswerStream:
    """One choice's deltas as ``(content, tool call deltas)``. Forced answers stream their calls as they grow
    (``ArgumentsStream``); ``auto`` streams text until what could begin a call, holds the rest and reads the calls
    from it when the answer ends."""

    MARKERS = {"hermes": "<tool_call>", "mistral": "[TOOL_CALLS]"}

    def __init__(self, answer: Answer):
        self.answer = answer
        self.forced = ArgumentsStream(answer.named if answer.mode == "named" else None) \
            if answer.mode != "auto" else None
        self.text = ""
        self.sent = 0  # characters of ``text`` sent as content
        self.calls = False  # whether tool calls were sent

    def feed(self, delta: str, finish_reason: str | None) -> tuple[str, list[dict], str | None]:
        """(content, tool call deltas, finish_reason) for this delta of the answer."""
        self.text += delta
        if self.forced is not None:
            out = self.forced.feed(delta)
            self.calls = self.calls or bool(out)
            reason = "tool_calls" if finish_reason == "stop" and self.calls else finish_reason
            return "", out, reason
        if not finish_reason:
            hold = self._held_from()
            content, self.sent = self.text[self.sent:hold], max(self.sent, hold)
            return content, [], None
        rest, self.sent = self.text[self.sent:], len(self.text)
        content, calls = from_text(rest, self.answer.fmt, self.answer.names, strip=False)
        if not calls:
            return rest, [], finish_reason
        deltas = []
        for index, c in enumerate(calls):
            deltas.append({"index": index, "id": c["id"], "type": "function",
                           "function": {"name": c["function"]["name"], "arguments": ""}})
            deltas.append({"index": index, "function": {"arguments": c["function"]["arguments"]}})
        return content or "", deltas, "tool_calls"

    def _held_from(self) -> int:
        """Where the text that may be (the start of) a call begins: nothing from there is sent before the end."""
        if self.answer.fmt == "llama3_json":
            return self.sent if self.text.lstrip().startswith("{") or not self.text.strip() else len(self.text)
        marker = self.MARKERS[self.answer.fmt]
        found = self.text.find(marker, self.sent)
        if found >= 0:
            return found
        for keep in range(min(len(marker) - 1, len(self.text)), 0, -1):  # a marker's beginning at the end
            if marker.startswith(self.text[-keep:]):
                return len(self.text) - keep
        return len(self.text)
