import pytest

TEXTS = ["Hello world", "  two  spaces\n\nnew lines\ttab", "emoji 🙂 and CJK 漢字", "def f(x):\n    return x"]


@pytest.mark.parametrize("text", TEXTS)
def test_demo_style_tokenizer_round_trips_any_text(tiny_tokenizer, text):
    assert tiny_tokenizer.decode(tiny_tokenizer.encode(text)) == text


def test_special_ids(tiny_tokenizer):
    assert tiny_tokenizer.eos_id == 2 and tiny_tokenizer.pad_id == 3
    assert tiny_tokenizer.vocab_size == 400


@pytest.mark.parametrize("fixture", ["tiny_tokenizer", "dummy_prefix_tokenizer"])
@pytest.mark.parametrize("split", [1, 2, 3, 5])
def test_continuation_matches_decoding_the_whole_sequence(request, fixture, split):
    tok = request.getfixturevalue(fixture)
    ids = tok.encode("The quick brown fox jumps over the lazy dog. A for loop")
    prompt, new = ids[:split], ids[split:]
    assert tok.decode(prompt) + tok.decode_continuation(prompt, new) == tok.decode(ids)


def test_dummy_prefix_keeps_the_leading_space_of_a_continuation(dummy_prefix_tokenizer):
    tok = dummy_prefix_tokenizer
    prompt, new = tok.encode("Hello"), tok.encode("world")
    assert tok.decode(new) == "world"  # decoded alone, sentencepiece drops the space...
    assert tok.decode_continuation(prompt, new) == " world"  # ...which follows "Hello" in the sequence


def test_missing_model_is_a_clear_error(tmp_path):
    from preprocessing.tokenizer import Tokenizer

    with pytest.raises(FileNotFoundError, match="sentencepiece model not found"):
        Tokenizer(tmp_path / "nope.model")
