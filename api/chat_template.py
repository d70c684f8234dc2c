"""Chat messages to one prompt, by a Jinja template: ``CHAT_TEMPLATE`` (a file), else the tokenizer's own
(a HuggingFace tokenizer's ``chat_template``), else the default below.

The default suits a model trained without a chat format (the demo model): one ``role: content`` line per
message (``role (name): content`` when the message has a ``name``), then ``assistant:`` for the model to
continue. With tools, a first ``system:`` line lists them and asks for Hermes-style calls
(``<tool_call>{"name": ..., "arguments": ...}</tool_call>``, as ``tool_calls.py`` reads them), and an
assistant's earlier calls are written that way. A template receives what HuggingFace templates receive:
``messages`` (role, content, name, tool_calls, tool_call_id), ``tools``, ``add_generation_prompt``,
``bos_token``, ``eos_token`` and ``raise_exception``.
"""

from __future__ import annotations

import json
import pathlib

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

DEFAULT_TEMPLATE = (
    "{% if tools %}system: tools {% for tool in tools %}{{ tool.function | tojson }} {% endfor %}"
    "(call one as <tool_call>{\"name\": ..., \"arguments\": ...}</tool_call>)\n{% endif %}"
    "{% for message in messages %}{{ message.role }}{% if message.name %} ({{ message.name }}){% endif %}: "
    "{% for call in message.tool_calls or [] %}<tool_call>{{ {'name': call.function.name, "
    "'arguments': call.function.arguments} | tojson }}</tool_call>{% endfor %}"
    "{{ message.content or '' }}\n{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
)


class TemplateRefusal(TemplateError):
    """A template's ``raise_exception(message)``: the messages break the template's own rule."""


def _raise_exception(message: str):
    raise TemplateRefusal(message)


class ChatTemplate:
    def __init__(self, path: pathlib.Path | None = None, tokenizer=None):
        own = getattr(tokenizer, "chat_template", None)
        self.source = path.read_text() if path else (own or DEFAULT_TEMPLATE)
        # A template written for the model writes its control tokens (<|eot_id|>, [INST], ...) as text.
        self.writes_special_tokens = self.source != DEFAULT_TEMPLATE
        self._tokens = {"bos_token": "", "eos_token": ""}
        if tokenizer is not None:
            self._tokens = {"bos_token": tokenizer.token_text(tokenizer.bos_id) or "",
                            "eos_token": tokenizer.token_text(tokenizer.eos_id) or ""}
        # Sandboxed: a template is configuration, but it should not reach the server's Python.
        env = ImmutableSandboxedEnvironment(keep_trailing_newline=True, trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise_exception
        self._template = env.from_string(self.source)

    def render(self, messages: list[dict], add_generation_prompt: bool = True, tools: list[dict] | None = None) -> str:
        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         tools=tools, **self._tokens)
        except TemplateError as err:  # a template that rejects these messages (raise_exception in HF templates)
            raise ValueError(f"the chat template refused the messages: {err}") from None


def message_dicts(messages) -> list[dict]:
    """The request's messages as templates take them: role, content (text parts joined), and name, tool_calls
    (arguments decoded, as HuggingFace templates expect them) and tool_call_id when given."""
    out = []
    for m in messages:
        content = m.content if isinstance(m.content, str) or m.content is None else \
            "".join(part.text for part in m.content)
        message = {"role": m.role, "content": content}
        if m.name is not None:
            message["name"] = m.name
        if m.tool_calls:
            message["tool_calls"] = [{"id": c.id, "type": c.type, "function": {
                "name": c.function.name, "arguments": _decoded(c.function.arguments)}} for c in m.tool_calls]
        if m.tool_call_id is not None:
            message["tool_call_id"] = m.tool_call_id
        out.append(message)
    return out


def _decoded(arguments: str):
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments
