"""Cancellation, the age limit and draining, on the real engine over a small random Megatron GPT."""

import threading
import time

import pytest
import torch

from preprocessing.params import SamplingParams
from triton_backend.engine.engine import Engine, EngineBusy
from triton_backend.model.gpt import CachedGPT
from triton_backend.serving.control import ControlChannel, ControlClient

from .models import ARCH, EOS, VOCAB, context_model, wait_until

LONG = SamplingParams(max_tokens=60, end_id=-1)


@pytest.fixture(scope="module")
def gpt():
    return CachedGPT(context_model(ARCH), ARCH, max_slots=2)


@pytest.fixture
def start_engine(gpt):
    """Starts engines over the shared model (or ``model``); all are stopped after the test."""
    engines = []

    def start(model=None, **kwargs) -> Engine:
        engines.append(Engine(model or gpt, VOCAB, EOS, **kwargs).start())
        return engines[-1]

    yield start
    for engine in engines:
        engine.stop()


def slow_listener(seconds: float):
    """Makes every step take a while, so that a test can act while requests are in flight."""
    return lambda g: time.sleep(seconds)


def test_cancel_frees_running_and_waiting_requests(start_engine):
    engine = start_engine()
    running = [engine.submit([5, 6, 7], LONG, listener=slow_listener(0.01)) for _ in range(2)]
    waiting = engine.submit([5, 6, 7], LONG)  # two slots: this one waits
    wait_until(lambda: running[0].tokens, what="a first token")
    for g in [*running, waiting]:
        engine.cancel(g)
    for g in [*running, waiting]:
        assert g.wait(10)
        assert g.finish_reason == "cancelled" and g.error is None
        assert len(g.tokens) < LONG.max_tokens
    assert engine.load() == {"running": 0, "waiting": 0, "kv_blocks_used": 0, "kv_usage": 0.0, "cancelled": 3,
                             "prefix_queried_tokens": 6, "prefix_hit_tokens": 0}
    after = engine.submit([5, 6, 7], SamplingParams(max_tokens=5, end_id=-1))  # the slots are free again
    assert after.wait(10) and after.finish_reason == "length"


def test_requests_over_the_age_limit_get_an_error(start_engine):
    engine = start_engine(max_request_s=0.2)
    g = engine.submit([5, 6, 7], SamplingParams(max_tokens=60, end_id=-1), listener=slow_listener(0.05))
    assert g.wait(10)
    assert "longer than the server's limit of 0.2 s" in g.error
    assert engine.load()["running"] == 0


def test_drain_finishes_what_is_in_flight_and_refuses_new_requests(start_engine):
    engine = start_engine()
    g = engine.submit([5, 6, 7], SamplingParams(max_tokens=20, end_id=-1), listener=slow_listener(0.01))
    result = {}
    drainer = threading.Thread(target=lambda: result.setdefault("drained", engine.drain(30)))
    drainer.start()
    time.sleep(0.05)
    with pytest.raises(EngineBusy, match="shutting down"):
        engine.submit([5], SamplingParams(max_tokens=2))
    drainer.join(30)
    assert result["drained"] is True
    assert g.done and g.error is None and len(g.tokens) == 20


def test_drain_gives_up_after_the_grace_period(start_engine):
    engine = start_engine()
    g = engine.submit([5, 6, 7], SamplingParams(max_tokens=60, end_id=-1), listener=slow_listener(0.05))
    started = time.monotonic()
    assert engine.drain(0.3) is False
    assert time.monotonic() - started < 5
    engine.stop()
    assert g.done and g.error == "the server is shutting down"


def test_control_channel_cancels_by_key_and_reports_load(start_engine, tmp_path):
    engine = start_engine()
    channel = ControlChannel(tmp_path / "c.sock", engine)
    client = ControlClient(channel.path, timeout_s=2.0)
    try:
        g = engine.submit([5, 6, 7], LONG, listener=slow_listener(0.01))
        channel.register("stream-7", g)
        wait_until(lambda: g.tokens, what="a first token")
        assert client.load()["running"] == 1
        client.cancel("stream-unknown")  # ignored
        client.cancel("stream-7")
        assert g.wait(10) and g.finish_reason == "cancelled"
        assert client.load() == {"running": 0, "waiting": 0, "kv_blocks_used": 0, "kv_usage": 0.0, "cancelled": 1,
                                    "prefix_queried_tokens": 3, "prefix_hit_tokens": 0}
    finally:
        client.close()
        channel.close()
    assert not channel.path.exists()


def test_control_client_without_a_server_answers_none(tmp_path):
    client = ControlClient(tmp_path / "nobody.sock", timeout_s=0.1)
    try:
        client.cancel("x")  # no exception: rank 0 may not listen yet
        assert client.load() is None
    finally:
        client.close()


class Recording:
    """The real model, plus a ``method`` (``shutdown``, ``heartbeat``) that counts its calls and raises ``error``
    when ``fail``."""

    def __init__(self, gpt, method: str, error: Exception, fail: bool):
        self.gpt, self.method, self.error, self.fail, self.calls = gpt, method, error, fail, 0

    def __getattr__(self, name):
        if name == self.method:
            return self._call
        return getattr(self.gpt, name)

    def _call(self):
        self.calls += 1
        if self.fail:
            raise self.error


class FailingOnce:
    """The real model, except that one forward raises the way a CUDA out-of-memory does."""

    def __init__(self, gpt, fail_on_call: int):
        self.gpt, self.calls, self.fail_on_call = gpt, 0, fail_on_call

    def __getattr__(self, name):
        return getattr(self.gpt, name)

    def step(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.fail_on_call:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return self.gpt.step(*args, **kwargs)


def test_a_failed_step_fails_its_rows_and_the_engine_goes_on(gpt, start_engine):
    engine = start_engine(FailingOnce(gpt, fail_on_call=3))
    victim = engine.submit([5, 6, 7], SamplingParams(max_tokens=10, end_id=-1))
    assert victim.wait(10)
    assert victim.error.startswith("generation failed: OutOfMemoryError")
    assert engine.stats.requests_failed == 1
    after = engine.submit([5, 6, 7], SamplingParams(max_tokens=10, end_id=-1))
    assert after.wait(10) and after.error is None and len(after.tokens) == 10
    assert engine.fatal is None and engine.load()["running"] == 0


def test_a_row_that_breaks_sampling_fails_alone(gpt, start_engine, monkeypatch):
    """When sampling a step raises because of one row, that request fails and the others in the step get exactly
    the tokens they get without it."""
    import triton_backend.engine.outputs as engine_module

    real_sample = engine_module.sample
    poison = 0.123  # the broken request's temperature

    def sample(logits, rows, vocab_size):
        result = real_sample(logits, rows, vocab_size)  # every row has drawn its number when it fails
        if any(r.params.temperature == pytest.approx(poison) for r in rows):
            raise RuntimeError("index -1 is out of bounds (injected)")
        return result

    params = SamplingParams(max_tokens=12, end_id=-1, temperature=1.0, seed=3)
    alone = start_engine().submit([5, 6, 7], params)
    assert alone.wait(10) and alone.error is None
    monkeypatch.setattr(engine_module, "sample", sample)
    engine = start_engine()
    with engine._wake:  # one step for all three: the broken row between two others, sampled again one by one
        other = engine.submit([5, 6, 7], params)
        broken = engine.submit([9, 9], SamplingParams(max_tokens=12, end_id=-1, temperature=poison))
        third = engine.submit([5, 6, 7], params)
    assert broken.wait(10) and broken.error.startswith("generation failed: RuntimeError: index -1")
    for g in (other, third):
        assert g.wait(10) and g.error is None
        assert g.tokens == alone.tokens
        assert g.logprobs == pytest.approx(alone.logprobs, abs=1e-4)
    assert engine.stats.steps_sampled_again == 1
    again = engine.submit([9, 9], SamplingParams(max_tokens=12, end_id=-1, temperature=poison))
    assert again.wait(10) and again.error and engine.stats.steps_sampled_again == 2
    assert engine.load()["running"] == 0


def test_an_exception_outside_a_step_ends_the_engine_and_says_why(start_engine):
    """A step hook that raises (as a broken listener or admission would) must not leave a live-looking engine."""
    engine = start_engine()
    boom = RuntimeError("hook failed (injected)")
    armed = threading.Event()

    def hook():
        if armed.is_set():
            raise boom

    engine.add_step_hook(hook)
    ok = engine.submit([5, 6, 7], SamplingParams(max_tokens=3, end_id=-1))
    assert ok.wait(10) and ok.error is None
    g = engine.submit([5, 6, 7], LONG, listener=slow_listener(0.01))
    wait_until(lambda: g.tokens, what="a first token")
    armed.set()
    assert engine.ended.wait(10)
    assert engine.fatal is boom and not engine.alive()
    assert g.wait(10) and g.error == "the engine failed: hook failed (injected)"
    with pytest.raises(EngineBusy, match="shutting down"):
        engine.submit([5], SamplingParams(max_tokens=2))


def test_a_cancelled_request_whose_listener_raises_ends_the_engine(start_engine):
    """Listeners of retired requests run between steps (``_end_abandoned``): a failure there is the engine's."""
    engine = start_engine()
    calls = []

    def listener(g):
        calls.append(g.finish_reason)
        if g.finish_reason == "cancelled":
            raise ValueError("listener failed (injected)")
        time.sleep(0.01)

    g = engine.submit([5, 6, 7], LONG, listener=listener)
    wait_until(lambda: g.tokens, what="a first token")
    engine.cancel(g)
    assert engine.ended.wait(10)
    assert isinstance(engine.fatal, ValueError) and "cancelled" in calls


def test_a_unary_request_past_its_timeout_is_cancelled_and_frees_its_slot(start_engine):
    import numpy as np

    from triton_backend.serving.binding import make_infer

    engine = start_engine()
    infer = make_infer(engine, timeout_s=0.2)
    engine.add_step_hook(lambda: time.sleep(0.01))  # 60 tokens take longer than the timeout
    request = {"INPUT_IDS": np.array([[5, 6, 7]], np.int32), "INPUT_LENGTH": np.array([[3]], np.int32),
               "MAX_TOKENS": np.array([[60]], np.int32), "END_ID": np.array([[-1]], np.int32)}
    out = infer([request])[0]
    assert out["ERROR"][0, 0] == b"no result within 0.2 s"
    wait_until(lambda: engine.load()["running"] == 0, what="the slot to be freed")
    assert engine.load()["cancelled"] == 1 and engine.stats.tokens_generated < 60


def test_a_full_queue_refuses_by_count_and_a_stopping_engine_by_name(start_engine):
    engine = start_engine(max_queue=2)
    with engine._wake:  # the engine cannot admit meanwhile: both wait
        engine.submit([5, 6], SamplingParams(max_tokens=2))
        engine.submit([5, 6], SamplingParams(max_tokens=2))
        with pytest.raises(EngineBusy) as err:
            engine.submit([5, 6], SamplingParams(max_tokens=2))
    assert str(err.value) == "2 requests are already waiting; retry later"
    engine.stop()
    with pytest.raises(EngineBusy) as err:
        engine.submit([5], SamplingParams(max_tokens=2))
    assert str(err.value) == "the server is shutting down and takes no new requests"


def test_a_waiting_request_cancelled_or_over_age_leaves_the_others_waiting(start_engine):
    """Two slots, four requests: of the two waiting, one is cancelled and one is not; the other runs in full. Then
    with an age limit, a waiting request past it gets the error while a short one finishes."""
    engine = start_engine()
    hold = threading.Event()
    engine.add_step_hook(lambda: hold.wait(10))
    running = [engine.submit([5, 6, 7], SamplingParams(max_tokens=3, end_id=-1)) for _ in range(2)]
    kept, cancelled = (engine.submit([5, 6, 7], SamplingParams(max_tokens=3, end_id=-1)) for _ in range(2))
    wait_until(lambda: all(g.tokens for g in running), what="two running")
    engine.cancel(cancelled)
    hold.set()
    for g in (*running, cancelled, kept):
        assert g.wait(10)
    assert cancelled.finish_reason == "cancelled" and cancelled.tokens == [] and cancelled.finished_at is not None
    assert kept.error is None and kept.finish_reason == "length" and len(kept.tokens) == 3
    assert engine.stats.requests_cancelled == 1 and engine.stats.requests_finished == 3


def test_the_age_limit_spares_requests_that_finish_in_time(start_engine):
    engine = start_engine(max_request_s=30)
    g = engine.submit([5, 6, 7], SamplingParams(max_tokens=5, end_id=-1))
    assert g.wait(10) and g.error is None and g.finish_reason == "length"


def test_a_request_waiting_past_the_age_limit_gets_the_error(start_engine):
    engine = start_engine(max_request_s=0.3)
    engine.add_step_hook(lambda: time.sleep(0.01))
    hogs = [engine.submit([5, 6, 7], SamplingParams(max_tokens=60, end_id=-1)) for _ in range(2)]
    late = engine.submit([5, 6, 7], SamplingParams(max_tokens=2, end_id=-1))  # no slot until the hogs end
    # Submitted microseconds after the hogs, it may be a step younger than them when they are ended: then it
    # runs that one step (one token) before its own age ends it.
    assert late.wait(10) and len(late.tokens) <= 1
    assert late.error == "the request ran longer than the server's limit of 0.3 s" and late.finish_reason is None
    for g in hogs:
        assert g.wait(10) and g.finish_reason is None and "longer than" in g.error
    assert engine.stats.requests_failed == 3


def test_drain_returns_as_soon_as_the_last_request_ends(start_engine):
    """``drain`` is woken by the last retirement, not by its grace period running out."""
    engine = start_engine()
    g = engine.submit([5, 6, 7], SamplingParams(max_tokens=5, end_id=-1))
    result = {}
    drainer = threading.Thread(target=lambda: result.setdefault("drained", engine.drain(120)))
    drainer.start()
    drainer.join(30)  # a liveness bound far inside the grace: a drain that waited for it would still be here
    assert result == {"drained": True} and g.done


def test_drain_returns_when_the_last_request_leaves_the_queue_without_running(start_engine):
    """A request cancelled while it waits, the only one left: ``drain`` is woken when it leaves the queue (it
    never runs, so no retirement wakes it), not by its grace period running out. A step hook on the engine thread
    queues and cancels it, then holds the engine until ``drain`` is waiting."""
    engine = start_engine()
    queued, result, held = [], {}, threading.Event()
    drainer = threading.Thread(target=lambda: result.setdefault("drained", engine.drain(120)))

    def hook():
        if queued or not first.done:
            return
        queued.append(engine.submit([5, 6, 7], SamplingParams(max_tokens=5, end_id=-1)))
        engine.cancel(queued[0])
        drainer.start()
        wait_until(lambda: engine._closing, what="drain to begin")
        with engine._wake:  # taken once drain waits (it holds the lock until then)
            assert engine._waiting and not engine._running
        held.set()

    first = engine.submit([5, 6, 7], SamplingParams(max_tokens=1, end_id=-1))
    engine.add_step_hook(hook)
    assert first.wait(10)
    assert held.wait(10)
    drainer.join(30)  # a liveness bound far inside the grace: a drain that waited for it would still be here
    assert result == {"drained": True}
    assert queued[0].done and queued[0].finish_reason == "cancelled" and queued[0].tokens == []


def test_the_engine_thread_runs_on_its_cores_and_shuts_its_model_down(gpt, start_engine):
    import os

    core = min(os.sched_getaffinity(0))
    model = Recording(gpt, "shutdown", RuntimeError("shutdown failed (injected)"), fail=False)
    engine = start_engine(model, cpus={core})
    g = engine.submit([5, 6, 7], SamplingParams(max_tokens=3, end_id=-1))
    assert g.wait(10)
    assert os.sched_getaffinity(engine._thread.native_id) == {core}
    engine.stop()
    assert model.calls == 1 and engine.fatal is None
    failing = Recording(gpt, "shutdown", RuntimeError("shutdown failed (injected)"), fail=True)
    engine = start_engine(failing)
    engine.stop()
    assert failing.calls == 1 and str(engine.fatal) == "shutdown failed (injected)"


def test_an_engine_built_with_the_defaults_has_no_age_limit_and_the_documented_bounds(gpt):
    engine = Engine(gpt, VOCAB, EOS)
    assert (engine.max_queue, engine.prefill_tokens, engine.max_request_s) == (1024, 128, 0.0)
    assert engine.failures_fatal is False and engine.cpus is None and engine.tokenizer is None


def test_an_idle_engine_beats_its_heart_and_a_failed_beat_ends_it(gpt, start_engine):
    healthy = Recording(gpt, "heartbeat", TimeoutError("a follower is gone (injected)"), fail=False)
    engine = Engine(healthy, VOCAB, EOS)
    engine.HEARTBEAT_S = 0.02
    engine.start()
    try:
        wait_until(lambda: healthy.calls >= 3, what="three heartbeats")
        assert engine.alive() and engine.fatal is None
        assert engine._thread.name == "engine" and engine._thread.daemon
    finally:
        engine.stop()
    broken = Recording(gpt, "heartbeat", TimeoutError("a follower is gone (injected)"), fail=True)
    engine = Engine(broken, VOCAB, EOS)
    engine.HEARTBEAT_S = 0.02
    engine.start()
    assert engine.ended.wait(10) and str(engine.fatal) == "a follower is gone (injected)"


def test_a_failed_step_fails_every_row_in_it_and_counts_its_time(gpt, start_engine):
    engine = start_engine(FailingOnce(gpt, fail_on_call=2))
    started = time.monotonic()
    with engine._wake:  # both in the step that fails
        victims = [engine.submit([5, 6, 7], SamplingParams(max_tokens=10, end_id=-1)) for _ in range(2)]
    for g in victims:
        assert g.wait(10) and g.error.startswith("generation failed: OutOfMemoryError")
    assert engine.stats.requests_failed == 2 and not engine.stalled(0.0)
    assert 0 < engine.stats.step_seconds <= time.monotonic() - started


class SlowSteps:
    """The real model, each forward pass taking at least ``seconds`` more."""

    def __init__(self, gpt, seconds: float):
        self.gpt, self.seconds = gpt, seconds

    def __getattr__(self, name):
        return getattr(self.gpt, name)

    def step(self, *args, **kwargs):
        time.sleep(self.seconds)
        return self.gpt.step(*args, **kwargs)


def test_the_busy_time_sums_every_step(gpt, start_engine):
    """``step_seconds`` adds up the steps: six steps of at least 20 ms each are at least 120 ms (bounds that the
    sleeps set, whatever the machine's speed)."""
    engine = start_engine(SlowSteps(gpt, 0.02))
    started = time.monotonic()
    g = engine.submit([5, 6, 7], SamplingParams(max_tokens=6, end_id=-1))
    assert g.wait(10) and engine.stats.steps == 6
    # the request is done inside its last step; that step's time is added once the step ends
    wait_until(lambda: engine.step_started is None, what="the last step to end")
    assert 6 * 0.02 <= engine.stats.step_seconds <= time.monotonic() - started


class RaisingOnce(FailingOnce):
    """The real model, except that one forward raises ``error``."""

    def __init__(self, gpt, fail_on_call: int, error: BaseException):
        super().__init__(gpt, fail_on_call)
        self.error = error

    def step(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.fail_on_call:
            raise self.error
        return self.gpt.step(*args, **kwargs)


@pytest.mark.parametrize("error, fatal", [
    (torch.AcceleratorError("CUDA error: device-side assert triggered (injected)"), True),
    (RuntimeError("CUDA error: an illegal memory access was encountered (injected)"), True),
    (RuntimeError("index -1 is out of bounds (injected)"), False),
    (torch.OutOfMemoryError("CUDA out of memory (injected)"), False)], ids=lambda v: type(v).__name__)
def test_a_device_error_other_than_out_of_memory_ends_the_engine_at_one_rank_too(gpt, start_engine, error, fatal):
    """A CUDA error but out of memory leaves the device unusable (every later call fails): the engine ends, and
    with it readiness and the job, where any other failed step fails its rows and the engine goes on."""
    engine = start_engine(RaisingOnce(gpt, 1, error))  # failures_fatal=False: one rank
    g = engine.submit([5, 6, 7], SamplingParams(max_tokens=10, end_id=-1))
    assert g.wait(10) and g.error.startswith(f"generation failed: {type(error).__name__}")
    if fatal:
        assert engine.ended.wait(10) and engine.fatal is error
    else:
        after = engine.submit([5, 6, 7], SamplingParams(max_tokens=10, end_id=-1))
        assert after.wait(10) and after.error is None and engine.fatal is None


def test_with_failures_fatal_a_failed_step_ends_the_engine(gpt, start_engine):
    engine = start_engine(FailingOnce(gpt, fail_on_call=1), failures_fatal=True)
    g = engine.submit([5, 6, 7], SamplingParams(max_tokens=10, end_id=-1))
    assert g.wait(10) and g.error.startswith("generation failed: OutOfMemoryError")
    assert engine.ended.wait(10) and isinstance(engine.fatal, torch.OutOfMemoryError)
