"""Structured outputs: grammars compiled once per text, a matcher per sequence, the tokens each step allows.

The grammar engine is llguidance (docs/structured-outputs.md says why over xgrammar: a 3 MB wheel with no
dependencies against xgrammar's ``transformers`` and ``triton``, 1 GB installed, and its masks filled as fast).
A guide (its type and text, ``SamplingParams.guided_decoding_guide_type`` / ``guided_decoding_guide``) compiles
on the thread that submits the request, never the engine's, and the compiled matcher is cached by that text: a
request takes a copy of it in its start state. Before each token the matcher's mask keeps the tokens the grammar
allows (``apply_guides``, the masks filled during the forward pass by ``prefetch``); the token chosen advances it
(``Guide.accept``); the sequence ends with ``stop`` when the grammar is complete.
"""

from __future__ import annotations

import collections
import concurrent.futures
import json
import os
import threading

import numpy as np
import torch

from preprocessing.params import InvalidRequest

GUIDE_TYPE = "guided_decoding_guide_type"
GUIDE = "guided_decoding_guide"
CACHED_GRAMMARS = 256  # compiled guides kept, least recently used dropped first
# JSON as ``json.dumps`` writes it: no free whitespace (a small model could spend its whole budget on blanks,
# as vLLM's ``disable_any_whitespace`` also guards against), ", " and ": " between items. A schema's own
# ``x-guidance`` options override these.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def grammar_text(kind: str, guide: str) -> str:
    """llguidance's grammar for a guide of type ``kind`` (raises ``InvalidRequest`` naming the tensor that is
    wrong and why). ``ebnf_grammar`` takes GBNF (``::=`` rules, as llama.cpp and xgrammar write them) or Lark."""
    import llguidance

    def bad(field: str, value: str, rule: str) -> InvalidRequest:
        return InvalidRequest(field, value[:64], rule)

    if kind == "json":  # any JSON object or array (TensorRT-LLM's ``json``: xgrammar's built-in JSON grammar)
        return llguidance.LLMatcher.grammar_from_json_schema({"type": ["object", "array"]}, JSON_OPTIONS)
    if kind == "json_schema":
        try:
            schema = json.loads(guide)
        except ValueError as err:
            raise bad(GUIDE, guide, f"must be a JSON schema: {err}") from None
        except RecursionError:
            raise bad(GUIDE, guide, "is nested too deeply") from None
        if not isinstance(schema, (dict, bool)):
            raise bad(GUIDE, guide, "must be a JSON schema (an object)")
        try:
            return llguidance.LLMatcher.grammar_from_json_schema(_closed(schema), JSON_OPTIONS)
        except ValueError as err:
            raise bad(GUIDE, guide, f"is not a usable JSON schema: {err}") from None
        except RecursionError:
            raise bad(GUIDE, guide, "is nested too deeply") from None
    if kind == "regex":
        return llguidance.LLMatcher.grammar_from_regex(guide)
    if kind == "choice":
        try:
            choices = json.loads(guide)
        except ValueError as err:
            raise bad(GUIDE, guide, f"must be a JSON list of strings: {err}") from None
        if not isinstance(choices, list) or not choices or not all(isinstance(c, str) and c for c in choices):
            raise bad(GUIDE, guide, "must be a JSON list of one or more non-empty strings")
        # One regular expression, which the lexer compiles to an automaton: as Lark alternatives, a few thousand
        # choices would pass the parser's limit on a rule's branches (2,000).
        return llguidance.LLMatcher.grammar_from_regex("(" + "|".join(map(_literal, dict.fromkeys(choices))) + ")")
    if kind == "ebnf_grammar":
        if "::=" in guide:
            from llguidance.gbnf_to_lark import gbnf_to_lark

            try:
                guide = gbnf_to_lark(guide)
            except Exception as err:  # noqa: BLE001 - the converter raises its own and plain errors
                raise bad(GUIDE, guide, f"is not a valid GBNF grammar: {err}") from None
        return llguidance.LLMatcher.grammar_from_lark(guide)
    raise bad(GUIDE_TYPE, kind, "must be one of json, json_schema, regex, ebnf_grammar, choice")


def _reason(message: str, most: int = 400) -> str:
    """llguidance's error without the parser state and grammar it appends (kilobytes of them)."""
    first = message.strip().split("\n<state>", 1)[0].split("\n<grammar>", 1)[0].strip()
    return first if len(first) <= most else first[:most] + "..."


_SUBSCHEMA = ("items", "additionalProperties", "not", "if", "then", "else", "contains", "propertyNames",
              "unevaluatedItems")  # keywords whose value is a schema
_SUBSCHEMAS = ("anyOf", "oneOf", "allOf", "prefixItems")  # ... a list of schemas
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")  # ... name -> schema


def _closed(schema):
    """``schema`` with ``additionalProperties: false`` on every object that lists its properties and says nothing
    of others: xgrammar's strict mode, which vLLM and TensorRT-LLM use by default. Without it a small model
    may add properties until its budget runs out."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    for key in _SUBSCHEMA:
        if key in out:
            out[key] = _closed(out[key]) if not isinstance(out[key], list) else [_closed(s) for s in out[key]]
    for key in _SUBSCHEMAS:
        if isinstance(out.get(key), list):
            out[key] = [_closed(s) for s in out[key]]
    for key in _SCHEMA_MAPS:
        if isinstance(out.get(key), dict):
            out[key] = {name: _closed(s) for name, s in out[key].items()}
    if "properties" in out and "additionalProperties" not in out and "unevaluatedProperties" not in out:
        out["additionalProperties"] = False
    return out


_REGEX_META = frozenset("\\.+*?()|[]{}^$#&-~")  # what llguidance's (Rust) regex syntax reads as syntax


def _literal(text: str) -> str:
    """``text`` as a regular expression that matches it alone."""
    return "".join("\\" + c if c in _REGEX_META else c for c in text)


class Grammars:
    """The grammar engine's view of the tokenizer, and the compiled guides by their text (thread-safe).

    ``tokenizer`` is the serving tokenizer (``preprocessing.tokenization``) or a function returning it: the
    last pipeline stage builds it only when it first meets a guided sequence."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        self._lock = threading.Lock()
        self._ll = None
        self._compiled: collections.OrderedDict[tuple[str, str], object] = collections.OrderedDict()
        self.compiled = self.hits = 0  # guides compiled, and found compiled

    def _lltokenizer(self):
        with self._lock:
            if self._ll is None:
                import llguidance

                tokenizer = self._tokenizer if hasattr(self._tokenizer, "encode") else self._tokenizer()
                try:
                    vocabulary = _Vocabulary(tokenizer)
                except NotImplementedError as err:
                    raise InvalidRequest(GUIDE_TYPE, "", f"cannot be served: {err}") from None
                # the tokenizer's ids are the logits columns sampling reads (Megatron's padding is cut off)
                self._ll = llguidance.LLTokenizer(vocabulary, n_vocab=tokenizer.vocab_size)
            return self._ll

    def has(self, kind: str, text: str) -> bool:
        """Whether this guide is compiled already (a ``guide`` call then only copies it)."""
        with self._lock:
            return (kind, text) in self._compiled

    def guide(self, kind: str, text: str) -> Guide:
        """A fresh matcher for this guide, compiled now or copied from the cache (raises ``InvalidRequest``)."""
        import llguidance

        key = (kind, text)
        with self._lock:
            template = self._compiled.get(key)
            if template is not None:
                self._compiled.move_to_end(key)
                self.hits += 1
        if template is None:
            grammar = grammar_text(kind, text)
            ll = self._lltokenizer()
            error = llguidance.LLMatcher.validate_grammar(grammar, ll)  # llguidance's default parser limits
            template = None if error else llguidance.LLMatcher(ll, grammar, log_level=0)
            if template is None or template.is_error():
                raise InvalidRequest(GUIDE, text[:64], f"does not compile as {kind}: "
                                                       f"{_reason(error or template.get_error())}")
            with self._lock:
                self._compiled[key] = template
                self.compiled += 1
                while len(self._compiled) > CACHED_GRAMMARS:
                    self._compiled.popitem(last=False)
        return Guide(kind, text, self._ll.eos_token, template.deep_copy())

    def rebuild(self, guide: Guide, tokens: list[int]) -> None:
        """Give a guide that travelled without its matcher (to the pipeline's last stage) its own, advanced by
        the tokens its sequence already has."""
        guide.matcher = self.guide(guide.kind, guide.text).matcher
        for token in tokens:
            guide.accept(token)


class Guide:
    """One sequence's grammar state. It travels with its ``RowSampler`` to the pipeline's last stage without its
    matcher (which cannot be pickled); ``Grammars.rebuild`` gives it one there."""

    def __init__(self, kind: str, text: str, eos: int, matcher=None):
        self.kind, self.text, self.eos, self.matcher = kind, text, eos, matcher
        self.accepted = 0  # tokens the matcher has taken
        self.pending = None  # (future, row, accepted): its next mask, being filled (``prefetch``)

    def __getstate__(self):
        return {**self.__dict__, "matcher": None, "pending": None}

    def accept(self, token: int) -> None:
        self.matcher.consume_token(token)  # a token it refuses leaves it in its error state (``error``)
        self.accepted += 1

    def complete(self) -> bool:
        """The grammar can take nothing more: the sequence ends here (``stop``)."""
        return self.matcher.is_stopped() and not self.matcher.is_error()

    def error(self) -> InvalidRequest | None:
        """Why the matcher cannot go on (a limit of the parser reached, a token it refused), if it cannot: the
        client's guide is at fault, so it is reported as a broken rule (HTTP 400), naming it."""
        if not self.matcher.is_error():
            return None
        return InvalidRequest(GUIDE, self.text[:64], f"the {self.kind} could not go on after {self.accepted} "
                                                     f"tokens: {_reason(self.matcher.get_error())}")


_executor = None  # llguidance's threads that fill the masks of a step's rows at once (GIL released)
_prefetcher: concurrent.futures.ThreadPoolExecutor | None = None


def _fill(guides: list[Guide], words: int) -> torch.Tensor:
    """The bit masks of ``guides``' next tokens, one row each (llguidance's threads, the GIL released)."""
    import llguidance
    from llguidance.torch import fill_next_token_bitmask_par

    global _executor
    if _executor is None:
        # Half the cores this process may use, at most 8: on 2 cores one thread (two ran the batch's steps 10 %
        # slower, beside the forward pass).
        _executor = llguidance.LLExecutor(num_threads=min(8, max(1, len(os.sched_getaffinity(0)) // 2)))
    bitmask = torch.empty(len(guides), words, dtype=torch.int32)
    fill_next_token_bitmask_par(_executor, [(g.matcher, i) for i, g in enumerate(guides)], bitmask)
    return bitmask


def prefetch(guides: list[Guide], vocab: int) -> None:
    """Start filling these guides' next masks on a worker thread, while the step's forward pass runs: on CUDA the
    host is free while the GPU works, and on CPU the forward pass leaves the other cores idle."""
    global _prefetcher
    if not guides:
        return
    if _prefetcher is None:
        _prefetcher = concurrent.futures.ThreadPoolExecutor(1, "guide-masks")
    future = _prefetcher.submit(_fill, list(guides), (vocab + 31) // 32)
    for i, g in enumerate(guides):
        g.pending = (future, i, g.accepted)


def apply_guides(logits: torch.Tensor, rows: list[int], guides: list[Guide], end_ids: list[int]) -> None:
    """Mask ``logits`` rows ``rows`` in place to the tokens each one's guide allows next (its prefetched mask when
    it is still the guide's state, else one filled now). A row may end where its grammar may end: on the
    tokenizer's EOS, and on its own ``end_id`` too when that is another token.

    The bit masks are unpacked by numpy (``unpackbits``) rather than by llguidance's
    ``apply_token_bitmask_inplace``, which is ``torch.compile``d (a compiler on the serving machine, and a
    compilation the first time), and each row is masked in place."""
    vocab = logits.shape[1]
    words = (vocab + 31) // 32
    bitmask = torch.empty(len(guides), words, dtype=torch.int32)
    now = []
    for i, g in enumerate(guides):
        pending, g.pending = g.pending, None
        if pending is not None and pending[2] == g.accepted:
            bitmask[i] = pending[0].result()[pending[1]]
        else:
            now.append(i)
    if now:
        bitmask[now] = _fill([guides[i] for i in now], words)
    for g in guides:
        if g.error():
            raise g.error()
    # little-endian words: bit j of byte b is token 8 b + j
    bits = np.unpackbits(bitmask.numpy().view(np.uint8), axis=1, count=vocab, bitorder="little")
    for i, (g, end_id) in enumerate(zip(guides, end_ids)):
        if 0 <= end_id < vocab and end_id != g.eos:
            bits[i, end_id] = bits[i, g.eos]
    banned = torch.from_numpy(bits == 0).to(logits.device, non_blocking=True)
    for i, row in enumerate(rows):
        logits[row].masked_fill_(banned[i], float("-inf"))


class _Vocabulary:
    """What ``llguidance.LLTokenizer`` reads of a tokenizer: every id's bytes (special tokens marked with the
    0xFF byte llguidance reserves for them, so that no text can spell one), EOS, BOS, and text to ids."""

    def __init__(self, tokenizer):
        pieces = tokenizer.token_bytes()
        pieces += [None] * (tokenizer.vocab_size - len(pieces))
        self.tokens = [b if b is not None else b"\xff<[%d]>" % i for i, b in enumerate(pieces)]
        self.special_token_ids = [i for i, b in enumerate(pieces) if b is None]
        self.eos_token_id, self.bos_token_id = tokenizer.eos_id, tokenizer.bos_id
        self.is_tokenizer_wrapper = True
        self._tokenizer = tokenizer

    def __call__(self, text) -> list[int]:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return self._tokenizer.encode(text, leading=False)
