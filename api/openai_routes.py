"""``/v1/completions`` and ``/v1/chat/completions``: OpenAI's shapes onto the ensembles, one request per choice."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from . import fanout, logprobs, structured, tool_calls
from .chat_template import message_dicts
from .errors import OPENAI_FIELDS, ApiError
from .openai_schema import MAX_SEED, ChatRequest, CompletionRequest, unsupported
from .triton import Output, TritonError

router = APIRouter()


@router.post("/v1/completions")
@router.post("/completions", include_in_schema=False)
async def completions(body: CompletionRequest, request: Request):
    state = request.app.state
    _check_common(body, state)
    # Token ids are checked against the tokenizer, off the event loop; a text needs nothing.
    prompts = [body.prompt] if isinstance(body.prompt, str) else await asyncio.to_thread(_texts, body.prompt,
                                                                                          state.tokenizer)
    ids_given = not isinstance(body.prompt, str) and bool(body.prompt) and not isinstance(body.prompt[0], str)
    scoring = body.echo and body.logprobs is not None  # the prompt's own log-probs: how harnesses score text
    if body.max_tokens == 0 and not scoring:
        raise ApiError(400, "max_tokens may be 0 only with echo and logprobs (scoring the prompt)", "max_tokens")
    # Token ids travel as text with their special tokens written out, read back as those tokens.
    special = bool(body.add_special_tokens or ids_given)
    rooms = None
    if body.max_tokens is None:  # null: up to the context, for each prompt
        lengths = await _off_loop(sum(map(len, prompts)),
                                  lambda: [len(state.tokenizer.encode(p, special)) for p in prompts])
        rooms = [state.settings.context - n for n in lengths]
        if min(rooms) < 1:
            raise ApiError(400, f"a prompt takes {max(lengths)} tokens, the model's whole context is "
                                f"{state.settings.context}", "prompt")
    params = _params(body, body.max_tokens)
    params["add_special_tokens"] = special or None
    if body.logprobs is not None:
        params |= {"return_log_probs": True, "top_log_probs": body.logprobs, "return_prompt_log_probs": scoring}
    if body.echo:
        params["exclude_input_in_output"] = False
    fields = {**OPENAI_FIELDS, **_guided(params, structured.guide(body))}
    shape = _Shape("cmpl", "text_completion", state.settings.model_name, chat=False)
    return await _respond(request, prompts, params, body, shape, fields, rooms, state.settings.max_queue)


@router.post("/v1/chat/completions")
@router.post("/chat/completions", include_in_schema=False)
async def chat_completions(body: ChatRequest, request: Request):
    state = request.app.state
    _check_common(body, state)
    if body.max_tokens is not None and body.max_completion_tokens is not None:
        raise ApiError(400, "set max_completion_tokens or max_tokens, not both", "max_tokens")
    if body.top_logprobs is not None and not body.logprobs:
        raise ApiError(400, "top_logprobs needs logprobs: true", "top_logprobs")
    guide, answer = tool_calls.for_request(body, state.template.source)
    offered = [t.model_dump(exclude_none=True) for t in body.tools] if body.tools and answer else None
    try:
        prompt = state.template.render(message_dicts(body.messages), tools=offered)
    except ValueError as err:
        raise ApiError(400, str(err), "messages") from None
    # A template written for the model (CHAT_TEMPLATE, the tokenizer's own) writes its control tokens as text.
    special = state.template.writes_special_tokens if body.add_special_tokens is None else body.add_special_tokens
    prompt_tokens = len(await _off_loop(len(prompt), lambda: state.tokenizer.encode(prompt, special)))
    room = state.settings.context - prompt_tokens
    if room < 1:
        raise ApiError(400, f"the messages take {prompt_tokens} tokens, the model's whole context is "
                            f"{state.settings.context}", "messages")
    max_tokens = body.max_completion_tokens or body.max_tokens or room
    fields = {**OPENAI_FIELDS, "text_input": "messages",
              "max_tokens": "max_completion_tokens" if body.max_completion_tokens else "max_tokens"}
    shape = _Shape("chatcmpl", "chat.completion", state.settings.model_name, chat=True)
    params = _params(body, max_tokens)
    params["add_special_tokens"] = special or None
    if body.logprobs:
        params |= {"return_log_probs": True, "top_log_probs": body.top_logprobs or 0}
    fields |= _guided(params, guide)
    return await _respond(request, [prompt], params, body, shape, fields, max_queue=state.settings.max_queue,
                          answer=answer)


def _guided(params: dict, guide: tuple[str, str, str] | None) -> dict:
    """Put the request's guide into ``params``; the field names its errors should carry."""
    if guide is None:
        return {}
    params["guided_decoding_guide_type"], params["guided_decoding_guide"], source = guide
    return structured.fields(source)


# Characters of text tokenized on the event loop itself: a thread hop costs more than tokenizing this much, and
# at 16 streams the hops (``asyncio.to_thread``'s submit and worker) were 10-16 % of this process's samples
# (py-spy under tools/bench_api.py). A long prompt takes milliseconds: off the loop, which serves every other
# request.
INLINE_CHARS = 4096


async def _off_loop(chars: int, work):
    """``work()``, on the event loop when it reads under ``INLINE_CHARS`` characters, else on a worker thread."""
    return work() if chars < INLINE_CHARS else await asyncio.to_thread(work)


def _texts(prompt, tokenizer) -> list[str]:
    """The prompts as text. Token ids (one list, or a list of lists) are taken when they are exactly what the
    server's tokenizer makes of their text, since the ensembles take text: ids that encode differently (a
    split no tokenizer run would give) would silently become another prompt."""
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise ApiError(400, "'prompt' must not be an empty list", "prompt")
    if isinstance(prompt[0], str):
        return list(prompt)
    lists = [prompt] if isinstance(prompt[0], int) else prompt
    if not 1 <= len(lists) <= 128:
        raise ApiError(400, "'prompt': 1 to 128 token-id lists", "prompt")
    texts = []
    for ids in lists:
        bad = next((t for t in ids if not 0 <= t < tokenizer.vocab_size), None)
        if not ids or bad is not None:
            raise ApiError(400, f"'prompt': token ids must be non-empty lists of ids in [0, {tokenizer.vocab_size})"
                                f"{'' if bad is None else f', got {bad}'}", "prompt")
        text = tokenizer.decode(ids, skip_special=False)
        if tokenizer.encode(text, parse_special=True) != list(ids):
            raise ApiError(400, "'prompt': these token ids are not how this server's tokenizer writes their text "
                                "(send the text, or ids from /tokenize)", "prompt")
        texts.append(text)
    return texts


def _check_common(body, state) -> None:
    if body.model != state.settings.model_name:
        raise ApiError(404, f"the model '{body.model}' does not exist; this server serves "
                            f"'{state.settings.model_name}'", "model", "model_not_found")
    name = unsupported(body)
    if name:
        raise ApiError(400, f"'{name}' is not supported by this server", name)


def _params(body, max_tokens: int) -> dict:
    """The ensemble's inputs for these sampling fields (None: the ensemble's default)."""
    stop = [body.stop] if isinstance(body.stop, str) else body.stop
    return {
        "max_tokens": max_tokens,
        "temperature": 1.0 if body.temperature is None else body.temperature,  # OpenAI's default, not greedy
        "top_p": body.top_p,
        "top_k": None if body.top_k in (None, -1) else body.top_k,
        "presence_penalty": body.presence_penalty,
        "frequency_penalty": body.frequency_penalty,
        "repetition_penalty": body.repetition_penalty,
        "min_length": body.min_tokens or None,
        "end_id": -1 if body.ignore_eos else None,
        "seed": body.seed,
        "stop_words": stop or None,
        "bad_words": body.bad_words or None,
    }


class _Shape:
    """How one endpoint's responses and chunks look."""

    def __init__(self, prefix: str, kind: str, model: str, chat: bool):
        self.id, self.kind, self.model, self.chat = f"{prefix}-{uuid.uuid4().hex}", kind, model, chat
        self.created = int(time.time())

    def envelope(self, choices: list, usage: dict | None, chunk: bool = False) -> dict:
        out = {"id": self.id, "object": self.kind + (".chunk" if chunk and self.chat else ""),
               "created": self.created, "model": self.model, "choices": choices}
        if usage is not None or not chunk:
            out["usage"] = usage
        return out

    def choice(self, index: int, text: str | None, finish_reason: str | None, delta: bool = False,
               scores: dict | None = None, calls: list[dict] | None = None) -> dict:
        if not self.chat:
            return {"index": index, "text": text, "logprobs": scores, "finish_reason": finish_reason}
        message = {"role": "assistant", "content": text} if not delta else ({"content": text} if text else {})
        if calls:
            message["tool_calls"] = calls
        return {"index": index, "delta" if delta else "message": message, "logprobs": scores,
                "finish_reason": finish_reason}

    def scores(self, out: Output, body, offset: int, first: bool) -> tuple[dict | None, int]:
        """This response's log-probs in the endpoint's shape (None when not asked) and the text offset after
        it (completions count offsets into the text returned, the echoed prompt included)."""
        if not (body.logprobs if self.chat else body.logprobs is not None):
            return None, offset
        if self.chat:
            return logprobs.chat(out), offset
        return logprobs.completion(out, offset, prompt=first and body.echo)


def _requests(prompts: list[str], params: dict, n: int, max_tokens: list[int] | None = None):
    """One ensemble request per choice: prompt i's choices are n*i .. n*i+n-1, seeded seed, seed+1, ...
    (``max_tokens``: each prompt's own, where the request left it to the context)."""
    out = []
    for i, prompt in enumerate(prompts):
        for j in range(n):
            seed = params["seed"]
            own = {**params, "seed": None if seed is None else (seed + j) % (MAX_SEED + 1)}
            if max_tokens is not None:
                own["max_tokens"] = max_tokens[i]
            out.append((i * n + j, prompt, own))
    return out


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


async def _respond(request: Request, prompts, params, body, shape: _Shape, fields: dict,
                   max_tokens: list[int] | None = None, max_queue: int | None = None,
                   answer: tool_calls.Answer | None = None):
    link = request.app.state.link
    if max_queue is not None and len(prompts) * body.n > max_queue:  # refused whole, before any of it runs
        raise ApiError(400, f"{len(prompts)} prompts x n={body.n} make {len(prompts) * body.n} generations, more "
                            f"than the server queues at once ({max_queue})", "n" if body.n > 1 else "prompt")
    requests = _requests(prompts, params, body.n, max_tokens)
    if body.stream:
        return await _stream(link, requests, body, shape, fields, answer)
    try:  # when one choice fails, or the client leaves, the others are cancelled (their streams with them)
        outputs = await fanout.while_connected(request, fanout.gather(link.generate(prompt, p)
                                                                      for _, prompt, p in requests))
    except TritonError as err:
        raise ApiError.from_triton(err, fields) from None
    except fanout.ClientGone:
        return Response(status_code=499)  # nobody reads it: nginx's "client closed request"
    choices = []
    for (index, _, _), out in zip(requests, outputs):
        text, calls, reason = answer.final(out.text, out.finish_reason) if answer else (out.text, [], out.finish_reason)
        choices.append(shape.choice(index, text, reason, scores=shape.scores(out, body, 0, True)[0], calls=calls))
    # Each prompt counts once however many choices it has, as OpenAI counts it.
    prompt_tokens = sum(out.prompt_tokens for (index, _, _), out in zip(requests, outputs) if index % body.n == 0)
    return JSONResponse(shape.envelope(choices, _usage(prompt_tokens, sum(o.completion_tokens for o in outputs))))


async def _stream(link, requests, body, shape: _Shape, fields: dict, answer: tool_calls.Answer | None = None):
    """Server-sent events. Each request's first response is awaited before answering, so a request Triton
    refuses gets its 400 rather than a stream that carries an error; its siblings are cancelled then (a stream
    still waiting for its first response is stopped before it is closed)."""
    streams = [link.stream(prompt, p) for _, prompt, p in requests]
    try:
        firsts = await fanout.gather(anext(s) for s in streams)
    except BaseException as err:
        await asyncio.gather(*(s.aclose() for s in streams), return_exceptions=True)
        if isinstance(err, TritonError):
            raise ApiError.from_triton(err, fields) from None
        raise
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    events = _events(streams, firsts, [index for index, _, _ in requests], body, shape, include_usage, answer)
    return StreamingResponse(events, media_type="text/event-stream")


async def _merged(streams, firsts: list[Output]) -> AsyncIterator[tuple[int, Output | TritonError]]:
    """``(k, response or error)`` of every stream in the order they come. One stream (the common case) is read
    directly; several are pumped by a task each into one queue. Closing this generator stops the tasks."""
    if len(streams) == 1:  # no task and no queue: two event-loop hops less per token
        yield 0, firsts[0]
        if not firsts[0].finish_reason:
            try:
                async for out in streams[0]:
                    yield 0, out
            except TritonError as err:
                yield 0, err
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(k: int) -> None:
        try:
            await queue.put((k, firsts[k]))
            if not firsts[k].finish_reason:
                async for out in streams[k]:
                    await queue.put((k, out))
        except TritonError as err:
            await queue.put((k, err))
        finally:
            await queue.put((k, None))

    tasks = [asyncio.create_task(pump(k)) for k in range(len(streams))]
    try:
        open_streams = len(streams)
        while open_streams:
            k, item = await queue.get()
            if item is None:
                open_streams -= 1
            else:
                yield k, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _events(streams, firsts: list[Output], indexes: list[int], body, shape: _Shape,
                  include_usage: bool, answer: tool_calls.Answer | None = None) -> AsyncIterator[str]:
    prompt_tokens, completion = [0] * len(streams), [0] * len(streams)
    readers = [answer.stream() for _ in streams] if answer else None
    offsets, started = [0] * len(streams), [False] * len(streams)
    merged = _merged(streams, firsts)
    try:
        if shape.chat:  # OpenAI's first chat chunk names the role
            for index in indexes:
                yield _sse(shape.envelope([{"index": index, "delta": {"role": "assistant", "content": ""},
                                            "logprobs": None, "finish_reason": None}], None, chunk=True))
        async for k, item in merged:
            if isinstance(item, TritonError):  # the call failed: its other choices stop too (closing ``merged``)
                error = ApiError.from_triton(item, {})
                yield _sse({"error": {"message": error.message, "type": error.kind,
                                      "param": error.param, "code": error.code}})
                break
            prompt_tokens[k], completion[k] = item.prompt_tokens, item.completion_tokens
            scores, offsets[k] = shape.scores(item, body, offsets[k], not started[k])
            started[k] = True
            text, calls, reason = item.text, [], item.finish_reason or None
            if readers:
                text, calls, reason = readers[k].feed(item.text, reason)
            if text or calls or reason or item.tokens or item.prompt_texts:
                choice = shape.choice(indexes[k], text, reason, delta=True, scores=scores, calls=calls)
                yield _sse(shape.envelope([choice], None, chunk=True))
        if include_usage:
            prompts = sum(t for k, t in enumerate(prompt_tokens) if indexes[k] % body.n == 0)
            yield _sse(shape.envelope([], _usage(prompts, sum(completion)), chunk=True))
        yield "data: [DONE]\n\n"
    finally:
        await merged.aclose()
        await asyncio.gather(*(s.aclose() for s in streams), return_exceptions=True)


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"
