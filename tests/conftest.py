"""Fixtures shared by unit and functional tests."""

import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    """A small sentencepiece model trained like the demo's (byte fallback, lossless), in a second or two."""
    from preprocessing.tokenization import load_path
    from tools.demo_model import corpus, train_tokenizer

    out = tmp_path_factory.mktemp("tok")
    return load_path(train_tokenizer(corpus()[:200], out, vocab_size=400, seed=0))


@pytest.fixture(scope="session")
def dummy_prefix_tokenizer(tmp_path_factory):
    """A Llama-style tokenizer (dummy prefix, whitespace normalisation) to test decoding rules against."""
    import io

    import sentencepiece as spm

    from preprocessing.tokenization import load_path
    from tools.demo_model import corpus

    model = io.BytesIO()
    lines = [line for text in corpus()[:200] for line in text.splitlines() if line.strip()]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=model, vocab_size=400,
                                   model_type="bpe", byte_fallback=True, minloglevel=2, num_threads=1)
    path = tmp_path_factory.mktemp("tok_llama") / "tokenizer.model"
    path.write_bytes(model.getvalue())
    return load_path(path)


def pytest_collection_modifyitems(config, items):
    """Under `make mutate`, run a mutant's tests cheapest first, so the usual killer ends the run early.

    mutmut hands each mutant the tests that reach the mutated function as an unordered set and stops at the
    first failure (`-x`); the durations it recorded for the clean run (`mutmut-stats.json`, in the `mutants/`
    folder it runs from) put the one-millisecond unit tests before the engine runs of several seconds.
    Outside a mutation run (no `MUTANT_UNDER_TEST`) the order is the files' own.
    """
    import json
    import os

    stats = pathlib.Path("mutmut-stats.json")
    if not os.environ.get("MUTANT_UNDER_TEST") or not stats.is_file():
        return
    seconds = json.loads(stats.read_text()).get("duration_by_test", {})
    items.sort(key=lambda item: seconds.get(item.nodeid, 0.0))
