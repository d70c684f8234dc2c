"""vLLM's tokenizer endpoints, with the server's own tokenizer: clients need no tokenizer of their own.

The ids returned are exactly those the model sees for the same text on the completions and chat routes:
Megatron's ids for the checkpoint's tokenizer type (BOS included where that type adds one). ``add_special_tokens``
says whether special-token texts are read as those tokens, with the same defaults as those routes: no for a
prompt, yes for messages rendered by a template written for the model.
"""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Request
from pydantic import Field

from .chat_template import message_dicts
from .errors import ApiError
from .openai_schema import Message, Text, _Strict

router = APIRouter()


class TokenizeRequest(_Strict):
    model: str | None = None
    prompt: Text | None = None
    messages: Annotated[list[Message], Field(min_length=1)] | None = None
    add_special_tokens: bool | None = None
    add_generation_prompt: bool = True


class DetokenizeRequest(_Strict):
    model: str | None = None
    tokens: list[int]


def _check_model(name: str | None, state) -> None:
    if name is not None and name != state.settings.model_name:
        raise ApiError(404, f"the model '{name}' does not exist; this server serves '{state.settings.model_name}'",
                       "model", "model_not_found")


@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, request: Request):
    state = request.app.state
    _check_model(body.model, state)
    if (body.prompt is None) == (body.messages is None):
        raise ApiError(400, "send either 'prompt' or 'messages'", "prompt")
    text, special = body.prompt, bool(body.add_special_tokens)
    if body.messages is not None:
        special = state.template.writes_special_tokens if body.add_special_tokens is None else special
        try:
            text = state.template.render(message_dicts(body.messages), body.add_generation_prompt)
        except ValueError as err:
            raise ApiError(400, str(err), "messages") from None
    tokens = await asyncio.to_thread(state.tokenizer.encode, text, special)  # off the event loop
    return {"count": len(tokens), "max_model_len": state.settings.context, "tokens": tokens, "token_strs": None}


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, request: Request):
    state = request.app.state
    _check_model(body.model, state)
    vocab = state.tokenizer.vocab_size
    bad = next((t for t in body.tokens if not 0 <= t < vocab), None)
    if bad is not None:
        raise ApiError(400, f"token id {bad} is outside the vocabulary (0 .. {vocab - 1})", "tokens")
    return {"prompt": state.tokenizer.decode(body.tokens, skip_special=False)}


@router.get("/tokenizer_info")
async def tokenizer_info(request: Request):
    state = request.app.state
    return {**state.tokenizer.info(), "chat_template": state.template.source,
            "max_model_len": state.settings.context, "model_max_length": state.settings.context}
