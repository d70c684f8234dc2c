"""Structured outputs on the served demo model: the ensembles' guide tensors over HTTP, gRPC and streaming, the
whole schema suite at temperature 0 and 1, and bad guides refused by name while the server keeps serving."""

from __future__ import annotations

import concurrent.futures
import json
from typing import Literal

import openai
import pydantic
import pytest
import requests

from client import GenerationClient, GenerationError
from tests.schemas import SCHEMAS
from tests.unit.test_structured_outputs import valid

PROMPT = "The for statement is used to"
MODEL = "megatron-gpt"  # the API's default model name


def guided(schema: dict) -> dict:
    return {"guided_decoding_guide_type": "json_schema", "guided_decoding_guide": json.dumps(schema)}


def test_every_schema_of_the_suite_parses_through_the_ensemble(server):
    """Each schema at temperature 0 and 1, eight requests at a time: every output that ends with ``stop``
    validates, and almost all of them end so within the budget."""
    jobs = [(name, temperature) for name in sorted(SCHEMAS) for temperature in (0.0, 1.0)]

    def run(job):
        name, temperature = job
        with GenerationClient(server.grpc, "grpc") as c:
            return c.generate(PROMPT, max_tokens=160, temperature=temperature, seed=1, **guided(SCHEMAS[name]))

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(run, jobs))
    stopped = [(job, r) for job, r in zip(jobs, results) if r.finish_reason == "stop"]
    for (name, temperature), r in stopped:
        assert valid(SCHEMAS[name], r.text), (name, temperature, r.text)
    assert len(stopped) >= 0.9 * len(jobs), [(job, r.text[-40:]) for job, r in zip(jobs, results)
                                             if r.finish_reason != "stop"]


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_each_guide_type_over_both_protocols(server, protocol):
    cases = [("regex", r"[A-Z][a-z]{2,6} [0-9]{2}", lambda t: t[0].isupper() and t[-2:].isdigit()),
             ("choice", json.dumps(["alpha", "beta", "gamma"]), lambda t: t in ("alpha", "beta", "gamma")),
             ("ebnf_grammar", 'root ::= "(" [a-z]+ ")"', lambda t: t[0] == "(" and t[-1] == ")" and t[1:-1].isalpha()),
             ("json", "", lambda t: isinstance(json.loads(t), (dict, list)))]
    with GenerationClient(server.http if protocol == "http" else server.grpc, protocol) as c:
        for kind, guide, check in cases:
            r = c.generate(PROMPT, max_tokens=60, temperature=0.8, seed=2, guided_decoding_guide_type=kind,
                           guided_decoding_guide=guide or None)
            assert r.finish_reason == "stop" and check(r.text), (kind, r.text)


def test_a_guided_stream_concatenates_to_the_unary_text(server):
    params = {"max_tokens": 80, "temperature": 1.0, "seed": 5, **guided(SCHEMAS["person"])}
    with GenerationClient(server.grpc, "grpc") as c:
        unary = c.generate(PROMPT, **params)
        parts = list(c.stream(PROMPT, **params))
    assert "".join(p.text for p in parts) == unary.text and parts[-1].finish_reason == unary.finish_reason == "stop"
    assert valid(SCHEMAS["person"], unary.text)


def test_the_generate_endpoint_takes_a_guide(server):
    body = {"text_input": PROMPT, "max_tokens": 40, "temperature": 0.0, **guided(SCHEMAS["enum_in_object"])}
    reply = requests.post(f"http://{server.http}/v2/models/ensemble/generate", json=body, timeout=120)
    assert reply.status_code == 200, reply.text
    assert valid(SCHEMAS["enum_in_object"], reply.json()["text_output"])


@pytest.mark.parametrize("kind, guide, field, reason", [
    ("json_schema", '{"type": "object", "properties": {"a": {"$ref": "#/$defs/none"}}}', "guided_decoding_guide",
     "does not exist"),
    ("regex", "[a-", "guided_decoding_guide", "does not compile as regex"),
    ("ebnf_grammar", 'root ::= "a" missing', "guided_decoding_guide", "not a valid GBNF grammar"),
    ("choice", "{}", "guided_decoding_guide", "list of one or more"),
    ("yaml", "a: 1", "guided_decoding_guide_type", "must be one of"),
    ("regex", None, "guided_decoding_guide", "is required"),
])
def test_a_bad_guide_is_refused_naming_the_tensor(server, kind, guide, field, reason):
    with GenerationClient(server.grpc, "grpc") as c:
        with pytest.raises(GenerationError) as err:
            c.generate(PROMPT, max_tokens=8, guided_decoding_guide_type=kind, guided_decoding_guide=guide)
        assert f"'{field}'" in str(err.value) and reason in str(err.value), str(err.value)
        assert c.generate(PROMPT, max_tokens=4, temperature=0.0).num_output_tokens > 0  # still serving


def test_huge_guides_are_refused_and_thousands_of_choices_work(server):
    with GenerationClient(server.grpc, "grpc") as c:
        with pytest.raises(GenerationError, match="at most 262144 characters"):
            c.generate(PROMPT, max_tokens=8, guided_decoding_guide_type="regex",
                       guided_decoding_guide="a" * 300_000)
        choices = [f"option {i}" for i in range(5000)]
        r = c.generate(PROMPT, max_tokens=12, temperature=1.0, seed=3, guided_decoding_guide_type="choice",
                       guided_decoding_guide=json.dumps(choices))
    assert r.finish_reason == "stop" and r.text in choices


def test_a_bad_guide_does_not_disturb_its_batch(server):
    def good(i):
        with GenerationClient(server.grpc, "grpc") as c:
            return c.generate(PROMPT, max_tokens=40, temperature=0.0, **guided(SCHEMAS["two_types"]))

    def bad(i):
        with GenerationClient(server.grpc, "grpc") as c:
            try:
                c.generate(PROMPT, max_tokens=8, guided_decoding_guide_type="json_schema",
                           guided_decoding_guide='{"type": 5}')
            except GenerationError as err:
                return err
        return None

    with concurrent.futures.ThreadPoolExecutor(10) as pool:
        goods = [pool.submit(good, i) for i in range(6)]
        bads = [pool.submit(bad, i) for i in range(4)]
    assert len({f.result().text for f in goods}) == 1 and valid(SCHEMAS["two_types"], goods[0].result().text)
    assert all(isinstance(f.result(), GenerationError) for f in bads)


# --- the HTTP API, through the openai package -------------------------------------------------------------------
@pytest.fixture(scope="module")
def api(server):
    return openai.OpenAI(base_url=f"http://{server.api}/v1", api_key="unused", max_retries=0, timeout=120)


class Point(pydantic.BaseModel):
    x: int = pydantic.Field(ge=-50, le=50)
    y: int = pydantic.Field(ge=-50, le=50)


class Shape(pydantic.BaseModel):
    kind: Literal["circle", "square"]
    label: str = pydantic.Field(max_length=10)
    corners: list[Point] = pydantic.Field(max_length=3)


MESSAGES = [{"role": "user", "content": "Describe a shape."}]


def test_every_schema_of_the_suite_parses_through_the_api(api):
    """The suite again as OpenAI's ``response_format``, temperature 0 and 1 in turn, eight requests at a time."""
    names = sorted(SCHEMAS)

    def run(i):
        return api.chat.completions.create(
            model=MODEL, messages=MESSAGES, temperature=(0.0, 1.0)[i % 2], seed=i, max_tokens=200,
            response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": SCHEMAS[names[i]]}})

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        choices = [r.choices[0] for r in pool.map(run, range(len(names)))]
    stopped = [(name, c.message.content) for name, c in zip(names, choices) if c.finish_reason == "stop"]
    for name, text in stopped:
        assert valid(SCHEMAS[name], text), (name, text)
    assert len(stopped) >= 0.9 * len(names)


def test_parse_with_a_pydantic_model(api):
    for temperature in (0.0, 1.0):
        completion = api.chat.completions.parse(model=MODEL, messages=MESSAGES, response_format=Shape,
                                                temperature=temperature, seed=4, max_tokens=120)
        choice = completion.choices[0]
        assert choice.finish_reason == "stop", choice.message.content
        assert isinstance(choice.message.parsed, Shape)


def test_parse_while_streaming(api):
    with api.chat.completions.stream(model=MODEL, messages=MESSAGES, response_format=Shape, temperature=1.0,
                                     seed=6, max_tokens=120) as stream:
        deltas = [event.delta for event in stream if event.type == "content.delta"]
        final = stream.get_final_completion()
    assert "".join(deltas) == final.choices[0].message.content
    assert isinstance(final.choices[0].message.parsed, Shape)


@pytest.mark.parametrize("extra, check", [
    ({"response_format": {"type": "json_object"}}, lambda t: isinstance(json.loads(t), dict)),
    ({"structured_outputs": {"regex": "[0-9]{4}"}}, lambda t: len(t) == 4 and t.isdigit()),
    ({"structured_outputs": {"choice": ["left", "right"]}}, lambda t: t in ("left", "right")),
    ({"structured_outputs": {"json": SCHEMAS["ref_defs"]}}, lambda t: valid(SCHEMAS["ref_defs"], t)),
    ({"structured_outputs": {"grammar": 'root ::= "<" [a-z]+ ">"'}}, lambda t: t[0] == "<" and t[-1] == ">"),
    ({"guided_json": SCHEMAS["two_types"]}, lambda t: valid(SCHEMAS["two_types"], t)),
    ({"guided_json": json.dumps(SCHEMAS["nested_object"])}, lambda t: valid(SCHEMAS["nested_object"], t)),
    ({"guided_regex": "(yes|no)!"}, lambda t: t in ("yes!", "no!")),
    ({"guided_choice": ["up", "down"]}, lambda t: t in ("up", "down")),
    ({"guided_grammar": 'root ::= "a" [bc] [bc]?'}, lambda t: t[0] == "a" and set(t[1:]) <= {"b", "c"}),
])
def test_vllm_and_openai_fields_on_both_endpoints(api, extra, check):
    chat = api.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=80, temperature=0.7, seed=1,
                                       extra_body=extra)
    assert chat.choices[0].finish_reason == "stop" and check(chat.choices[0].message.content), chat
    if "response_format" not in extra:
        text = api.completions.create(model=MODEL, prompt="Say:", max_tokens=80, temperature=0.7, seed=1,
                                      extra_body=extra)
        assert text.choices[0].finish_reason == "stop" and check(text.choices[0].text), text


@pytest.mark.parametrize("extra, param, reason", [
    ({"guided_regex": "a", "guided_choice": ["b"]}, "guided_choice", "both constrain"),
    ({"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}}, "structured_outputs",
     "both constrain"),
    ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs", "exactly one"),
    ({"structured_outputs": {"structural_tag": "x"}}, "structured_outputs",
     "'structured_outputs.structural_tag' is not"),
    ({"guided_json": {"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}}}, "guided_json",
     "does not exist"),
    ({"guided_regex": "(unclosed"}, "guided_regex", "does not compile"),
    ({"guided_grammar": "root ::= nothing"}, "guided_grammar", "GBNF"),
    ({"guided_json": "{not json"}, "guided_json", "must be a JSON schema"),
    ({"response_format": {"type": "json_schema"}}, "response_format", "needs 'json_schema'"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}},
     "response_format", "does not compile"),
    ({"guided_choice": []}, "guided_choice", ""),
])
def test_bad_structured_output_fields_get_a_named_400(server, extra, param, reason):
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 8, **extra}
    reply = requests.post(f"http://{server.api}/v1/chat/completions", json=body, timeout=60)
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["param"] == param and reason in error["message"], error


# Small tools: the demo model's context is 256 tokens, and the tools are written into the prompt.
WEATHER = {"type": "function", "function": {"name": "weather", "parameters": {
    "type": "object", "properties": {"city": {"enum": ["Oslo", "Rome"]}, "days": {"type": "integer", "minimum": 1,
                                                                                    "maximum": 7}},
    "required": ["city", "days"]}}}
TIME = {"type": "function", "function": {"name": "time", "parameters": {
    "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"]}}}
ARGUMENTS = {"weather": WEATHER["function"]["parameters"], "time": TIME["function"]["parameters"]}


def assert_calls(calls, names):
    assert calls and all(c.type == "function" and c.id.startswith("call_") for c in calls)
    for c in calls:
        assert c.function.name in names
        assert valid(ARGUMENTS[c.function.name], c.function.arguments), c.function.arguments


@pytest.mark.parametrize("parallel", [True, False])
def test_tool_choice_required_gives_one_or_more_valid_calls(api, parallel):
    """A forced answer either is calls that parse and fit their tools' schemas, or (cut short by the context: a
    sampled model may call a tool many times in a row) comes back as text with ``length``."""
    tools = [TIME] if parallel else [WEATHER, TIME]  # several calls fit the demo model's context with one tool
    counts = []
    for seed in range(3):
        chat = api.chat.completions.create(model=MODEL, messages=MESSAGES, tools=tools, tool_choice="required",
                                           parallel_tool_calls=parallel, temperature=1.0, seed=seed)
        choice = chat.choices[0]
        if choice.finish_reason == "length":
            assert choice.message.content and not choice.message.tool_calls
            continue
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        assert_calls(choice.message.tool_calls, {"weather", "time"})
        counts.append(len(choice.message.tool_calls))
    assert len(counts) >= 2 and (max(counts) > 1 if parallel else set(counts) == {1}), counts


def test_a_named_tool_choice_calls_that_function(api):
    chat = api.chat.completions.create(model=MODEL, messages=MESSAGES, tools=[WEATHER, TIME], temperature=0.0,
                                       tool_choice={"type": "function", "function": {"name": "time"}})
    assert chat.choices[0].finish_reason == "tool_calls"
    assert_calls(chat.choices[0].message.tool_calls, {"time"})


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "weather"}}])
def test_streamed_tool_calls_send_id_and_name_first_then_arguments(api, tool_choice):
    tools = [TIME] if tool_choice == "required" else [WEATHER, TIME]
    kw = {"model": MODEL, "messages": MESSAGES, "tools": tools, "tool_choice": tool_choice,
          "temperature": 1.0, "seed": 8}
    whole = api.chat.completions.create(**kw).choices[0]
    calls: dict[int, dict] = {}
    reasons = []
    for chunk in api.chat.completions.create(stream=True, **kw):
        for choice in chunk.choices:
            reasons.append(choice.finish_reason)
            for d in choice.delta.tool_calls or []:
                if d.index not in calls:  # a call's first delta: its id and name
                    assert d.id and d.function.name and d.type == "function"
                    calls[d.index] = {"name": d.function.name, "arguments": d.function.arguments or ""}
                else:
                    assert d.id is None and not d.function.name
                    calls[d.index]["arguments"] += d.function.arguments
    assert reasons[-1] == whole.finish_reason == "tool_calls"
    assert [(c["name"], json.loads(c["arguments"])) for c in calls.values()] == \
        [(c.function.name, json.loads(c.function.arguments)) for c in whole.message.tool_calls]


def test_tool_choice_none_and_auto_answer_in_text(api):
    for tool_choice in ("none", "auto"):
        chat = api.chat.completions.create(model=MODEL, messages=MESSAGES, tools=[WEATHER], max_tokens=12,
                                           tool_choice=tool_choice, temperature=0.0)
        choice = chat.choices[0]
        assert choice.message.content and not choice.message.tool_calls  # the demo model writes no calls
        assert choice.finish_reason in ("stop", "length")


def test_a_tool_conversation_is_rendered_with_its_calls_and_results(api):
    messages = [*MESSAGES, {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "call_1", "type": "function",
                     "function": {"name": "weather", "arguments": '{"city": "Oslo", "days": 2}'}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "rain"}]
    chat = api.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER], max_tokens=4,
                                       temperature=0.0)
    assert chat.usage.prompt_tokens > 60  # the tools, the call and its result are in the prompt
