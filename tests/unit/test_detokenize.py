"""Incremental text: stop words across token boundaries, and what is safe to stream."""

import pytest

from preprocessing.detokenize import TextTracker


def feed(tok, text, stop_words=(), prompt="Q:"):
    tracker = TextTracker(tok, tok.encode(prompt), tuple(stop_words))
    stables = []
    for token in tok.encode(text):
        stopped = tracker.add(token)
        stables.append(tracker.final_text[: tracker.stable_length(False)] if not stopped else None)
        if stopped:
            break
    return tracker, stables


def test_stop_word_spanning_tokens_cuts_the_text_before_it(tiny_tokenizer):
    text = "the quick brown fox jumps over"
    assert len(tiny_tokenizer.encode("brown fox")) > 1
    tracker, _ = feed(tiny_tokenizer, text, ["own fo"])
    assert tracker.stop_at is not None and tracker.final_text == "the quick br"
    assert tiny_tokenizer.decode(tracker.ids) != text  # generation stopped early


def test_no_stop_word_keeps_everything(tiny_tokenizer):
    tracker, _ = feed(tiny_tokenizer, "plain text", ["zzz"])
    assert tracker.stop_at is None and tracker.final_text == "plain text"


def test_streamed_text_never_shows_a_partial_character_or_a_possible_stop_word(tiny_tokenizer):
    text = "emoji 🙂 then CJK 漢字 and END of it"
    tracker, stables = feed(tiny_tokenizer, text, ["END"])
    assert tracker.final_text == "emoji 🙂 then CJK 漢字 and "
    for stable in stables[:-1]:
        assert "\ufffd" not in stable
        assert not stable.endswith(("E", "EN"))
        assert tracker.final_text.startswith(stable)  # streamed text is never taken back
    assert len({s for s in stables if s is not None}) > 3  # it did stream along the way


@pytest.mark.parametrize("fixture", ["tiny_tokenizer", "dummy_prefix_tokenizer"])
def test_incremental_text_equals_decoding_everything(request, fixture):
    tok = request.getfixturevalue(fixture)
    text = "Long text 🙂🙂 with 漢字, newlines\n\n  and spaces; " * 6
    prompt = tok.encode("A prompt:")
    tracker = TextTracker(tok, prompt, ("never there",))
    for i, token in enumerate(tok.encode(text)):
        assert not tracker.add(token)
        assert tracker.text == tok.decode_continuation(prompt, tracker.ids), f"after token {i}"
    assert tracker.stop_at is None


def test_a_stop_word_completed_late_is_found(tiny_tokenizer):
    tracker, _ = feed(tiny_tokenizer, "x" * 40 + " STOPWORD tail", ["STOPWORD"])
    assert tracker.final_text == "x" * 40 + " "
