"""Tool calls read back from text: each template format, forced answers, and the streamed deltas that must add up
to the whole answer however the text is cut."""

import json
import random

import pytest

from api.tool_calls import Answer, ArgumentsStream, Function, Tool, from_text, required_schema, template_format

TOOLS = [Tool(type="function", function=Function(name="weather", parameters={
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]})),
         Tool(type="function", function=Function(name="time"))]
NAMES = {"weather", "time"}


def test_required_schema_offers_each_tool_and_honours_parallel_calls():
    schema = required_schema(TOOLS, parallel=True)
    names = [option["properties"]["name"]["const"] for option in schema["items"]["anyOf"]]
    assert names == ["weather", "time"] and schema["minItems"] == 1 and "maxItems" not in schema
    assert required_schema(TOOLS, parallel=False)["maxItems"] == 1
    assert required_schema(TOOLS[1:], parallel=True)["items"]["properties"]["parameters"] == {"type": "object"}


@pytest.mark.parametrize("source, fmt", [
    ("{% for m in messages %}{{ m.content }}{% endfor %}", "hermes"),  # says nothing of tools
    ("{{ '<tool_call>' }}{{ tools | tojson }}", "hermes"),
    ("[AVAILABLE_TOOLS]{{ tools }}[/AVAILABLE_TOOLS] ... [TOOL_CALLS]", "mistral"),
    ("{%- if tools %}<|python_tag|>{{ message.tool_calls }}{% endif %}", "llama3_json"),
])
def test_the_template_tells_the_format(source, fmt):
    assert template_format(source) == fmt


@pytest.mark.parametrize("fmt, text, content, calls", [
    ("hermes", 'Let me look.\n<tool_call>{"name": "weather", "arguments": {"city": "Oslo"}}</tool_call>',
     "Let me look.", [("weather", {"city": "Oslo"})]),
    ("hermes", '<tool_call>{"name": "weather", "arguments": {"city": "A"}}</tool_call>\n<tool_call>'
               '{"name": "time", "arguments": {}}</tool_call>', None, [("weather", {"city": "A"}), ("time", {})]),
    ("hermes", '<tool_call>{"name": "unknown", "arguments": {}}</tool_call>', None, []),  # not offered: text
    ("hermes", "<tool_call>{not json</tool_call>", None, []),
    ("hermes", "plain words", None, []),
    ("mistral", 'ok [TOOL_CALLS][{"name": "time", "arguments": {}}]', "ok", [("time", {})]),
    ("mistral", "[TOOL_CALLS][{broken", None, []),
    ("llama3_json", '{"name": "weather", "parameters": {"city": "Rome"}}', None, [("weather", {"city": "Rome"})]),
    ("llama3_json", '{"city": "Rome"}', None, []),
])
def test_calls_are_read_from_text_in_each_format(fmt, text, content, calls):
    left, found = from_text(text, fmt, NAMES)
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in found] == calls
    assert left == (content if calls else text)
    assert all(c["type"] == "function" and c["id"].startswith("call_") for c in found)


def pieces(text: str, rng: random.Random) -> list[str]:
    """``text`` cut at random places, as a stream's deltas cut it."""
    cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randrange(1, 12))))
    return [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]


def collect(deltas: list[dict]) -> list[dict]:
    calls: dict[int, dict] = {}
    for d in deltas:
        if d["index"] not in calls:
            assert d["id"] and d["function"]["name"] and d["type"] == "function"  # id and name first
            calls[d["index"]] = {"name": d["function"]["name"], "arguments": d["function"]["arguments"]}
        else:
            assert set(d) == {"index", "function"} and set(d["function"]) == {"arguments"}
            calls[d["index"]]["arguments"] += d["function"]["arguments"]
    return [calls[i] for i in sorted(calls)]


@pytest.mark.parametrize("seed", range(20))
def test_a_forced_array_streams_to_the_calls_it_parses_to(seed):
    rng = random.Random(seed)
    calls = [{"name": "weather", "parameters": {"city": 'O"s}lo]', "days": [1, {"a": 2}]}},
             {"name": "time", "parameters": {}}][:rng.randrange(1, 3)]
    text = json.dumps(calls)
    stream = ArgumentsStream()
    got = collect([d for piece in pieces(text, rng) for d in stream.feed(piece)])
    assert [(c["name"], json.loads(c["arguments"])) for c in got] == [(c["name"], c["parameters"]) for c in calls]


def test_a_named_call_streams_its_arguments_as_they_come():
    stream = ArgumentsStream(named="time")
    deltas = stream.feed("") + stream.feed('{"zone": ') + stream.feed('"UTC"}')
    assert collect(deltas) == [{"name": "time", "arguments": '{"zone": "UTC"}'}]


@pytest.mark.parametrize("seed", range(10))
def test_auto_streams_text_holds_back_calls_and_adds_up_to_the_whole_answer(seed):
    rng = random.Random(seed)
    text = 'Checking the <weather>. <tool_call>{"name": "weather", "arguments": {"city": "Oslo"}}</tool_call>'
    answer = Answer("auto", TOOLS, "hermes")
    stream, content, deltas = answer.stream(), "", []
    parts = pieces(text, rng)
    for i, piece in enumerate(parts):
        more, calls, reason = stream.feed(piece, "stop" if i == len(parts) - 1 else None)
        assert "<tool_call" not in more  # what may begin a call is held back
        content, deltas = content + more, deltas + calls
    assert reason == "tool_calls" and content.strip() == "Checking the <weather>."
    assert collect(deltas) == [{"name": "weather", "arguments": '{"city": "Oslo"}'}]
    whole = answer.final(text, "stop")
    assert whole[0] == "Checking the <weather>." and whole[2] == "tool_calls"


def test_auto_text_without_calls_streams_whole_and_ends_as_it_ended():
    answer = Answer("auto", TOOLS, "hermes")
    stream = answer.stream()
    out = [stream.feed(p, None) for p in ("a <to", "ol> b")] + [stream.feed("", "length")]
    assert "".join(text for text, _, _ in out) == "a <tool> b" and out[-1][2] == "length"
    assert not any(calls for _, calls, _ in out)


def test_a_forced_answer_cut_short_is_text_with_length():
    assert Answer("required", TOOLS).final('[{"name": "time", "param', "length") == \
        ('[{"name": "time", "param', [], "length")
    content, calls, reason = Answer("named", TOOLS, named="time").final("{}", "stop")
    assert content is None and reason == "tool_calls" and calls[0]["function"] == {"name": "time", "arguments": "{}"}
