"""Log-probs with their tokens' text, for the scoring outputs (DESIGN.md "Scoring and alternatives").

The engine records ids and values (rank 0); here, in the serving process, they get the text of each token as
it reads in place (its leading space included, from the tokens before it), and travel to postprocessing as
one JSON string per request (``SCORES``), empty when nothing was asked: PyTriton cannot send the zero-size
tensors that requests without log-probs would need, and the values' shapes vary per request.
"""

from __future__ import annotations

import json

from triton_backend.engine.generation import Generation

KEYS = ("output_tokens", "output_ids", "output_top", "prompt_tokens", "prompt_ids", "prompt_log_probs", "prompt_top")


def asked(params) -> bool:
    return bool(params.return_log_probs or params.return_prompt_log_probs or params.top_log_probs)


def scores(g: Generation, tokenizer, start: int = 0, prompt: bool = True) -> dict:
    """The texts and alternatives of generated positions ``start``.. and, with ``prompt``, of the prompt."""
    p = g.params
    if not asked(p):
        return {}
    ids = g.prompt + g.tokens

    def text(position: int, token: int) -> str:
        """``token`` read at ``position``, after the tokens before it."""
        return tokenizer.decode_continuation(ids[:position], [token])

    n = len(g.prompt)
    out = {"output_tokens": [text(n + i, ids[n + i]) for i in range(start, len(g.tokens))],
           "output_ids": g.tokens[start:]}
    if p.top_log_probs:
        out["output_top"] = [[[text(n + i, t) for t in top_ids], values]
                             for i, (top_ids, values) in enumerate(g.top[start:], start)]
    if prompt and p.return_prompt_log_probs:
        out["prompt_tokens"] = [text(i, ids[i]) for i in range(n)]
        out["prompt_ids"] = list(g.prompt)
        out["prompt_log_probs"] = list(g.prompt_logprobs)
        if p.top_log_probs:  # position q's alternatives are for prompt token q + 1
            out["prompt_top"] = [[[text(q + 1, t) for t in top_ids], values]
                                 for q, (top_ids, values) in enumerate(g.prompt_top)]
    return out


def merge(a: dict, b: dict) -> dict:
    """Two streamed responses' scores as one (the later positions after the earlier)."""
    return {key: a.get(key, []) + b.get(key, []) for key in KEYS if key in a or key in b}


def encode(values: dict) -> bytes:
    return json.dumps(values, ensure_ascii=False).encode("utf-8") if values else b""
