"""Log-probs in OpenAI's two shapes: completions' (parallel lists) and chat's (one object per token)."""

from __future__ import annotations

from .triton import Output


def completion(out: Output, offset: int, prompt: bool) -> tuple[dict, int]:
    """``choices[].logprobs`` of a completion (or of one streamed chunk) and the text offset after it.

    With ``prompt`` (echo), the prompt's tokens come first, the first of them with a null log-prob (nothing
    comes before it), as evaluation harnesses expect when they score a continuation. Each position's
    ``top_logprobs`` holds the asked-for alternatives and the chosen token itself, as vLLM answers.
    """
    tokens: list[str] = []
    values: list[float | None] = []
    tops: list[dict | None] = []
    if prompt and out.prompt_texts:
        tokens += out.prompt_texts
        values += [None, *out.prompt_log_probs]
        tops += [None] + [_with_chosen(out.prompt_top[q] if q < len(out.prompt_top) else [], token, value)
                          for q, (token, value) in enumerate(zip(out.prompt_texts[1:], out.prompt_log_probs))]
    tokens += out.tokens
    values += out.log_probs
    tops += [_with_chosen(out.top[i] if i < len(out.top) else [], token, value)
             for i, (token, value) in enumerate(zip(out.tokens, out.log_probs))]
    offsets = []
    for token in tokens:
        offsets.append(offset)
        offset += len(token)
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}, offset


def chat(out: Output) -> dict:
    """``choices[].logprobs`` of a chat completion (or chunk): ``{"content": [...]}``."""
    content = []
    for i, (token, value) in enumerate(zip(out.tokens, out.log_probs)):
        top = out.top[i] if i < len(out.top) else []
        content.append({**_entry(token, value), "top_logprobs": [_entry(t, v) for t, v in top]})
    return {"content": content}


def _with_chosen(top: list[tuple[str, float]], token: str, value: float) -> dict:
    alternatives = dict(top)
    alternatives.setdefault(token, value)
    return alternatives


def _entry(token: str, value: float) -> dict:
    return {"token": token, "logprob": value, "bytes": list(token.encode("utf-8"))}
