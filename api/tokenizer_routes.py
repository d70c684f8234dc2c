"""vLLM's tokenizer endpoints, with the server's own sentencepiece model: clients need no tokenizer of their own.

The ensemble encodes a prompt without special tokens, so ``add_special_tokens`` changes nothing here: the ids
returned are exactly those the model sees.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Request
from pydantic import Field

from .errors import ApiError
from .openai_schema import Message, Text, _Strict

router = APIRouter()


class TokenizeRequest(_Strict):
    model: str | None = None
    prompt: Text | None = None
    messages: Annotated[list[Message], Field(min_length=1)] | None = None
    add_special_tokens: bool = True
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
    text = body.prompt
    if body.messages is not None:
        messages = [{"role": m.role, "content": m.content if isinstance(m.content, str)
                     else "".join(p.text for p in m.content)} for m in body.messages]
        try:
            text = state.template.render(messages, body.add_generation_prompt)
        except ValueError as err:
            raise ApiError(400, str(err), "messages") from None
    tokens = state.tokenizer.encode(text)
    return {"count": len(tokens), "max_model_len": state.settings.context, "tokens": tokens, "token_strs": None}


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, request: Request):
    state = request.app.state
    _check_model(body.model, state)
    vocab = state.tokenizer.vocab_size
    bad = next((t for t in body.tokens if not 0 <= t < vocab), None)
    if bad is not None:
        raise ApiError(400, f"token id {bad} is outside the vocabulary (0 .. {vocab - 1})", "tokens")
    return {"prompt": state.tokenizer.decode(body.tokens)}


@router.get("/tokenizer_info")
async def tokenizer_info(request: Request):
    state = request.app.state
    sp = state.tokenizer.sp
    piece = (lambda i: sp.id_to_piece(i) if i >= 0 else None)  # noqa: E731
    return {"tokenizer_class": "SentencePieceTokenizer", "vocab_size": state.tokenizer.vocab_size,
            "eos_token": piece(sp.eos_id()), "bos_token": piece(sp.bos_id()), "pad_token": piece(sp.pad_id()),
            "unk_token": piece(sp.unk_id()), "chat_template": state.template.source,
            "max_model_len": state.settings.context, "model_max_length": state.settings.context}
