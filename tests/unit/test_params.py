import math

import pytest

from preprocessing.params import InvalidRequest, SamplingParams, from_tensors

VOCAB, CONTEXT = 100, 32


def check(prompt_tokens=4, **kw):
    SamplingParams(**{"max_tokens": 8, **kw}).check(VOCAB, prompt_tokens, CONTEXT)


def test_defaults_pass():
    check()


@pytest.mark.parametrize(
    "field, value, rule",
    [
        ("max_tokens", 0, "between 1 and 28"),
        ("max_tokens", 29, "between 1 and 28"),
        ("min_length", 9, "between 0 and max_tokens"),
        ("min_length", -1, "between 0 and max_tokens"),
        ("end_id", -2, "-1"),
        ("end_id", VOCAB, "below 100"),
        ("temperature", -0.1, ">= 0"),
        ("temperature", math.nan, "finite"),
        ("top_k", -1, "between 0"),
        ("top_k", VOCAB + 1, "vocabulary size"),
        ("top_p", 0.0, "(0, 1]"),
        ("top_p", 2.0, "(0, 1]"),
        ("top_p", math.inf, "finite"),
        ("repetition_penalty", 0.0, "> 0"),
        ("presence_penalty", math.nan, "finite"),
        ("top_p_decay", 1.5, "between 0 (off) and 1"),
        ("top_p_bound", -0.1, "between 0 (off) and 1"),
        ("top_p_bound", math.nan, "finite"),
    ],
)
def test_each_rule_names_field_value_and_rule(field, value, rule):
    with pytest.raises(InvalidRequest) as err:
        check(**{field: value})
    assert err.value.field == field
    assert f"'{field}'" in str(err.value) and rule in str(err.value)


def test_prompt_rules_name_text_input():
    with pytest.raises(InvalidRequest, match="'text_input'.*must not be empty"):
        check(prompt_tokens=0)
    with pytest.raises(InvalidRequest, match="'text_input'.*shorter than the model context"):
        check(prompt_tokens=CONTEXT)


def test_prompt_plus_max_tokens_beyond_context_names_max_tokens():
    with pytest.raises(InvalidRequest) as err:
        check(prompt_tokens=30, max_tokens=3)
    assert err.value.field == "max_tokens"


def test_from_tensors_reads_types_and_defaults():
    import numpy as np

    p = from_tensors({"max_tokens": np.int32(5), "temperature": np.float32(0.5), "seed": np.uint64(2**64 - 1),
                      "return_log_probs": np.bool_(True)})
    assert (p.max_tokens, p.temperature, p.seed, p.return_log_probs) == (5, 0.5, 2**64 - 1, True)
    assert p.top_k == 0 and p.top_p == 1.0 and p.end_id is None
    with pytest.raises(InvalidRequest, match="'MAX_TOKENS'.*required"):
        from_tensors({}, upper=True)
