"""Structured outputs: guides compile (or are refused by name), masks keep exactly what the grammar allows, and
the engine's guided sequences parse, end with ``stop`` and leave the other rows of their batch as they were."""

import datetime as dt
import json
import re

import jsonschema
import pytest
import torch

from preprocessing.params import InvalidRequest, SamplingParams
from preprocessing.tokenization import build, load, load_path, resolve
from preprocessing.tokenization.null import NullTokenizer
from tests.schemas import SCHEMAS
from triton_backend.engine.engine import Engine
from triton_backend.engine.grammar import Grammars, apply_guides
from triton_backend.engine.sampling import RowSampler, sample
from triton_backend.model.gpt import CachedGPT

from .models import TEXT_ARCH, context_model, wait_until

FORMATS = jsonschema.FormatChecker()


@FORMATS.checks("time", raises=ValueError)
def _rfc3339_time(value) -> bool:
    """RFC 3339 (section 5.6) lets ``t`` and ``z`` be lower case and a second be 60 (a leap second), which
    jsonschema's own checker refuses."""
    return not isinstance(value, str) or bool(re.fullmatch(
        r"([01]\d|2[0-3]):[0-5]\d:([0-5]\d|60)(\.\d+)?([zZ]|[+-]([01]\d|2[0-3]):[0-5]\d)", value))


@FORMATS.checks("date-time", raises=ValueError)
def _rfc3339_date_time(value) -> bool:
    if not isinstance(value, str):
        return True
    date, sep, time = value.partition("T" if "T" in value else "t")
    return bool(sep) and dt.date.fromisoformat(date) is not None and _rfc3339_time(time)


def valid(schema: dict, text: str) -> bool:
    try:
        jsonschema.Draft202012Validator(schema, format_checker=FORMATS).validate(json.loads(text))
    except (ValueError, jsonschema.ValidationError):
        return False
    return True


def walk(grammars: Grammars, tokenizer, kind: str, guide: str, seed: int, temperature: float = 1.0,
         limit: int = 400) -> tuple[str, bool]:
    """Sample from random logits under the guide's mask: its text, and whether the grammar completed."""
    g = grammars.guide(kind, guide)
    gen = torch.Generator().manual_seed(seed)
    tokens = []
    for _ in range(limit):
        logits = torch.randn(1, tokenizer.vocab_size, generator=gen) * temperature
        apply_guides(logits, [0], [g], [tokenizer.eos_id])
        token = int(torch.multinomial(torch.softmax(logits, 1), 1, generator=gen))
        if token == tokenizer.eos_id:
            return tokenizer.decode(tokens), True
        g.accept(token)
        tokens.append(token)
        if g.complete():
            return tokenizer.decode(tokens), True
    return tokenizer.decode(tokens), False


@pytest.fixture(scope="module")
def grammars(tiny_tokenizer):
    return Grammars(tiny_tokenizer)


def test_the_suite_has_fifty_schemas():
    assert len(SCHEMAS) >= 50


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_every_schema_walk_that_completes_validates(grammars, tiny_tokenizer, name):
    schema = SCHEMAS[name]
    completed = 0
    for seed, temperature in ((0, 0.3), (1, 1.0), (2, 3.0)):
        text, done = walk(grammars, tiny_tokenizer, "json_schema", json.dumps(schema), seed, temperature)
        if done:
            completed += 1
            assert valid(schema, text), (name, text)
    assert completed >= 1, name


@pytest.mark.parametrize("kind, guide, check", [
    ("regex", r"[0-9]{3}-[a-z]{2,4}", lambda t: len(t.split("-")[0]) == 3 and t.split("-")[1].isalpha()),
    ("choice", json.dumps(["yes", 'no "quoted"', "über\nline"]), lambda t: t in ("yes", 'no "quoted"', "über\nline")),
    ("ebnf_grammar", 'root ::= "a" [0-9]+ "b"', lambda t: t[0] == "a" and t[-1] == "b" and t[1:-1].isdigit()),
    ("ebnf_grammar", 'start: "x" NUM\nNUM: /[0-9]{1,4}/', lambda t: t[0] == "x" and t[1:].isdigit()),
    ("json", "", lambda t: isinstance(json.loads(t), (dict, list))),
])
def test_each_guide_type_constrains_the_text(grammars, tiny_tokenizer, kind, guide, check):
    for seed in range(4):
        text, done = walk(grammars, tiny_tokenizer, kind, guide, seed, temperature=0.5)
        if done:
            assert check(text), text


@pytest.mark.parametrize("kind, guide, field, reason", [
    ("json_schema", "{", "guided_decoding_guide", "must be a JSON schema"),
    ("json_schema", '{"type": "wrong"}', "guided_decoding_guide", "does not compile as json_schema"),
    ("json_schema", '{"$ref": "#/$defs/missing"}', "guided_decoding_guide", "does not exist"),
    ("json_schema", "[1, 2]", "guided_decoding_guide", "must be a JSON schema"),
    ("regex", "((", "guided_decoding_guide", "unclosed group"),
    ("choice", "[]", "guided_decoding_guide", "one or more non-empty strings"),
    ("choice", "yes", "guided_decoding_guide", "must be a JSON list"),
    ("ebnf_grammar", "root ::= undefined", "guided_decoding_guide", "not a valid GBNF grammar"),
    ("ebnf_grammar", "start: missing_rule", "guided_decoding_guide", "does not compile as ebnf_grammar"),
    ("xml", "<a/>", "guided_decoding_guide_type", "must be one of"),
])
def test_a_bad_guide_is_refused_naming_the_tensor_and_the_reason(grammars, kind, guide, field, reason):
    with pytest.raises(InvalidRequest) as err:
        grammars.guide(kind, guide)
    assert err.value.field == field and reason in str(err.value), str(err.value)


def test_a_guide_compiles_once_and_is_copied_after(grammars, tiny_tokenizer):
    schema = json.dumps({"type": "object", "properties": {"cached": {"type": "integer"}}, "required": ["cached"]})
    before = grammars.compiled, grammars.hits
    first, second = grammars.guide("json_schema", schema), grammars.guide("json_schema", schema)
    assert (grammars.compiled, grammars.hits) == (before[0] + 1, before[1] + 1)
    tokens = tiny_tokenizer.encode('{"cached": 12}', leading=False)
    for token in tokens:
        first.accept(token)
    assert first.complete() and not second.complete()  # each request advances its own copy
    assert second.matcher.validate_tokens(tokens) == len(tokens)


def test_thousands_of_choices_compile_and_hold(grammars, tiny_tokenizer):
    choices = [f"item-{i}" for i in range(3000)]
    text, done = walk(grammars, tiny_tokenizer, "choice", json.dumps(choices), seed=3)
    assert done and text in choices


def test_the_mask_keeps_the_end_id_of_the_row_where_the_grammar_may_end(grammars, tiny_tokenizer):
    g = grammars.guide("regex", "[0-9]+")
    for token in tiny_tokenizer.encode("12", leading=False):
        g.accept(token)
    logits = torch.zeros(1, tiny_tokenizer.vocab_size)
    apply_guides(logits, [0], [g], [7])  # another end_id than the tokenizer's EOS
    assert logits[0, 7] == 0 and logits[0, tiny_tokenizer.eos_id] == 0
    letters = tiny_tokenizer.encode("abc", leading=False)
    assert all(logits[0, t] == float("-inf") for t in letters)


def test_a_row_left_with_no_token_fails_clearly(grammars, tiny_tokenizer):
    """After "1" the regex allows digits or the end: bad words ban every digit, min_length the end."""
    tok = tiny_tokenizer
    g = grammars.guide("regex", "[0-9]+")
    digits = [i for i, b in enumerate(tok.token_bytes()) if b and b.decode("utf-8", "replace").isdigit()]
    row = RowSampler(SamplingParams(max_tokens=8, min_length=5), [5, 6], tok.eos_id, 0,
                     bad=tuple((d,) for d in digits), guide=g)
    row.accept(tok.encode("1", leading=False)[0])
    with pytest.raises(InvalidRequest, match="'guided_decoding_guide' .* allows no token that bad_words"):
        sample(torch.zeros(1, tok.vocab_size), [row], tok.vocab_size)


# --- every tokenizer type gives the grammar engine its bytes -----------------------------------------------------
@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory, tiny_tokenizer):
    root = tmp_path_factory.mktemp("guided_tokenizers")
    texts = build.corpus()[:120]
    gpt2 = build.gpt2_bpe(root / "gpt2", texts, vocab_size=1024)
    tiktoken = build.tiktoken_vocabulary(root / "tik" / "vocab.json", gpt2)
    return {"sentencepiece": lambda: tiny_tokenizer, "gpt2": lambda: load_path(gpt2),
            "hf": lambda: load_path(build.huggingface_directory(root / "hf", texts, vocab_size=1024)),
            "tiktoken": lambda: load(resolve({"tokenizer_type": "TikTokenizer", "tokenizer_model": str(tiktoken),
                                              "vocab_size": 1000 + len(json.loads(tiktoken.read_text()))}))}


@pytest.mark.parametrize("kind", ["sentencepiece", "gpt2", "hf", "tiktoken"])
def test_token_bytes_spell_what_decoding_gives(tokenizers, kind):
    tok = tokenizers[kind]()
    pieces = tok.token_bytes()
    assert len(pieces) == tok.vocab_size and pieces[tok.eos_id] is None
    for text in ("def f(x):\n    return {'a': [1, 2]}", "naïve café – 東京", "  two  spaces"):
        ids = tok.encode(text, leading=False)
        assert b"".join(pieces[i] for i in ids).decode("utf-8").lstrip() == tok.decode(ids).lstrip()
    schema = SCHEMAS["two_types"]
    text, done = walk(Grammars(tok), tok, "json_schema", json.dumps(schema), seed=0)
    assert done and valid(schema, text), text


# --- the engine ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def guided_engine(tiny_tokenizer):
    model = context_model(TEXT_ARCH, seed=3)
    engine = Engine(CachedGPT(model, TEXT_ARCH, max_slots=8), tiny_tokenizer.vocab_size, tiny_tokenizer.eos_id,
                    tokenizer=tiny_tokenizer).start()
    yield engine
    engine.stop()


def guided(schema: dict, **kw) -> SamplingParams:
    return SamplingParams(**{"max_tokens": 100, "temperature": 1.0, "guided_decoding_guide_type": "json_schema",
                             "guided_decoding_guide": json.dumps(schema), **kw})


def test_guided_requests_in_one_batch_parse_end_with_stop_and_leave_the_others_alone(guided_engine, tiny_tokenizer):
    prompt = tiny_tokenizer.encode("The for statement")
    plain = SamplingParams(max_tokens=20, temperature=0.0, end_id=-1)
    alone = guided_engine.submit(prompt, plain)
    assert alone.wait(60) and alone.error is None
    names = ["two_types", "nested_object", "array_of_objects", "enum_in_object", "ref_defs", "any_of_objects"]
    with guided_engine._wake:  # one batch: every request before the next step
        rows = [guided_engine.submit(prompt, guided(SCHEMAS[n], seed=i)) for i, n in enumerate(names)]
        mixed = guided_engine.submit(prompt, plain)
    for name, g in zip(names, rows):
        assert g.wait(60) and g.error is None, g.error
        text = tiny_tokenizer.decode(g.tokens)
        assert g.finish_reason == "stop" and valid(SCHEMAS[name], text), (name, text)
        assert len(g.logprobs) == len(g.tokens) and all(lp <= 0 for lp in g.logprobs)
    assert mixed.wait(60) and mixed.tokens == alone.tokens


def test_a_seeded_guided_request_repeats_and_greedy_ones_agree(guided_engine, tiny_tokenizer):
    prompt = tiny_tokenizer.encode("Lists")
    schema = SCHEMAS["person"]
    runs = [guided_engine.submit(prompt, guided(schema, seed=11)) for _ in range(2)]
    runs += [guided_engine.submit(prompt, guided(schema, temperature=0.0)) for _ in range(2)]
    for g in runs:
        assert g.wait(60) and g.error is None and g.finish_reason == "stop"
    assert runs[0].tokens == runs[1].tokens and runs[2].tokens == runs[3].tokens


def test_preempted_guided_sequences_resume_their_grammar(tiny_tokenizer):
    """A cache of a few blocks preempts sequences mid-grammar: they resume and still parse, and give the tokens
    they give with room to spare."""
    model = context_model(TEXT_ARCH, seed=3)
    prompts = [tiny_tokenizer.encode(t) for t in ("The for statement", "Lists are", "A class", "The while loop")]
    schema = SCHEMAS["ten_properties"]
    outcomes = []
    for blocks in (None, 20):
        gpt = CachedGPT(model, TEXT_ARCH, max_slots=4, block_size=8, num_blocks=blocks)
        engine = Engine(gpt, tiny_tokenizer.vocab_size, tiny_tokenizer.eos_id, tokenizer=tiny_tokenizer).start()
        try:
            with engine._wake:
                rows = [engine.submit(p, guided(schema, seed=i, max_tokens=100)) for i, p in enumerate(prompts)]
            for g in rows:
                assert g.wait(120) and g.error is None, g.error
            outcomes.append([(g.tokens, g.finish_reason) for g in rows])
            preemptions = engine.stats.preemptions
        finally:
            engine.stop()
    assert preemptions > 0
    assert outcomes[0] == outcomes[1]
    for tokens, reason in outcomes[1]:
        assert reason != "stop" or valid(schema, tiny_tokenizer.decode(tokens))


def test_a_guide_the_engine_cannot_compile_is_refused_at_submit(guided_engine, tiny_tokenizer):
    with pytest.raises(InvalidRequest, match="guided_decoding_guide"):
        guided_engine.submit([5, 6], SamplingParams(max_tokens=5, guided_decoding_guide_type="regex",
                                                    guided_decoding_guide="(("))


def test_guides_need_a_tokenizer_with_text():
    with pytest.raises(InvalidRequest, match="guided_decoding_guide_type"):
        Grammars(NullTokenizer(100)).guide("regex", "a+")


@pytest.mark.parametrize("values, field", [
    ({"guided_decoding_guide_type": "yaml", "guided_decoding_guide": "x"}, "guided_decoding_guide_type"),
    ({"guided_decoding_guide": "{}"}, "guided_decoding_guide"),
    ({"guided_decoding_guide_type": "regex"}, "guided_decoding_guide"),
    ({"guided_decoding_guide_type": "regex", "guided_decoding_guide": "a" * (256 * 1024 + 1)},
     "guided_decoding_guide"),
])
def test_guide_fields_are_checked_before_compiling(values, field):
    with pytest.raises(InvalidRequest) as err:
        SamplingParams(max_tokens=4, **values).check(100, 3, 64)
    assert err.value.field == field


def test_json_needs_no_guide_text():
    SamplingParams(max_tokens=4, guided_decoding_guide_type="json").check(100, 3, 64)


def test_a_long_prompt_read_in_chunks_and_a_cancelled_guided_request(tiny_tokenizer):
    """A prompt over the step's budget is read in several chunks before its first guided token; a guided request
    cancelled mid-way ends at once and frees its blocks."""
    model = context_model(TEXT_ARCH, seed=3)
    engine = Engine(CachedGPT(model, TEXT_ARCH, max_slots=4), tiny_tokenizer.vocab_size, tiny_tokenizer.eos_id,
                    tokenizer=tiny_tokenizer, prefill_tokens=8).start()
    try:
        prompt = tiny_tokenizer.encode("The for statement is used to iterate over a sequence")
        assert 16 < len(prompt) < 40
        g = engine.submit(prompt, guided(SCHEMAS["two_types"], max_tokens=80, seed=5))
        assert g.wait(60) and g.error is None and g.finish_reason == "stop"
        assert valid(SCHEMAS["two_types"], tiny_tokenizer.decode(g.tokens))
        assert engine.stats.prompt_chunks >= 3
        endless = {"type": "array", "items": {"type": "integer"}, "minItems": 100}  # longer than max_tokens

        def cancel_at_the_third_token(g):  # the engine thread's listener: cancelled before the next step
            if len(g.tokens) == 3:
                engine.cancel(g)

        long = engine.submit(prompt, guided(endless, max_tokens=80, seed=1), listener=cancel_at_the_third_token)
        assert long.wait(30) and long.finish_reason == "cancelled" and len(long.tokens) == 3
        wait_until(lambda: engine.blocks.in_use() == 0, 10, "freed blocks")
    finally:
        engine.stop()


def test_a_guided_request_read_from_the_prefix_cache_gives_the_same_text(guided_engine, tiny_tokenizer):
    prompt = tiny_tokenizer.encode("The for statement is used to iterate over the elements of a sequence")
    assert len(prompt) >= guided_engine.blocks.block_size  # a full block to find
    params = guided(SCHEMAS["array_of_objects"], temperature=0.0, max_tokens=60)
    first = guided_engine.submit(prompt, params)
    assert first.wait(60) and first.error is None
    hits = guided_engine.blocks.hit_tokens
    second = guided_engine.submit(prompt, params)
    assert second.wait(60) and second.tokens == first.tokens and second.finish_reason == first.finish_reason
    assert guided_engine.blocks.hit_tokens > hits  # its prompt came from the cache


def test_a_grammar_past_the_parsers_limits_fails_its_request_naming_the_guide(guided_engine, tiny_tokenizer):
    """5,000 alternatives in one rule pass the compiler, but not the parser once a token is read: the request
    fails with the client's error naming its guide (a 400), in a few lines, and the engine serves on."""
    grammar = "root ::= " + " | ".join(f'"{i}"' for i in range(5000))
    g = guided_engine.submit([5, 6], SamplingParams(max_tokens=8, temperature=1.0, seed=0,
                                                    guided_decoding_guide_type="ebnf_grammar",
                                                    guided_decoding_guide=grammar))
    assert g.wait(60) and g.error.startswith("invalid input 'guided_decoding_guide'"), g.error
    assert "could not go on after 1 tokens: Parser Error: Current row has 5001 items" in g.error
    assert len(g.error) < 600 and "<state>" not in g.error
    after = guided_engine.submit([5, 6], guided(SCHEMAS["boolean"]))
    assert after.wait(60) and after.finish_reason == "stop"
