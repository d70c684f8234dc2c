"""A short soak (``make soak`` runs the long one): mixed unary and streaming load with cancellations."""

import concurrent.futures
import threading
import time

import pytest

from tools.soak import one_request, ranks, soak, verdict

REQUESTS = 300
pytestmark = pytest.mark.timeout(600)  # each test sends hundreds of requests (the soak stops itself at 8 minutes)


def test_short_soak_loses_nothing_and_returns_to_idle(server):
    summary = soak(server.http, server.grpc, server.metrics, [server.process.pid], requests=REQUESTS,
                   concurrency=32, cancel_share=0.1, max_minutes=8)
    assert summary["failures"] == 0, summary["failure_examples"]
    assert summary["requests"] == REQUESTS
    assert not any(summary["gauges_after"].values()), summary["gauges_after"]
    assert summary["outcomes"].get("cancelled", 0) > 10
    assert summary["engine_cancelled"] > 0  # the cancellations reached the engine
    assert set(summary["memory"]) >= {"rank 0", "serving process", "tritonserver", "preprocessing stubs",
                                      "postprocessing stubs", "PyTriton proxy stubs"}
    # Memory growth is judged by `make soak` over thousands of requests; a short run is mostly warm-up.
    problems = [p for p in verdict(summary, REQUESTS) if "memory" not in p]
    assert not problems, problems


def cancel_streams(server, first: int, count: int, concurrency: int = 32) -> int:
    """``count`` gRPC streams, each to be cancelled by its client after 1-4 responses; returns how many were (the
    others ended first)."""
    numbers = iter(range(first, first + count))
    lock = threading.Lock()
    cancelled = []

    def client():
        local = threading.local()
        while True:
            with lock:
                i = next(numbers, None)
            if i is None:
                return
            if one_request(i, "cancel", server.http, server.grpc, local) == "cancelled":
                cancelled.append(i)

    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        for f in [pool.submit(client) for _ in range(concurrency)]:
            f.result()
    return len(cancelled)


def test_cancelled_streams_leave_no_memory_behind_in_tritonserver(server):
    """Postprocessing once answered a cancelled stream with a CANCELLED error, and tritonserver 2.51 then kept
    6-9 KiB per cancelled stream for good. Now each of 1,000 cancelled streams must add less than 4 KiB (about 1.3
    KiB is measured: gRPC's own share)."""
    tritonserver = ranks([server.process.pid])["tritonserver"][0]
    cancel_streams(server, 0, 200)  # warm-up: allocator pools grow at first
    before = tritonserver.memory_info().rss
    assert cancel_streams(server, 200, 1000) > 800
    time.sleep(2)
    per_stream = (tritonserver.memory_info().rss - before) / 1000
    print(f"tritonserver: {per_stream:.0f} bytes more per cancelled stream")  # pytest -s shows it
    assert per_stream < 4096, f"tritonserver grew {per_stream:.0f} bytes per cancelled stream"
