"""One request's progress and the rules it must meet: shared by the engine (rank 0) and the serving process.

No torch here: the serving process (``frontend.py``) imports this module to validate requests and to mirror
the engine's generations (``engine_link.py``).
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable

from preprocessing.detokenize import TextTracker
from preprocessing.params import InvalidRequest, SamplingParams


class EngineBusy(RuntimeError):
    """The waiting queue is full or the server is shutting down; the client should retry later."""


@dataclasses.dataclass
class Generation:
    """One request's progress; ``wait()`` returns once it has finished or failed."""

    prompt: list[int]
    params: SamplingParams
    tokens: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[float] = dataclasses.field(default_factory=list)
    # Scoring and alternatives, when asked (``return_prompt_log_probs``, ``top_log_probs``): the log-prob of
    # each prompt token after the first, and the (ids, log-probs) of the most likely tokens at each prompt
    # position after the first and at each generated position.
    prompt_logprobs: list[float] = dataclasses.field(default_factory=list)
    prompt_top: list[tuple[list[int], list[float]]] = dataclasses.field(default_factory=list)
    top: list[tuple[list[int], list[float]]] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None  # "stop", "length" or "cancelled"
    error: str | None = None
    submitted: float = dataclasses.field(default_factory=time.monotonic)
    first_token_at: float | None = None
    finished_at: float | None = None
    tracker: TextTracker | None = None  # text so far, when stop words or streaming need it
    listener: Callable[[Generation], None] | None = None  # called on every change (see the owner's docs)
    cancelled: bool = False  # set by ``cancel``; the engine retires it before its next step
    guide: object = None  # its compiled grammar (``grammar.Guide``), when it asks for structured output
    _done: threading.Event = dataclasses.field(default_factory=threading.Event, repr=False)

    def _notify(self) -> None:
        if self.listener is not None:
            self.listener(self)

    def wait(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)

    @property
    def done(self) -> bool:
        return self._done.is_set()


def new_generation(prompt, params: SamplingParams, tokenizer, listener=None, track_text: bool = False,
                   kind: type[Generation] = Generation) -> Generation:
    """A fresh generation, with a text tracker when stop words or streaming need one."""
    generation = kind(prompt=list(prompt), params=params, listener=listener)
    if params.stop_words or track_text:
        generation.tracker = TextTracker(tokenizer, generation.prompt, params.stop_words)
    return generation


def validate(prompt: list[int], params: SamplingParams, vocab_size: int, context: int, tokenizer) -> None:
    """Every rule a request must meet before it may reach the model (raises ``InvalidRequest``)."""
    params.check(vocab_size, len(prompt), context)
    if (params.stop_words or params.bad_words) and tokenizer is None:
        raise InvalidRequest("stop_words" if params.stop_words else "bad_words", "...",
                             "needs the tokenizer, which this engine was not given")
    bad = next((t for t in prompt if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise InvalidRequest("INPUT_IDS", bad, f"token ids must be in [0, {vocab_size})")
