"""Fuzzed requests against the real server over HTTP, gRPC and gRPC streaming (hypothesis).

Every request must get an answer: text, or an error (HTTP 400 / gRPC INVALID_ARGUMENT, never a 5xx) that names
one of the fields the case could have broken: the generator records them (``Case.suspects``), so an error that
names some other field, or none, fails the test. None may crash a model, wedge the engine or change what a later
valid request gets; and each run must have reached both outcomes, refused and answered. ``make test`` runs a
few hundred derandomized cases; ``make fuzz`` (FUZZ_EXAMPLES=...) runs as many as asked, freshly random.
"""

from __future__ import annotations

import dataclasses
import os
import queue

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from client import GenerationClient
from preprocessing.params import SCALARS, WORD_LISTS

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "150"))  # per protocol
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, derandomize="FUZZ_EXAMPLES" not in os.environ,
                    suppress_health_check=list(HealthCheck), database=None)
GREEDY = dict(max_tokens=24, temperature=0.0, end_id=-1)
PROBE = "The for statement"

WIRE = {"TYPE_INT32": "INT32", "TYPE_FP32": "FP32", "TYPE_UINT64": "UINT64", "TYPE_BOOL": "BOOL",
        "TYPE_STRING": "BYTES"}
GUIDE_FIELDS = {"guided_decoding_guide_type", "guided_decoding_guide"}
NUMPY = {"INT32": np.int32, "INT64": np.int64, "FP32": np.float32, "FP64": np.float64, "UINT64": np.uint64,
         "BOOL": np.bool_, "BYTES": object}
BATCH_WORDS = ("batch-size", "batch size")  # Triton's own words for a request with a batch it cannot take

# -- values ---------------------------------------------------------------------------------------------------
lone_surrogates = st.text(st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF), min_size=1, max_size=4).map(
    lambda s: s.encode("utf-8", "surrogatepass"))
plain_texts = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), min_size=1, max_size=80)
texts = st.one_of(
    plain_texts.map(str.encode), plain_texts.map(str.encode),  # valid text half the time
    st.text(max_size=200).map(str.encode),  # any code point, control characters included
    st.binary(min_size=1, max_size=300),  # mostly invalid UTF-8
    lone_surrogates,
    st.sampled_from([1, 1000, 70_000, 1_000_000]).map(lambda n: b"a " * (n // 2) or b"a"),  # 1 byte .. 1 MB
    st.sampled_from(["😀🎉 emoji", "漢字とかな", "\x00\x01\x1b[31m", "\ufeff", "\n\n\t"]).map(str.encode),
)
ints = st.one_of(st.integers(-(2**31), 2**31 - 1), st.sampled_from([0, -1, 1, 255, 256, 4095, 4096, 2**31 - 1]))
floats = st.floats(width=32, allow_nan=True, allow_infinity=True)
words = st.one_of(st.lists(texts.filter(lambda b: len(b) < 400), max_size=4),
                  st.sampled_from([300, 3000]).map(lambda n: [b"w%d" % i for i in range(n)]))
# Guides: valid and malformed schemas, regexes, grammars and choices, huge ones, and any text.
guide_types = st.one_of(st.sampled_from([b"json", b"json_schema", b"regex", b"ebnf_grammar", b"choice"]), texts)
guides = st.one_of(texts, st.sampled_from([
    b'{"type": "object", "properties": {"a": {"type": "integer"}}}', b'{"type": 5}', b'{"$ref": "#/nowhere"}', b"{",
    b"[a-", b"(x|y)+", b'root ::= "x" [0-9]', b"root ::= missing", b'["a", "b"]', b"[]", b'{"anyOf": []}',
    b'{"type": "string", "pattern": "("}', b"a" * 300_000,
]), st.integers(1, 4000).map(lambda n: ("[" + ", ".join(f'"c{i}"' for i in range(n)) + "]").encode()))


SENSIBLE = {"temperature": st.floats(0, 2), "top_p": st.floats(0.05, 1), "top_k": st.integers(0, 50),
            "repetition_penalty": st.floats(0.5, 2), "presence_penalty": st.floats(-1, 1),
            "frequency_penalty": st.floats(-1, 1), "min_length": st.integers(0, 4), "end_id": st.just(-1)}


def wild_scalar(name: str):
    kind = SCALARS[name].triton_type
    if kind == "TYPE_FP32":
        return floats
    if kind == "TYPE_UINT64":
        return st.integers(0, 2**64 - 1)
    if kind == "TYPE_BOOL":
        return st.booleans()
    if kind == "TYPE_STRING":
        return guide_types if name == "guided_decoding_guide_type" else guides
    return ints


@dataclasses.dataclass
class Case:
    request: dict  # {name: (wire type, shape, value)}
    suspects: set  # the names an error may give: every field this case drew from outside the valid ranges


@st.composite
def fuzzed_request(draw) -> Case:
    """Mostly valid fields, each possibly broken in one way; ``suspects`` records which ones may be broken.

    The prompt and ``max_tokens`` are always suspects (a long prompt leaves no room, and the rule names either),
    and so is ``min_length`` (it may exceed ``max_tokens``); a scalar drawn from its sensible range is not."""
    batch = draw(st.sampled_from([1] * 8 + [0, 2, 3]))  # empty and multi-element batches too
    suspects = {"text_input", "max_tokens", "min_length"} | (set(BATCH_WORDS) if batch != 1 else set())
    request = {"text_input": ("BYTES", [batch, 1], draw(texts))}
    if draw(st.booleans()):
        request["max_tokens"] = ("INT32", [batch, 1], draw(st.integers(1, 40)))
    else:
        request["max_tokens"] = ("INT32", [batch, 1], draw(ints))  # beyond the context, negative, zero
    for name in draw(st.lists(st.sampled_from(sorted(SCALARS)), max_size=4, unique=True)):
        wild = name not in SENSIBLE or draw(st.booleans())
        value = draw(wild_scalar(name) if wild else SENSIBLE[name])
        request[name] = (WIRE[SCALARS[name].triton_type], [batch, 1], value)
        suspects |= ({name} if wild else set()) | (GUIDE_FIELDS if name in GUIDE_FIELDS else set())
    for name in draw(st.lists(st.sampled_from(sorted(WORD_LISTS)), max_size=2, unique=True)):
        values = draw(words)
        request[name] = ("BYTES", [batch, len(values)], values)
        suspects.add(name)
    mutation = draw(st.sampled_from(["none"] * 8 + ["dtype", "shape", "missing", "unknown"]))
    if mutation == "dtype":
        name = draw(st.sampled_from(sorted(request)))
        _, shape, value = request[name]
        wire = draw(st.sampled_from(sorted(NUMPY)))
        request[name] = (wire, shape, b"1" if wire == "BYTES" else 1)
        suspects.add(name)
    elif mutation == "shape":
        name = draw(st.sampled_from(sorted(request)))
        wire, shape, value = request[name]
        request[name] = (wire, draw(st.sampled_from([[batch], [batch, 2], [batch, 1, 1], [batch + 1, 1]])), value)
        suspects |= {name, *BATCH_WORDS}  # a first dimension that differs from the others is a batch error
    elif mutation == "missing":
        missing = draw(st.sampled_from(["text_input", "max_tokens"]))
        del request[missing]
        suspects.add(missing)
    elif mutation == "unknown":
        unknown = draw(st.sampled_from(["foo", "TEXT_INPUT", "INPUT_IDS", "max_token"]))
        request[unknown] = ("INT32", [batch, 1], 1)
        suspects.add(unknown)
    if batch == 0:  # an empty batch: Triton refuses the byte size of whichever input it checks first
        suspects |= set(request)
    return Case(request, suspects)


def array(wire: str, shape: list[int], value) -> np.ndarray:
    if isinstance(value, list):  # a word list: one row per batch element (a broken shape gets filler words)
        if shape == [shape[0], len(value)]:
            return np.array([value] * shape[0], dtype=object).reshape(shape)
        return np.full(shape, b"w", dtype=object)
    dtype = NUMPY[wire]
    if dtype is object and not isinstance(value, bytes):
        value = str(value).encode()
    if dtype is not object and isinstance(value, bytes):
        value = 1
    if dtype is np.uint64 and value < 0 or dtype is np.int32 and not -(2**31) <= int(value) < 2**31:
        value = 0
    with np.errstate(all="ignore"):
        return np.full(shape, value, dtype=dtype)


def inputs(tc, request: dict) -> list:
    out = []
    for name, (wire, shape, value) in request.items():
        data = array(wire, shape, value)
        tensor = tc.InferInput(name, list(data.shape), wire)
        tensor.set_data_from_numpy(data)
        out.append(tensor)
    return out


# -- checks ---------------------------------------------------------------------------------------------------
OUTCOMES: dict[str, int] = {}


def count(outcome: str) -> None:
    OUTCOMES[outcome] = OUTCOMES.get(outcome, 0) + 1


def check_error(message: str, status: str, case: Case, stream: bool = False) -> None:
    count("refused")
    # A gRPC stream carries only an error message per response (no status code): the message must still name
    # the field.
    allowed = ("400", "StatusCode.INVALID_ARGUMENT") + (("None",) if stream else ())
    assert status in allowed, (status, message, summary(case.request))
    # Inside the pipeline the same fields go by their upper-case tensor names (MAX_TOKENS, INPUT_IDS for the
    # prompt's ids).
    named = case.suspects | {n.upper() for n in case.suspects} | ({"INPUT_IDS"} if "text_input" in case.suspects
                                                                  else set())
    assert any(n in message for n in named), (message, sorted(case.suspects), summary(case.request))


def check_result(result, request: dict, final: bool = True) -> None:
    text = result.as_numpy("text_output")
    reasons = result.as_numpy("finish_reason")
    assert text is not None and reasons is not None
    for row in text.reshape(-1):
        row.decode("utf-8")  # valid UTF-8
    assert set(r.decode() for r in reasons.reshape(-1)) <= ({"stop", "length"} | (set() if final else {""}))


def summary(request: dict) -> dict:
    def short(value):
        return f"<{len(value)} bytes>" if isinstance(value, bytes) and len(value) > 40 else (
            f"<{len(value)} words>" if isinstance(value, list) and len(value) > 4 else value)
    return {name: (wire, shape, short(value)) for name, (wire, shape, value) in request.items()}


def send_unary(url: str, protocol: str, case: Case) -> None:
    request = case.request
    if protocol == "http":
        import tritonclient.http as tc
        client = tc.InferenceServerClient(url, network_timeout=120)
    else:
        import tritonclient.grpc as tc
        client = tc.InferenceServerClient(url)
    try:
        result = client.infer("ensemble", inputs(tc, request))
    except tc.InferenceServerException as err:
        check_error(err.message(), str(err.status()), case)
        return
    finally:
        client.close()
    check_result(result, request)
    count("answered")


def send_stream(url: str, case: Case) -> None:
    request = case.request
    import tritonclient.grpc as tc

    client = tc.InferenceServerClient(url)
    answers: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        try:
            client.async_stream_infer("ensemble_stream", inputs(tc, request), enable_empty_final_response=True)
        except tc.InferenceServerException as err:  # refused by the client library itself
            check_error(err.message(), str(err.status()), case, stream=True)
            return
        while True:
            result, error = answers.get(timeout=120)
            if error is not None:
                check_error(error.message(), str(error.status()), case, stream=True)
                return
            final = result.get_response().parameters["triton_final_response"].bool_param
            if result.as_numpy("text_output") is not None:
                check_result(result, request, final)
                count("streamed part")
            if final:
                # The stream ended without an error: answered, whether or not its last response carried text
                # (an empty final response carries none).
                count("answered")
                return
    finally:
        client.stop_stream()
        client.close()


@pytest.fixture(scope="module")
def greedy_before(server):
    with GenerationClient(server.grpc, "grpc") as c:
        return c.generate(PROBE, **GREEDY).text


@pytest.mark.parametrize("protocol", ["http", "grpc", "grpc_stream"])
def test_fuzzed_requests_get_an_answer(server, greedy_before, protocol):
    @SETTINGS
    @given(fuzzed_request())
    def one(case):
        if protocol == "grpc_stream":
            send_stream(server.grpc, case)
        else:
            send_unary(server.http if protocol == "http" else server.grpc, protocol, case)

    OUTCOMES.clear()
    one()
    print(f"fuzz {protocol}: {EXAMPLES} cases requested, outcomes {OUTCOMES}")
    # A run that never got past validation, or never hit it, tested less than it claims.
    assert OUTCOMES.get("refused", 0) >= EXAMPLES // 10, OUTCOMES
    assert OUTCOMES.get("answered", 0) >= EXAMPLES // 20, OUTCOMES
    assert server.process.poll() is None, server.tail()
    for url, proto in ((server.http, "http"), (server.grpc, "grpc")):  # what valid requests get is unchanged
        with GenerationClient(url, proto) as c:
            assert c.generate(PROBE, **GREEDY).text == greedy_before
