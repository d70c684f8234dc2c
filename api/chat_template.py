"""Chat messages to one prompt, by a Jinja template: ``CHAT_TEMPLATE`` (a file), else the default below.

The default suits a model trained without a chat format (the demo model): one ``role: content`` line per
message, then ``assistant:`` for the model to continue. A model trained with its own format needs its own
template; it receives ``messages`` (role, content) and ``add_generation_prompt``, as Hugging Face templates do.
"""

from __future__ import annotations

import pathlib

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

DEFAULT_TEMPLATE = (
    "{% for message in messages %}{{ message.role }}: {{ message.content }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


class ChatTemplate:
    def __init__(self, path: pathlib.Path | None = None):
        self.source = path.read_text() if path else DEFAULT_TEMPLATE
        # Sandboxed: a template is configuration, but it should not reach the server's Python.
        self._template = ImmutableSandboxedEnvironment(keep_trailing_newline=True).from_string(self.source)

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt)
        except TemplateError as err:  # a template that rejects these messages (raise_exception in HF templates)
            raise ValueError(f"the chat template refused the messages: {err}") from None
