"""``PUT /api``: Megatron-LM's text generation server, its fields, defaults, order of checks and messages.

Megatron answers most of its validation errors with HTTP 200 and a bare string; here every one is a 400 with
``{"message": ...}``, which Megatron's own CLI reads. The prompts of one request are generated together, each
as its own ensemble request; the text returned is the prompt followed by what was generated.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from . import fanout
from .errors import MEGATRON_FIELDS, ApiError
from .triton import TritonError

router = APIRouter()
MAX_PROMPTS = 128


class MegatronError(ApiError):
    def __init__(self, message: str):
        super().__init__(400, message)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _flag(body: dict, name: str, default: bool = False) -> bool:
    value = body.get(name, default)
    if not isinstance(value, bool):
        raise MegatronError(f"{name} must be a boolean value")
    return value


def parse(body) -> tuple[list[str], dict]:
    """The prompts and the ensemble inputs of a ``PUT /api`` body, checked in Megatron's order."""
    if not isinstance(body, dict) or "prompts" not in body:
        raise MegatronError("prompts argument required")
    if "max_len" in body:
        raise MegatronError("max_len is no longer used.  Replace with tokens_to_generate")
    if "sentences" in body:
        raise MegatronError("sentences is no longer used.  Replace with prompts")
    if "beam_width" in body:
        raise MegatronError("Beam search is no longer supported.")
    prompts = body["prompts"]
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise MegatronError("prompts is not a list of strings")
    if not prompts:
        raise MegatronError("prompts is empty")
    if not all(_utf8(p) for p in prompts):
        raise MegatronError("prompts must be valid Unicode text (one holds a lone surrogate)")
    if len(prompts) > MAX_PROMPTS:
        raise MegatronError(f"Maximum number of prompts is {MAX_PROMPTS}")
    tokens = body.get("tokens_to_generate", 64)
    if not _is_int(tokens):
        raise MegatronError("tokens_to_generate must be an integer greater than 0")
    if tokens < 0:
        raise MegatronError("tokens_to_generate must be an integer greater than or equal to 0")
    logprobs = _flag(body, "logprobs")
    if tokens == 0 and not logprobs:
        raise MegatronError("tokens_to_generate=0 implies logprobs should be True")
    temperature = body.get("temperature", 1.0)
    if not _is_number(temperature) or not 0.0 < temperature <= 100.0:
        raise MegatronError("temperature must be a positive number less than or equal to 100.0")
    top_k = body.get("top_k", 0)
    if not _is_int(top_k) or not 0 <= top_k <= 1000:
        raise MegatronError("top_k must be equal to or greater than 0 and less than or equal to 1000")
    top_p = body.get("top_p", 0.0)
    if not isinstance(top_p, float) or not 0.0 <= top_p <= 1.0:  # Megatron refuses an integer here too
        raise MegatronError("top_p must be a positive float less than or equal to 1.0")
    if top_p > 0.0 and top_k > 0:
        raise MegatronError("cannot set both top-k and top-p samplings.")
    decay = {}
    for name in ("top_p_decay", "top_p_bound"):
        value = decay[name] = body.get(name, 0.0)
        if not isinstance(value, float) or not 0.0 <= value <= 1.0:
            raise MegatronError(f"{name} must be a positive float less than or equal to 1.0")
        if value and top_p == 0.0:
            raise MegatronError(f"{name} cannot be set without top_p")
    add_bos = _flag(body, "add_BOS")
    if any(not p for p in prompts) and not add_bos:
        raise MegatronError("Empty prompts require add_BOS=true")
    stop_on_double_eol, stop_on_eol = _flag(body, "stop_on_double_eol"), _flag(body, "stop_on_eol")
    no_newline_after_colon = _flag(body, "prevent_newline_after_colon")
    seed = body.get("random_seed", -1)
    if not _is_int(seed):
        raise MegatronError("random_seed must be integer")
    if seed < -1 or seed >= 2**64:
        raise MegatronError("random_seed must be a positive integer")
    _flag(body, "no_log")
    stop = "\n\n" if stop_on_double_eol else "\n" if stop_on_eol else None
    # Log-probs are always asked for the generated tokens: their texts make the response's segments.
    params = {"max_tokens": tokens, "temperature": float(temperature), "top_k": top_k,
              "return_log_probs": True, "return_prompt_log_probs": logprobs,
              "top_p": top_p if top_p > 0.0 else None, "seed": None if seed == -1 else seed,
              "top_p_decay": decay["top_p_decay"] or None, "top_p_bound": decay["top_p_bound"] or None,
              "add_bos": add_bos or None, "exclude_input_in_output": False,
              # Megatron bans the newline token right after the colon token: a two-token bad word
              "bad_words": [":\n"] if no_newline_after_colon else None,
              # Megatron: with a stop on newlines, the end-of-document token no longer ends a generation
              "stop_words": [stop] if stop else None, "end_id": -1 if stop else None}
    return prompts, params


@router.put("/api")
async def generate(request: Request):
    try:
        body = await request.json()
    except ValueError:
        raise MegatronError("the request body is not JSON") from None
    prompts, params = parse(body)
    link = request.app.state.link
    try:
        outputs = await fanout.while_connected(request, fanout.gather(link.generate(prompt, params)
                                                                      for prompt in prompts))
    except TritonError as err:
        raise ApiError.from_triton(err, MEGATRON_FIELDS) from None
    except fanout.ClientGone:
        return Response(status_code=499)
    stop = (params["stop_words"] or [""])[0]
    # Megatron keeps the newline that stopped a generation; the ensemble leaves a stop word out.
    texts = [out.text + (stop if stop and out.finish_reason == "stop" else "") for out in outputs]
    tokenizer = request.app.state.tokenizer
    bos = [tokenizer.eos_id] if params["add_bos"] else []  # what preprocessing puts first with add_bos
    prompt_ids = [out.prompt_ids or bos + tokenizer.encode(prompt) for prompt, out in zip(prompts, outputs)]
    segments = [(out.prompt_texts or _pieces(tokenizer, ids)) + out.tokens for ids, out in zip(prompt_ids, outputs)]
    logprobs = [out.prompt_log_probs + out.log_probs for out in outputs] if params["return_prompt_log_probs"] else None
    tokens = [ids + out.token_ids for ids, out in zip(prompt_ids, outputs)]
    return JSONResponse({"text": texts, "segments": segments, "logprobs": logprobs, "tokens": tokens})


def _pieces(tokenizer, ids: list[int]) -> list[str]:
    """The text of each prompt token as the model reads it (what the ensemble returns as prompt_tokens)."""
    return [tokenizer.decode_continuation(ids[:i], [ids[i]]) for i in range(len(ids))]
