"""A step that fails on rank 0 (an out-of-memory injected by ``faulty_server.py``), served for real.

At TP=1 the requests in that step get an error naming the exception and the server goes on serving exactly as
before; at TP>1 the ranks may disagree after a failed step, so the job must exit non-zero instead of hanging.
"""

from __future__ import annotations

import time

import psutil
import pytest

from client import GenerationClient, GenerationError
from tools.soak import llm_metrics

from .conftest import job_processes, shm_segments, start_server, stop_server

FAULTY = "tests.functional.faulty_server"
PROBE, GREEDY = "The for statement", dict(max_tokens=24, temperature=0.0, end_id=-1)


@pytest.fixture(scope="module")
def faulty(tmp_path_factory):
    """One TP=1 faulty server for the module: the failed-step test leaves it serving, the last test kills it."""
    tmp = tmp_path_factory.mktemp("faulty")
    server = start_server(tmp / "tp1", module=FAULTY, FAULT_FILE=str(tmp / "fail-next-step"),
                          HOOK_FAULT_FILE=str(tmp / "fail-next-pass"))
    yield server, tmp
    stop_server(server)


def test_a_failed_step_fails_its_requests_and_the_server_goes_on(faulty):
    server, tmp = faulty
    trigger = tmp / "fail-next-step"
    with GenerationClient(server.grpc, "grpc") as c:
        before = c.generate(PROBE, **GREEDY).text
    for protocol, url, want in (("http", server.http, 503), ("grpc", server.grpc, "StatusCode.UNAVAILABLE")):
        trigger.touch()
        with GenerationClient(url, protocol) as c, pytest.raises(GenerationError, match="OutOfMemoryError") as err:
            c.generate(PROBE, **GREEDY)
        assert str(err.value.status) == str(want), err.value.status  # the server's fault, not the client's
        assert not trigger.exists()
    trigger.touch()
    with GenerationClient(server.grpc, "grpc") as c, pytest.raises(GenerationError, match="OutOfMemoryError"):
        list(c.stream(PROBE, **GREEDY))
    for protocol, url in (("http", server.http), ("grpc", server.grpc)):  # what a later request gets is unchanged
        with GenerationClient(url, protocol) as c:
            assert c.generate(PROBE, **GREEDY).text == before
    with GenerationClient(server.grpc, "grpc") as c:
        assert "".join(part.text for part in c.stream(PROBE, **GREEDY)) == before
    time.sleep(1.5)  # postprocessing refreshes the gauges twice a second
    gauges = llm_metrics(server.metrics)
    assert gauges["llm_running_sequences"] == gauges["llm_waiting_sequences"] == 0
    assert gauges["llm_kv_cache_usage_ratio"] == 0
    assert server.process.poll() is None
    assert "engine step failed" in server.log.read_text(errors="replace")


def test_an_engine_thread_that_dies_outside_a_step_takes_readiness_and_the_job_down(faulty):
    """Not a failed step but the engine's own code failing between steps: nothing can be served any more, so the
    ensemble must stop answering ready at once and the job must exit non-zero (no server that lies about health)."""
    server, tmp = faulty
    trigger = tmp / "fail-next-pass"
    processes = job_processes(server)
    try:
        with GenerationClient(server.grpc, "grpc") as c:
            assert c.generate(PROBE, **GREEDY).text
        trigger.touch()  # the engine's idle heartbeat pass (every 5 s) or the next request's pass raises
        started = time.monotonic()
        with GenerationClient(server.grpc, "grpc", timeout_s=60) as c, pytest.raises(GenerationError):
            c.generate(PROBE, **GREEDY)
        ready_until = None
        while server.process.poll() is None and time.monotonic() - started < 60:
            try:
                ready = server.get("/v2/models/ensemble/ready", timeout=1)[0] == 200
            except OSError:
                ready = False
            if not ready and ready_until is None:
                ready_until = time.monotonic() - started
            time.sleep(0.1)
        code = server.process.wait(60)
    finally:
        stop_server(server)
    assert code != 0
    assert ready_until is not None and ready_until < 10, ready_until
    log = server.log.read_text(errors="replace")
    assert "the engine thread failed outside a step" in log and "engine failed, ending the job" in log
    gone, alive = psutil.wait_procs(processes, timeout=10)
    assert not alive, f"left running: {[p.cmdline()[:3] for p in alive]}"
    assert not shm_segments(p.pid for p in processes)


def test_a_failed_step_at_tp2_ends_the_job(tmp_path):
    trigger = tmp_path / "fail-next-step"
    server = start_server(tmp_path / "tp2", module=FAULTY, TP="2", FAULT_FILE=str(trigger))
    processes = job_processes(server)
    trigger.touch()
    started = time.monotonic()
    try:
        with GenerationClient(server.grpc, "grpc", timeout_s=60) as c, pytest.raises(GenerationError):
            c.generate(PROBE, **GREEDY)
        code = server.process.wait(60)
    finally:
        stop_server(server)
    assert code != 0
    assert time.monotonic() - started < 60
    assert "engine failed, ending the job" in server.log.read_text(errors="replace")
    gone, alive = psutil.wait_procs(processes, timeout=10)
    assert not alive, f"left running: {[p.cmdline()[:3] for p in alive]}"
    assert not shm_segments(p.pid for p in processes)
