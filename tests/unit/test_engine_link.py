"""The engine and its serving side joined by a real socket (``engine_link``), both ends in this process.

What the serving process sees through a ``RemoteEngine`` must be what the engine did: the same tokens,
log-probs, finish reasons and text; cancellations and refusals must cross the link; and when rank 0 is gone,
nothing in flight may wait for ever.
"""

import socket
import time
from multiprocessing.connection import Connection

import pytest
import torch

from preprocessing.params import InvalidRequest, SamplingParams
from triton_backend.engine import Engine
from triton_backend.engine_link import EngineHost, RemoteEngine
from triton_backend.generation import EngineBusy
from triton_backend.gpt import CachedGPT, build_model, init_parallel

from .test_stream_coalescing import ARCH, run_streams


@pytest.fixture(scope="module")
def gpt():
    init_parallel(1, "cpu")
    torch.manual_seed(0)
    return CachedGPT(build_model(ARCH).eval(), ARCH, max_slots=8)


def new_engine(gpt, tokenizer):
    return Engine(gpt, tokenizer.vocab_size, tokenizer.eos_id, tokenizer=tokenizer).start()


@pytest.fixture(scope="module")
def engine(gpt, tiny_tokenizer):
    eng = new_engine(gpt, tiny_tokenizer)
    yield eng
    eng.stop()


def link(engine, tokenizer):
    """(host, remote, a duplicate of the host's socket to cut the link with)."""
    ours, theirs = socket.socketpair()
    cut = ours.dup()
    host = EngineHost(engine, Connection(ours.detach()))
    remote = RemoteEngine(Connection(theirs.detach()), tokenizer.vocab_size, engine.context, tokenizer)
    return host, remote, cut


def params(seed, **kw):
    return SamplingParams(**{"max_tokens": 24, "temperature": 1.0, "seed": seed, "end_id": -1, **kw})


def test_generations_through_the_link_are_the_engines_own(engine, tiny_tokenizer):
    _, remote, _ = link(engine, tiny_tokenizer)
    prompt = tiny_tokenizer.encode("the quick brown fox")
    asked = [params(s, return_log_probs=True) for s in range(4)]
    asked.append(params(9, max_tokens=60, stop_words=("e",)))  # stops early, on the engine and in the mirror
    linked = [remote.submit(prompt, p) for p in asked]  # all in flight at once
    assert all(g.wait(60) for g in linked)
    for g, p in zip(linked, asked):
        direct = engine.submit(prompt, p)
        assert direct.wait(60)
        assert g.error is None
        assert (g.tokens, g.finish_reason) == (direct.tokens, direct.finish_reason)
        assert g.logprobs == pytest.approx(direct.logprobs, abs=1e-4)  # other batch mates: other float sums
        assert g.first_token_at is not None and g.submitted <= g.first_token_at <= g.finished_at
    stopped, direct_stopped = linked[-1], engine.submit(prompt, asked[-1])
    direct_stopped.wait(60)
    assert stopped.finish_reason == "stop" and len(stopped.tokens) < 60
    assert stopped.tracker.stop_at == direct_stopped.tracker.stop_at is not None


def test_streams_through_the_link_carry_the_same_text(engine, tiny_tokenizer):
    _, remote, _ = link(engine, tiny_tokenizer)
    streams = run_streams(remote, tiny_tokenizer, n=3, responses_per_s=0)
    for seed, responses in enumerate(streams):
        unary = engine.submit(tiny_tokenizer.encode("the quick brown fox"), params(seed, max_tokens=48),
                              track_text=True)
        assert unary.wait(60)
        assert sum((ids for ids, _, _ in responses), []) == unary.tokens
        assert "".join(text for _, text, _ in responses) == unary.tracker.final_text
        assert responses[-1][2] == "length"


def test_invalid_requests_are_refused_on_the_serving_side(engine, tiny_tokenizer):
    _, remote, _ = link(engine, tiny_tokenizer)
    with pytest.raises(InvalidRequest, match="max_tokens"):
        remote.submit([5, 6], params(0, max_tokens=10_000))
    with pytest.raises(InvalidRequest, match="INPUT_IDS"):
        remote.submit([5, 10_000], params(0))


def test_a_cancellation_crosses_the_link_and_frees_the_slot(engine, tiny_tokenizer):
    _, remote, _ = link(engine, tiny_tokenizer)
    g = remote.submit([5, 6, 7], params(1, max_tokens=120))
    deadline = time.monotonic() + 30
    while not g.tokens and time.monotonic() < deadline:
        time.sleep(0.005)
    remote.cancel(g)
    assert g.wait(30) and g.finish_reason == "cancelled" and len(g.tokens) < 120
    deadline = time.monotonic() + 10
    while remote.load()["running"] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert remote.load()["running"] == remote.load()["waiting"] == 0


def test_a_draining_engine_refuses_through_the_link(gpt, tiny_tokenizer):
    engine = new_engine(gpt, tiny_tokenizer)
    try:
        _, remote, _ = link(engine, tiny_tokenizer)
        assert engine.drain(1.0)
        g = remote.submit([5, 6], params(0))
        assert g.wait(10) and "shutting down" in g.error
    finally:
        engine.stop()


def test_when_rank_0_is_gone_nothing_waits_for_ever(gpt, tiny_tokenizer):
    engine = new_engine(gpt, tiny_tokenizer)
    try:
        _, remote, cut = link(engine, tiny_tokenizer)
        g = remote.submit([5, 6], params(0, max_tokens=120))
        cut.shutdown(socket.SHUT_RDWR)  # as when rank 0's process ends
        assert g.wait(10) and g.error == "the server is shutting down"
        assert remote.stopped.wait(10)
        with pytest.raises(EngineBusy, match="shutting down"):
            remote.submit([5, 6], params(0))
    finally:
        engine.stop()
