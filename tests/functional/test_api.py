"""The HTTP API against the real server, through the clients users have: the `openai` package (sync, async,
streaming), Megatron's CLI protocol (`PUT /api`) and vLLM's tokenizer endpoints; every answer checked against
the ensemble's own for the same request."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time

import openai
import pytest
import requests

from client import GenerationClient
from tools.ports import free_ports

from .conftest import ROOT

PROMPT = "The for statement is used to"
MODEL = "megatron-gpt"


@pytest.fixture(scope="module")
def api(server):
    return openai.OpenAI(base_url=f"http://{server.api}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def ensemble(server):
    with GenerationClient(server.grpc, "grpc") as c:
        yield c


def test_completions_give_the_ensembles_text_and_counts(api, ensemble):
    prompts = [PROMPT, "A class definition"]
    r = api.completions.create(model=MODEL, prompt=prompts, max_tokens=12, temperature=0)
    expected = [ensemble.generate(p, max_tokens=12, temperature=0.0) for p in prompts]
    assert [c.index for c in r.choices] == [0, 1]
    assert [c.text for c in r.choices] == [e.text for e in expected]
    assert [c.finish_reason for c in r.choices] == [e.finish_reason for e in expected]
    assert r.usage.prompt_tokens == sum(e.num_input_tokens for e in expected)
    assert r.usage.completion_tokens == sum(e.num_output_tokens for e in expected)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.object == "text_completion" and r.model == MODEL and r.id.startswith("cmpl-")


def test_sampling_fields_reach_the_ensemble(api, ensemble):
    """Seeded sampling with every field set: the same text as the ensemble's for the same inputs, and n
    choices seeded seed, seed + 1, ..."""
    fields = dict(temperature=0.9, top_p=0.95, seed=11)
    extra = dict(top_k=40, repetition_penalty=1.1, min_tokens=3, ignore_eos=True)
    r = api.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, n=2, presence_penalty=0.5,
                               frequency_penalty=0.25, stop=["zzz"], extra_body=extra, **fields)
    same = dict(temperature=0.9, top_p=0.95, top_k=40, repetition_penalty=1.1, min_length=3, end_id=-1,
                presence_penalty=0.5, frequency_penalty=0.25, stop_words=["zzz"])
    expected = [ensemble.generate(PROMPT, max_tokens=8, seed=11 + j, **same).text for j in range(2)]
    assert [c.text for c in r.choices] == expected
    assert expected[0] != expected[1]


def test_token_id_prompts_are_the_texts_they_encode(api, server):
    ids = requests.post(f"http://{server.api}/tokenize", json={"prompt": PROMPT}, timeout=30).json()["tokens"]
    as_text = api.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0)
    as_ids = api.completions.create(model=MODEL, prompt=ids, max_tokens=6, temperature=0)
    both = api.completions.create(model=MODEL, prompt=[ids, ids], max_tokens=6, temperature=0)
    assert as_ids.choices[0].text == as_text.choices[0].text == both.choices[1].text
    assert as_ids.usage.prompt_tokens == len(ids)
    pieces = requests.post(f"http://{server.api}/tokenize", json={"prompt": "ab"}, timeout=30).json()["tokens"]
    split = [i for piece in ("a", "b") for i in requests.post(
        f"http://{server.api}/tokenize", json={"prompt": piece}, timeout=30).json()["tokens"]]
    assert split != pieces, "the demo tokenizer should write 'ab' as one piece for this test to mean anything"
    with pytest.raises(openai.BadRequestError, match="tokenizer"):  # refused, not silently re-tokenized
        api.completions.create(model=MODEL, prompt=split, max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="token ids"):
        api.completions.create(model=MODEL, prompt=[10**7], max_tokens=2)


def test_echo_returns_the_prompt_first(api, ensemble):
    r = api.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0, echo=True)
    assert r.choices[0].text == PROMPT + ensemble.generate(PROMPT, max_tokens=6, temperature=0.0).text


def test_a_stream_concatenates_to_the_unary_text(api, server):
    unary = api.completions.create(model=MODEL, prompt=PROMPT, max_tokens=20, temperature=0)
    chunks = list(api.completions.create(model=MODEL, prompt=PROMPT, max_tokens=20, temperature=0, stream=True,
                                         stream_options={"include_usage": True}))
    texts = [c.choices[0].text for c in chunks if c.choices]
    assert len(texts) > 1 and "".join(texts) == unary.choices[0].text
    finals = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finals[-1] == unary.choices[0].finish_reason and not any(finals[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == unary.usage.model_dump()
    # The wire format itself: server-sent events ending in [DONE].
    with requests.post(f"http://{server.api}/v1/completions", stream=True, timeout=60,
                       json={"model": MODEL, "prompt": PROMPT, "max_tokens": 3, "stream": True}) as raw:
        assert raw.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in raw.iter_lines(decode_unicode=True) if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"


def test_chat_renders_the_template_and_streams_the_same_text(api, server):
    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is a class?"}]
    r = api.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=12, temperature=0)
    rendered = "system: Answer briefly.\nuser: What is a class?\nassistant:"
    plain = api.completions.create(model=MODEL, prompt=rendered, max_tokens=12, temperature=0)
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == plain.choices[0].text
    assert r.usage.prompt_tokens == plain.usage.prompt_tokens
    counted = requests.post(f"http://{server.api}/tokenize", json={"messages": messages}, timeout=30).json()
    assert counted["count"] == r.usage.prompt_tokens
    chunks = list(api.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=12,
                                              temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].object == "chat.completion.chunk"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == r.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == r.choices[0].finish_reason


def test_concurrent_async_requests_each_get_their_own_text(server, api):
    prompts = [f"{PROMPT} {word}" for word in ("print", "loop", "class", "def", "import", "return")]
    expected = [api.completions.create(model=MODEL, prompt=p, max_tokens=10, temperature=0).choices[0].text
                for p in prompts]

    async def run():
        client = openai.AsyncOpenAI(base_url=f"http://{server.api}/v1", api_key="unused", max_retries=0)
        async with client:
            replies = await asyncio.gather(*(client.completions.create(model=MODEL, prompt=p, max_tokens=10,
                                                                       temperature=0) for p in prompts))
        return [r.choices[0].text for r in replies]

    assert asyncio.run(run()) == expected


@pytest.mark.parametrize("body, status, param", [
    ({"max_tokens": 5000}, 400, "max_tokens"),
    ({"temperature": -1}, 400, "temperature"),
    ({"temperature": "hot"}, 400, "temperature"),
    ({"best_of": 3}, 400, "best_of"),
    ({"logprobs": 21}, 400, "logprobs"),
    ({"max_tokens": 0}, 400, "max_tokens"),
    ({"logit_bias": {"5": 1.0}}, 400, "logit_bias"),
    ({"no_such_field": 1}, 400, "no_such_field"),
    ({"stop": ["x"] * 65}, 400, "stop"),
    ({"prompt": ""}, 400, "prompt"),
    ({"prompt": []}, 400, "prompt"),
    ({"prompt": [[]]}, 400, "prompt"),
    ({"n": 0}, 400, "n"),
    ({"model": "gpt-4"}, 404, "model"),
])
def test_bad_requests_get_openai_errors_naming_the_field(server, body, status, param):
    reply = requests.post(f"http://{server.api}/v1/completions", timeout=60,
                          json={"model": MODEL, "prompt": PROMPT, "max_tokens": 4, **body})
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert error["param"] == param and param in error["message"] or status == 404
    assert error["type"] == ("not_found_error" if status == 404 else "invalid_request_error")


def test_the_openai_client_raises_the_servers_error(api):
    with pytest.raises(openai.BadRequestError) as caught:
        api.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5000)
    assert caught.value.body["param"] == "max_tokens" and "context" in caught.value.body["message"]
    with pytest.raises(openai.NotFoundError):
        api.chat.completions.create(model="other", messages=[{"role": "user", "content": "hi"}])


def megatron(server, body):
    """As Megatron's text_generation_cli.py sends it."""
    return requests.put(f"http://{server.api}/api", data=json.dumps(body), timeout=120,
                        headers={"Content-Type": "application/json; charset=UTF-8"})


def test_megatron_put_api_returns_prompt_and_generation(server, ensemble):
    reply = megatron(server, {"prompts": [PROMPT, "A class"], "tokens_to_generate": 10, "top_k": 1})
    assert reply.status_code == 200, reply.text
    expected = [p + ensemble.generate(p, max_tokens=10, top_k=1).text for p in (PROMPT, "A class")]
    assert reply.json()["text"] == expected
    seeded = megatron(server, {"prompts": [PROMPT], "tokens_to_generate": 8, "random_seed": 5})
    assert seeded.json()["text"] == [PROMPT + ensemble.generate(PROMPT, max_tokens=8, seed=5).text]


def test_megatron_stop_on_eol_keeps_the_newline_as_megatron_does(server):
    text = megatron(server, {"prompts": ["A"], "tokens_to_generate": 60, "top_k": 1}).json()["text"][0]
    assert "\n" in text[1:], "the greedy continuation should hold a newline for this test to mean anything"
    stopped = megatron(server, {"prompts": ["A"], "tokens_to_generate": 60, "top_k": 1, "stop_on_eol": True})
    cut = text.index("\n", 1) + 1
    assert stopped.json()["text"] == [text[:cut]]


def test_megatron_returns_the_token_ids_of_prompt_and_generation(server):
    reply = megatron(server, {"prompts": [PROMPT, "A class"], "tokens_to_generate": 6, "top_k": 1}).json()
    for prompt, text, tokens in zip([PROMPT, "A class"], reply["text"], reply["tokens"]):
        ids = requests.post(f"http://{server.api}/tokenize", json={"prompt": prompt}, timeout=30).json()["tokens"]
        assert tokens[:len(ids)] == ids and len(tokens) == len(ids) + 6
        assert requests.post(f"http://{server.api}/detokenize", json={"tokens": tokens}, timeout=30).json() == \
            {"prompt": text}


def test_megatron_add_bos_prevent_newline_after_colon_and_top_p_decay(server, ensemble):
    eos = 2  # the demo tokenizer's end-of-document id
    colon, newline = requests.post(f"http://{server.api}/tokenize", json={"prompt": ":\n"}, timeout=30).json()["tokens"]
    plain = megatron(server, {"prompts": ["Note:"], "tokens_to_generate": 6, "top_k": 1}).json()
    assert plain["text"][0].startswith("Note:\n"), "the demo model should follow 'Note:' with a newline"
    body = {"prompts": ["Note:", ""], "tokens_to_generate": 6, "top_k": 1, "add_BOS": True,
            "prevent_newline_after_colon": True}
    reply = megatron(server, body).json()
    for tokens in reply["tokens"]:
        assert tokens[0] == eos
        assert all((a, b) != (colon, newline) for a, b in zip(tokens, tokens[1:])), tokens
    expected = [ensemble.generate(p, max_tokens=6, top_k=1, add_bos=True, bad_words=[":\n"]).text
                for p in ("Note:", "")]
    assert reply["text"] == ["Note:" + expected[0], expected[1]]
    decayed = {"prompts": [PROMPT], "tokens_to_generate": 8, "top_p": 0.9, "top_p_decay": 0.5, "top_p_bound": 0.2,
               "random_seed": 3}
    same = ensemble.generate(PROMPT, max_tokens=8, top_p=0.9, top_p_decay=0.5, top_p_bound=0.2, seed=3).text
    assert megatron(server, decayed).json()["text"] == [PROMPT + same]


@pytest.mark.parametrize("body, message", [
    ({}, "prompts argument required"),
    ({"prompts": "one"}, "prompts is not a list of strings"),
    ({"prompts": []}, "prompts is empty"),
    ({"prompts": ["a"] * 129}, "Maximum number of prompts is 128"),
    ({"prompts": ["a"], "max_len": 5}, "max_len is no longer used.  Replace with tokens_to_generate"),
    ({"prompts": ["a"], "tokens_to_generate": "5"}, "tokens_to_generate must be an integer greater than 0"),
    ({"prompts": ["a"], "tokens_to_generate": -1}, "tokens_to_generate must be an integer greater than or equal to 0"),
    ({"prompts": ["a"], "tokens_to_generate": 0}, "tokens_to_generate=0 implies logprobs should be True"),
    ({"prompts": ["a"], "logprobs": "yes"}, "logprobs must be a boolean value"),
    ({"prompts": ["a"], "temperature": 0}, "temperature must be a positive number less than or equal to 100.0"),
    ({"prompts": ["a"], "top_k": 1001}, "top_k must be equal to or greater than 0 and less than or equal to 1000"),
    ({"prompts": ["a"], "top_p": 1}, "top_p must be a positive float less than or equal to 1.0"),
    ({"prompts": ["a"], "top_p": 0.5, "top_k": 5}, "cannot set both top-k and top-p samplings."),
    ({"prompts": [""]}, "Empty prompts require add_BOS=true"),
    ({"prompts": ["a"], "random_seed": "x"}, "random_seed must be integer"),
    ({"prompts": ["a"], "beam_width": 2}, "Beam search is no longer supported."),
    ({"prompts": ["a"], "tokens_to_generate": 100000}, "tokens_to_generate"),
])
def test_megatron_validation_messages(server, body, message):
    reply = megatron(server, body)
    assert reply.status_code == 400 and message in reply.json()["message"], reply.text


def test_max_tokens_null_means_up_to_the_context(api, server):
    prompts = [PROMPT, "A class"]
    r = api.completions.create(model=MODEL, prompt=prompts, max_tokens=None, temperature=0,
                               extra_body={"ignore_eos": True})
    counts = [requests.post(f"http://{server.api}/tokenize", json={"prompt": p}, timeout=30).json()["count"]
              for p in prompts]
    assert [c.finish_reason for c in r.choices] == ["length", "length"]
    assert r.usage.completion_tokens == sum(256 - n for n in counts)  # each prompt to the end of its context


def test_a_message_name_is_rendered_not_dropped(server):
    base = f"http://{server.api}"
    plain = {"messages": [{"role": "user", "content": "hi"}]}
    named = {"messages": [{"role": "user", "content": "hi", "name": "ada"}]}
    counts = [requests.post(f"{base}/tokenize", json=b, timeout=30).json()["count"] for b in (plain, named)]
    assert counts[1] > counts[0]


def test_tokenizer_endpoints_use_the_servers_tokenizer(server, ensemble):
    base = f"http://{server.api}"
    tokens = requests.post(f"{base}/tokenize", json={"prompt": PROMPT}, timeout=30).json()
    assert tokens["count"] == len(tokens["tokens"]) == ensemble.generate(PROMPT, max_tokens=1).num_input_tokens
    assert requests.post(f"{base}/detokenize", json={"tokens": tokens["tokens"]}, timeout=30).json() == \
        {"prompt": PROMPT}
    info = requests.get(f"{base}/tokenizer_info", timeout=30).json()
    assert info["max_model_len"] == tokens["max_model_len"] > 0 and info["eos_token"]
    bad = requests.post(f"{base}/detokenize", json={"tokens": [10**9]}, timeout=30)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"


def test_health_and_models(server):
    assert requests.get(f"http://{server.api}/health", timeout=30).status_code == 200
    models = requests.get(f"http://{server.api}/v1/models", timeout=30).json()
    assert [m["id"] for m in models["data"]] == [MODEL]
    assert requests.get(f"http://{server.api}/v1/models/other", timeout=30).status_code == 404


def test_an_api_key_guards_every_route_but_health(server):
    """A second API process in front of the same Triton (it is only a gRPC client), with API_KEY set."""
    (port,) = free_ports(1)
    env = {**os.environ, "API_PORT": str(port), "HOST": "127.0.0.1", "API_KEY": "s3cret",
           "TRITON_GRPC_URL": server.grpc, "MEGATRON_TRITON_CONTEXT": "256",
           "TOKENIZER": str(ROOT / "demo_model" / "tokenizer.model")}
    process = subprocess.Popen([sys.executable, "-m", "api"], cwd=ROOT, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if requests.get(f"{base}/health", timeout=5).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            assert time.monotonic() < deadline and process.poll() is None, "the API did not start"
            time.sleep(0.3)
        body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 2}
        refused = requests.post(f"{base}/v1/completions", json=body, timeout=30)
        assert refused.status_code == 401 and refused.json()["error"]["type"] == "authentication_error"
        assert requests.put(f"{base}/api", json={"prompts": ["a"]}, timeout=30).status_code == 401
        assert requests.post(f"{base}/tokenize", json={"prompt": "a"}, timeout=30).status_code == 401
        for path in ("/metrics", "/docs", "/openapi.json", "/v1/models", "/tokenizer_info"):
            assert requests.get(f"{base}{path}", timeout=30).status_code == 401, path
        assert requests.get(f"{base}/metrics", headers={"Authorization": "Bearer s3cret"}, timeout=30).ok
        keyed = openai.OpenAI(base_url=f"{base}/v1", api_key="s3cret", max_retries=0)
        assert keyed.completions.create(**body).choices[0].text
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{base}/v1", api_key="wrong", max_retries=0).completions.create(**body)
    finally:
        process.terminate()
        process.wait(30)


def test_a_refused_stream_cancels_its_siblings_and_answers_400(server):
    """One choice of a streamed fan-out refused (its prompt fills the context): the call gets that 400, and the
    sibling already generating is cancelled in the engine, not left running to its end."""
    from .test_streaming import idle, llm_metrics, settled_metrics, wait_for

    before = settled_metrics(server)["llm_requests_cancelled_total"]
    body = {"model": MODEL, "prompt": [PROMPT, "word " * 400], "max_tokens": 200, "ignore_eos": True,
            "stream": True}  # the second prompt is beyond the 256-token context
    r = requests.post(f"http://{server.api}/v1/completions", json=body, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt", r.text
    assert wait_for(lambda: llm_metrics(server)["llm_requests_cancelled_total"] > before, 10)
    assert idle(settled_metrics(server))


def test_a_fan_out_beyond_the_queue_is_refused_up_front(api):
    with pytest.raises(openai.BadRequestError) as err:
        api.completions.create(model=MODEL, prompt=[PROMPT] * 128, n=16, max_tokens=1)
    assert err.value.body["param"] == "n" and "2048 generations" in err.value.body["message"]


def test_a_client_that_drops_a_stream_frees_its_sequence(server, api):
    """Closing the connection mid-stream cancels the generation in the engine; the server goes on serving."""
    from .test_streaming import idle, settled_metrics

    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 200, "ignore_eos": True, "stream": True}
    for _ in range(3):
        with requests.post(f"http://{server.api}/v1/completions", json=body, stream=True, timeout=60) as raw:
            first = next(line for line in raw.iter_lines() if line)
            assert first.startswith(b"data: {")
    assert idle(settled_metrics(server))
    assert api.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3).choices[0].text is not None


def test_streams_to_triton_are_reused_one_request_at_a_time(server, ensemble):
    """``TritonLink`` keeps a finished request's gRPC stream for the next one: each request gets its own text
    (as the ensemble gives it), a stream left mid-way or ending in an error is cancelled, not kept, and a kept
    stream that ended meanwhile is passed over without the request noticing."""
    from api.triton import TritonError, TritonLink

    greedy = {"max_tokens": 6, "temperature": 0.0}
    prompts = [PROMPT, "A class definition", "The while loop"]
    expected = [ensemble.generate(p, **greedy).text for p in prompts]

    async def text(link, prompt, params=greedy):
        return "".join([out.text async for out in link.stream(prompt, params)])

    async def scenario():
        link = TritonLink(server.grpc, timeout_s=60)
        try:
            texts = [await text(link, p) for p in prompts]
            kept = link._idle[:]
            assert len(kept) == 1  # one stream carried the three requests
            together = await asyncio.gather(*(text(link, p) for p in prompts))  # three at once: three streams
            assert len(link._idle) == 3 and kept[0] in link._idle
            left = link.stream(PROMPT, {"max_tokens": 50, "end_id": -1})
            await anext(left)
            await left.aclose()  # left mid-way: its stream is cancelled, not kept
            assert len(link._idle) == 2
            with pytest.raises(TritonError) as refused:
                await text(link, PROMPT, {"max_tokens": 4, "top_p": 3.0})
            assert refused.value.field == "top_p" and len(link._idle) == 1  # it took one, which was closed
            link._idle[0].close()  # a kept stream that ended meanwhile: the next request opens a new one
            assert not link._idle[0].alive()
            after = await text(link, prompts[0])
            return texts, together, after
        finally:
            await link.close()

    texts, together, after = asyncio.run(scenario())
    assert texts == expected and together == expected and after == expected[0]


def test_a_stream_past_the_link_deadline_is_cancelled(server):
    """``TritonLink``'s deadline (``MAX_REQUEST_S`` in the API) ends a stream that runs past it with an error
    that says so, cancels the generation in the engine and keeps no stream."""
    from api.triton import TritonError, TritonLink

    from .test_streaming import idle, settled_metrics

    async def scenario():
        link = TritonLink(server.grpc, timeout_s=0.3)
        try:
            stream = link.stream(PROMPT, {"max_tokens": 240, "end_id": -1})
            parts = [await anext(stream)]
            await asyncio.sleep(0.6)  # a reader that stalls past the deadline, whatever the machine's speed
            with pytest.raises(TritonError) as late:
                async for out in stream:
                    parts.append(out)
            return parts, late.value, len(link._idle)
        finally:
            await link.close()

    parts, error, kept = asyncio.run(scenario())
    assert parts and not parts[-1].finish_reason  # it was under way
    assert error.status == "DEADLINE_EXCEEDED" and "did not finish within 0.3 s" in error.message and kept == 0
    assert idle(settled_metrics(server))


JSON_VALUES = [None, True, 0, -1, 3.5, 1e300, "", "x" * 5000, "\udcff", [], [1, "a"], {}, {"a": 1}]


def test_fuzzed_bodies_get_a_named_4xx_or_an_answer(server):
    """Every field of both OpenAI endpoints and of PUT /api, set to values of every JSON type: each reply is
    an answer or a 4xx in its protocol's shape (never a 5xx), and the server keeps serving."""
    import random

    rng = random.Random(0)
    completion = {"model": MODEL, "prompt": PROMPT, "max_tokens": 3}
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    megatron_body = {"prompts": [PROMPT], "tokens_to_generate": 3}
    fields = {"/v1/completions": (completion, ["prompt", "max_tokens", "temperature", "top_p", "n", "stop", "seed",
                                               "echo", "logprobs", "stream", "stream_options", "top_k",
                                               "min_tokens", "ignore_eos", "bad_words", "presence_penalty"]),
              "/v1/chat/completions": (chat, ["messages", "max_completion_tokens", "temperature", "stop",
                                              "logprobs", "top_logprobs", "n", "seed", "response_format",
                                              "structured_outputs", "guided_json", "guided_regex", "guided_choice",
                                              "guided_grammar", "tools", "tool_choice", "parallel_tool_calls"]),
              "/api": (megatron_body, ["prompts", "tokens_to_generate", "temperature", "top_k", "top_p",
                                       "random_seed", "stop_on_eol", "add_BOS", "logprobs"])}
    cases = []
    for path, (base, names) in fields.items():
        for name in names:
            for value in rng.sample(JSON_VALUES, 5):
                cases.append((path, {**base, name: value}))
    cases += [("/v1/completions", b"{not json"), ("/v1/completions", b"\xff\xfe\x00"), ("/api", b"[1, 2]"),
              ("/v1/completions", b""), ("/v1/completions", {**completion, "stop": ["a"] * 1000}),
              ("/api", {"prompts": ["a"] * 5000})]
    # structured outputs: malformed, huge and valid guides, malformed tools
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    cases += [("/v1/chat/completions", {**chat, **extra}) for extra in (
        {"guided_json": {"type": "object", "properties": {"a": {"$ref": "#/x"}}}}, {"guided_regex": "[" * 5000},
        {"guided_grammar": "root ::= " + " | ".join(f'"{i}"' for i in range(5000))},
        {"guided_choice": [f"c{i}" for i in range(5000)]}, {"guided_json": "{" * 100_000},
        {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": ["nope"]}}}},
        {"structured_outputs": {"json": {"type": "integer"}, "regex": "a"}},
        {"tools": [tool], "tool_choice": {"type": "function", "function": {"name": "g"}}},
        {"tools": [{**tool, "function": {"name": "bad name!"}}]}, {"tool_choice": "required"},
        {"tools": [tool], "tool_choice": "required", "guided_regex": "a"},
        {"messages": [{"role": "tool", "content": None}]})]
    for path, body in cases:
        data = body if isinstance(body, bytes) else json.dumps(body).encode("utf-8", "surrogatepass")
        method = requests.put if path == "/api" else requests.post
        reply = method(f"http://{server.api}{path}", data=data, timeout=120,
                       headers={"Content-Type": "application/json"})
        assert reply.status_code < 500, (path, body, reply.status_code, reply.text)
        if reply.status_code >= 400:
            shaped = reply.json()["message"] if path == "/api" else reply.json()["error"]["message"]
            assert shaped, (path, body, reply.text)
    assert requests.get(f"http://{server.api}/health", timeout=30).status_code == 200


def ensemble_scores(server, prompt: str, **params) -> dict:
    """The ensemble's own answer over Triton's HTTP generate endpoint (JSON), with the scoring outputs."""
    reply = requests.post(f"http://{server.http}/v2/models/ensemble/generate", timeout=120,
                          json={"text_input": prompt, **params})
    assert reply.status_code == 200, reply.text
    return reply.json()


def test_the_ensemble_scores_prompts_and_lists_alternatives(server):
    full = ensemble_scores(server, PROMPT, max_tokens=5, temperature=0, end_id=-1, return_log_probs=True,
                           return_prompt_log_probs=True, top_log_probs=3)
    n = full["num_input_tokens"]
    assert "".join(full["prompt_tokens"]) == PROMPT and len(full["prompt_tokens"]) == n
    assert "".join(full["output_tokens"]) == full["text_output"] and len(full["output_tokens"]) == 5
    assert len(full["prompt_log_probs"]) == n - 1 and all(v <= 0 for v in full["prompt_log_probs"])
    # greedy: each generated token is its position's most likely one, with the same log-prob
    tops = [full["output_top_tokens"][i * 3:(i + 1) * 3] for i in range(5)]
    values = [full["output_top_log_probs"][i * 3:(i + 1) * 3] for i in range(5)]
    assert [t[0] for t in tops] == full["output_tokens"]
    assert [v[0] for v in values] == pytest.approx(full["output_log_probs"], abs=1e-5)
    assert all(v == sorted(v, reverse=True) for v in values)
    # a prompt token's log-prob is at most its position's best alternative's
    best = full["prompt_top_log_probs"][::3]
    assert len(best) == n - 1 and all(lp <= b + 1e-6 for lp, b in zip(full["prompt_log_probs"], best))
    scored = ensemble_scores(server, PROMPT, max_tokens=0, return_prompt_log_probs=True)
    assert scored["text_output"] == "" and scored["num_output_tokens"] == 0 and scored["finish_reason"] == "length"
    assert scored["prompt_log_probs"] == pytest.approx(full["prompt_log_probs"], abs=1e-5)
    plain = ensemble_scores(server, PROMPT, max_tokens=2)
    assert plain["prompt_log_probs"] == plain["output_tokens"] == plain["output_top_log_probs"] == []
    refused = requests.post(f"http://{server.http}/v2/models/ensemble/generate", timeout=60,
                            json={"text_input": PROMPT, "max_tokens": 2, "top_log_probs": 21})
    assert refused.status_code == 400 and "top_log_probs" in refused.json()["error"]


def test_echo_with_logprobs_scores_the_prompt_as_harnesses_ask(api, server):
    """lm-evaluation-harness's loglikelihood: echo + logprobs + max_tokens 0 (or 1), then the prompt's tokens and
    log-probs (the first null) in the choice; the same values as the ensemble's and as a stream's."""
    expected = ensemble_scores(server, PROMPT, max_tokens=0, return_prompt_log_probs=True)
    r = api.completions.create(model=MODEL, prompt=PROMPT, max_tokens=0, echo=True, logprobs=1)
    lp = r.choices[0].logprobs
    assert r.choices[0].text == PROMPT and lp.tokens == expected["prompt_tokens"]
    assert lp.token_logprobs[0] is None
    assert lp.token_logprobs[1:] == pytest.approx(expected["prompt_log_probs"], abs=1e-5)
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    assert all(token in top for token, top in zip(lp.tokens[1:], lp.top_logprobs[1:]))
    one = api.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, echo=True, logprobs=2, temperature=0)
    streamed = [c.choices[0].logprobs for c in api.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=4, echo=True, logprobs=2, temperature=0, stream=True) if c.choices]
    tokens = [t for chunk in streamed if chunk for t in chunk.tokens]
    values = [v for chunk in streamed if chunk for v in chunk.token_logprobs]
    offsets = [o for chunk in streamed if chunk for o in chunk.text_offset]
    assert tokens == one.choices[0].logprobs.tokens and offsets == one.choices[0].logprobs.text_offset
    assert values[0] is None and values[1:] == pytest.approx(one.choices[0].logprobs.token_logprobs[1:], abs=1e-5)
    assert "".join(tokens) == one.choices[0].text


def test_chat_logprobs_follow_openais_shape(api):
    messages = [{"role": "user", "content": "What is a class?"}]
    r = api.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, temperature=0, logprobs=True,
                                    top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert "".join(c.token for c in content) == r.choices[0].message.content and len(content) == 4
    for c in content:
        assert [t.token for t in c.top_logprobs][0] == c.token and c.top_logprobs[0].logprob == c.logprob
        assert bytes(c.bytes) == c.token.encode() and len(c.top_logprobs) == 2
    plain = api.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, temperature=0)
    assert plain.choices[0].logprobs is None
    with pytest.raises(openai.BadRequestError):
        api.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, top_logprobs=2)


def test_megatron_scores_with_tokens_to_generate_0(server):
    scored = megatron(server, {"prompts": [PROMPT, "A class"], "tokens_to_generate": 0, "logprobs": True}).json()
    assert scored["text"] == [PROMPT, "A class"]
    assert ["".join(s) for s in scored["segments"]] == scored["text"]
    expected = ensemble_scores(server, PROMPT, max_tokens=0, return_prompt_log_probs=True)["prompt_log_probs"]
    assert scored["logprobs"][0] == pytest.approx(expected, abs=1e-5)
    assert [len(lp) for lp in scored["logprobs"]] == [len(s) - 1 for s in scored["segments"]]
    generated = megatron(server, {"prompts": [PROMPT], "tokens_to_generate": 4, "top_k": 1, "logprobs": True}).json()
    assert "".join(generated["segments"][0]) == generated["text"][0]
    assert len(generated["logprobs"][0]) == len(generated["segments"][0]) - 1
    assert generated["logprobs"][0][:len(expected)] == pytest.approx(expected, abs=1e-5)


def test_the_api_counts_its_requests_on_its_own_metrics(server):
    def count(route: str, status: str) -> float:
        text = requests.get(f"http://{server.api}/metrics", timeout=30).text
        line = f'api_requests_total{{route="{route}",status="{status}"}} '
        return next((float(x[len(line):]) for x in text.splitlines() if x.startswith(line)), 0.0)

    ok, bad, megatron_bad = count("/v1/completions", "200"), count("/v1/completions", "400"), count("/api", "400")
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 2}
    for _ in range(3):
        assert requests.post(f"http://{server.api}/v1/completions", json=body, timeout=60).status_code == 200
    assert requests.post(f"http://{server.api}/v1/completions", json={**body, "n": 0}, timeout=60).status_code == 400
    assert megatron(server, {"prompts": []}).status_code == 400
    assert (count("/v1/completions", "200"), count("/v1/completions", "400"), count("/api", "400")) == \
        (ok + 3, bad + 1, megatron_bad + 1)
    text = requests.get(f"http://{server.api}/metrics", timeout=30).text
    assert 'api_request_seconds_bucket{le="0.005",route="/v1/completions"}' in text


@pytest.mark.parametrize("route", ["openai", "megatron"])
def test_a_client_that_leaves_a_unary_call_stops_its_generations(server, route):
    """A unary call whose client disconnects stops its generations in the engine (every choice of it), as a
    dropped stream does; the server goes on serving."""
    from .test_streaming import idle, llm_metrics, settled_metrics

    n = 16  # sixteen rows of 240 tokens: seconds of work on the demo model, cut after 0.3 s
    if route == "openai":
        path, body = "/v1/completions", {"model": MODEL, "prompt": PROMPT, "max_tokens": 240, "ignore_eos": True,
                                         "n": n}
    else:
        path, body = "/api", {"prompts": [PROMPT] * n, "tokens_to_generate": 240}
    before = llm_metrics(server)
    method = requests.put if route == "megatron" else requests.post
    with pytest.raises(requests.exceptions.ReadTimeout):  # the client gives up and closes the connection
        method(f"http://{server.api}{path}", json=body, timeout=(5, 0.3))
    after = settled_metrics(server)
    assert idle(after)
    # The engine retired generations as cancelled (only that moves the counter; 240 tokens end by length), and
    # the call's generations stopped far short of their n x 240 tokens. (A generation its stream left before it
    # reached the engine never runs: it counts in neither figure.)
    assert after["llm_requests_cancelled_total"] > before["llm_requests_cancelled_total"]
    assert after["llm_output_tokens_total"] - before["llm_output_tokens_total"] < n * 240 / 2
    assert requests.post(f"http://{server.api}/v1/completions", json={"model": MODEL, "prompt": PROMPT,
                                                                     "max_tokens": 3}, timeout=60).status_code == 200
