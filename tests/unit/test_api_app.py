"""The HTTP API's application without Triton: what it does before any request reaches the ensembles."""

import asyncio
import threading

import httpx

from api.app import create_app
from api.chat_template import ChatTemplate, message_dicts
from api.openai_schema import ChatRequest
from api.settings import Settings


class GatedTokenizer:
    """A tokenizer that holds its caller until released (five seconds at most), as a long prompt holds it."""

    def __init__(self, inner):
        self.inner, self.release, self.done = inner, threading.Event(), False

    def encode(self, text, parse_special=False, leading=True):
        self.release.wait(5)
        self.done = True
        return self.inner.encode(text, parse_special, leading)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def app_with(tokenizer):
    return create_app(Settings(triton_grpc="127.0.0.1:1", host="127.0.0.1", port=1, context=256,
                               tokenizer=_spec(tokenizer)))


def _spec(tokenizer) -> str:
    from preprocessing.tokenization import TokenizerSpec

    return TokenizerSpec("GPTSentencePieceTokenizer", {"tokenizer_model": str(tokenizer.path)}).to_json()


def test_tokenizing_leaves_the_event_loop_free(tiny_tokenizer):
    """Another request is answered while one is inside the tokenizer: encoding runs off the event loop."""
    app = app_with(tiny_tokenizer)
    app.state.tokenizer = gated = GatedTokenizer(tiny_tokenizer)

    async def scenario():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
            slow = asyncio.create_task(client.post("/tokenize", json={"prompt": "a long prompt"}))
            await asyncio.sleep(0.05)  # the request reaches its tokenizer
            listed = await client.get("/v1/models")
            tokenizing = not gated.done  # on the event loop, the tokenizer would have had to finish first
            gated.release.set()
            return listed.status_code, tokenizing, (await slow).json()["count"]

    status, tokenizing, count = asyncio.run(scenario())
    assert status == 200 and tokenizing
    assert count == len(tiny_tokenizer.encode("a long prompt"))


def test_a_message_name_reaches_the_template():
    parts = [{"type": "text", "text": "yo"}]
    body = ChatRequest.model_validate({"model": "m", "messages": [
        {"role": "user", "content": "hi", "name": "ada"}, {"role": "user", "content": parts}]})
    messages = message_dicts(body.messages)
    assert messages == [{"role": "user", "content": "hi", "name": "ada"}, {"role": "user", "content": "yo"}]
    assert ChatTemplate().render(messages) == "user (ada): hi\nuser: yo\nassistant:"
