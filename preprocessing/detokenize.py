"""Incremental detokenization: stop words matched on text, and the text that is safe to stream.

It runs where a generation's text is followed: in rank 0's engine (stop words end a generation there) and in the
serving process, which mirrors each generation and builds the streams' deltas.

Stop words are matched on the *generated* text, so a stop word that ends inside a token (or spans several)
still stops generation. While streaming, text is held back while it could still turn out to be the start
of a stop word, or ends in an incomplete UTF-8 sequence (byte-fallback pieces), so that the deltas sent
concatenate to exactly the unary text.
"""

from __future__ import annotations

from .tokenization import Tokenizer

REPLACEMENT = "\ufffd"  # what sentencepiece decodes an incomplete UTF-8 byte sequence to


class TextTracker:
    """Follows one sequence's generated text token by token, in time independent of its length.

    Text up to the last token that ended on a complete character is final; each new token only decodes the
    tokens after it (with a few tokens of context), and stop words are only searched where a new match can be.
    """

    def __init__(self, tokenizer: Tokenizer, prompt: list[int], stop_words: tuple[str, ...] = ()):
        self.tokenizer, self.prompt, self.stop_words = tokenizer, prompt, stop_words
        self.ids: list[int] = []
        self.text = ""
        self.stop_at: int | None = None  # character offset of the stop word, once one appeared
        self._settled, self._settled_text = 0, ""  # tokens (and their text) that can no longer change
        self._longest_stop = max((len(w) for w in stop_words), default=0)

    def add(self, token: int) -> bool:
        """Append a token; True when the generated text now contains a stop word."""
        self.ids.append(token)
        changed_from = min(len(self.text), len(self._settled_text))  # earlier text cannot change
        context = (self.prompt + self.ids[: self._settled])[-8:] if self._settled < 8 else \
            self.ids[self._settled - 8 : self._settled]
        tail = self.tokenizer.decode_continuation(context, self.ids[self._settled :])
        self.text = self._settled_text + tail
        if not tail.endswith(REPLACEMENT):
            self._settled, self._settled_text = len(self.ids), self.text
        if self.stop_words and self.stop_at is None:
            start = max(0, changed_from - self._longest_stop)
            hits = [i for i in (self.text.find(w, start) for w in self.stop_words) if i >= 0]
            if hits:
                self.stop_at = min(hits)
        return self.stop_at is not None

    @property
    def final_text(self) -> str:
        return self.text if self.stop_at is None else self.text[: self.stop_at]

    def stable_length(self, finished: bool) -> int:
        """Characters of the text that can no longer change or turn into a stop word."""
        if finished or self.stop_at is not None:
            return len(self.final_text)
        end = len(self.text.rstrip(REPLACEMENT))
        held = 0
        for word in self.stop_words:  # hold back the longest suffix that is a proper prefix of a stop word
            for size in range(min(len(word) - 1, end), held, -1):
                if self.text[end - size : end] == word[:size]:
                    held = size
                    break
        return end - held
