"""Chat messages to one prompt, by a Jinja template: ``CHAT_TEMPLATE`` (a file), else the tokenizer's own
(a HuggingFace tokenizer's ``chat_template``), else the default below.

The default suits a model trained without a chat format (the demo model): one ``role: content`` line per
message (``role (name): content`` when the message has a ``name``), then ``assistant:`` for the model to
continue. A template receives what HuggingFace templates receive:
``messages`` (role, content), ``add_generation_prompt``, ``bos_token``, ``eos_token`` and ``raise_exception``.
"""

from __future__ import annotations

import pathlib

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

DEFAULT_TEMPLATE = (
    "{% for message in messages %}{{ message.role }}{% if message.name %} ({{ message.name }}){% endif %}: "
    "{{ message.content }}\n{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
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

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         **self._tokens)
        except TemplateError as err:  # a template that rejects these messages (raise_exception in HF templates)
            raise ValueError(f"the chat template refused the messages: {err}") from None


def message_dicts(messages) -> list[dict]:
    """The request's messages as templates take them: role, content (text parts joined), and name when given."""
    out = []
    for m in messages:
        message = {"role": m.role, "content": m.content if isinstance(m.content, str)
                   else "".join(part.text for part in m.content)}
        if m.name is not None:
            message["name"] = m.name
        out.append(message)
    return out
