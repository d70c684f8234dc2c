"""The engine and its serving side joined by a real socket (``engine_link``), both ends in this process.

What the serving process sees through a ``RemoteEngine`` must be what the engine did: the same tokens,
log-probs, finish reasons and text; cancellations and refusals must cross the link; and when rank 0 is gone,
nothing in flight may wait for ever.
"""

import json
import socket
from multiprocessing.connection import Connection

import pytest

from preprocessing.params import InvalidRequest, SamplingParams
from triton_backend.engine.engine import Engine
from triton_backend.engine.generation import EngineBusy
from triton_backend.model.gpt import CachedGPT
from triton_backend.serving.engine_link import EngineHost, RemoteEngine

from .models import context_model, wait_until
from .test_stream_coalescing import ARCH, run_streams


@pytest.fixture(scope="module")
def gpt():
    return CachedGPT(context_model(ARCH), ARCH, max_slots=8)


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
    whole = engine.submit(prompt, params(9, max_tokens=60), track_text=True)
    assert whole.wait(60)
    stop = whole.tracker.final_text[20:22]  # text this request generates: it stops early, on both sides
    assert stop.strip()
    asked.append(params(9, max_tokens=60, stop_words=(stop,)))
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
    wait_until(lambda: g.tokens, 30, "a first token")
    remote.cancel(g)
    assert g.wait(30) and g.finish_reason == "cancelled" and len(g.tokens) < 120
    wait_until(lambda: remote.load()["running"] == remote.load()["waiting"] == 0, 10, "an empty engine")


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


def stalled_link(engine, **host_args):
    """A host whose serving process never reads: its socket buffers are tiny, so sending soon blocks."""
    ours, theirs = socket.socketpair()
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    theirs.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    host = EngineHost(engine, Connection(ours.detach()), **host_args)
    return host, Connection(theirs.detach())


def test_a_serving_process_that_reads_nothing_does_not_hold_the_engine_back(gpt, tiny_tokenizer):
    engine = new_engine(gpt, tiny_tokenizer)
    try:
        host, serving_end = stalled_link(engine)
        for key in range(4):  # what a serving process would send; the updates it is sent are never read
            serving_end.send(("submit", key, [5, 6, 7], params(key, max_tokens=100)))
        wait_until(lambda: engine.stats.requests_finished == 4, 60, "the four requests to finish")
        assert engine.stats.tokens_generated == 400 and engine.fatal is None
        assert host._outbox.qsize() > 0  # the updates are waiting for the reader, not the engine
    finally:
        engine.stop()


def test_when_the_hand_over_stays_full_the_engine_fails_instead_of_waiting_for_ever(gpt, tiny_tokenizer):
    engine = new_engine(gpt, tiny_tokenizer)
    try:
        _, serving_end = stalled_link(engine, handover_steps=4, handover_timeout_s=0.3)
        serving_end.send(("submit", 0, [5, 6, 7], params(0, max_tokens=100)))
        assert engine.ended.wait(30)
        assert isinstance(engine.fatal, TimeoutError) and "has not read" in str(engine.fatal)
    finally:
        engine.stop()


def test_a_guide_being_compiled_holds_no_other_request_and_may_be_cancelled_first(engine, tiny_tokenizer):
    """A schema that takes a while to compile compiles beside the link: a request sent after it is served
    meanwhile, and a cancellation that comes before the guide is compiled still ends it."""
    _, remote, _ = link(engine, tiny_tokenizer)
    big = json.dumps({"type": "object", "properties": {f"property_{i}": {"type": "integer"} for i in range(3000)}})
    slow = remote.submit([5, 6], params(0, guided_decoding_guide_type="json_schema", guided_decoding_guide=big))
    quick = remote.submit([5, 6], params(1, max_tokens=4))
    assert quick.wait(30) and quick.error is None
    assert not engine.grammars.has("json_schema", big)  # served while the guide was still compiling
    remote.cancel(slow)
    assert slow.wait(60) and slow.finish_reason == "cancelled" and not slow.tokens
    bad = remote.submit([5, 6], params(2, guided_decoding_guide_type="regex", guided_decoding_guide="(("))
    assert bad.wait(30) and "guided_decoding_guide" in bad.error and "does not compile" in bad.error
