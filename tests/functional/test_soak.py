"""A short soak (``make soak`` runs the long one): mixed unary and streaming load with cancellations."""

from tools.soak import soak, verdict

REQUESTS = 300


def test_short_soak_loses_nothing_and_returns_to_idle(server):
    summary = soak(server.http, server.grpc, server.metrics, [server.process.pid], requests=REQUESTS,
                   concurrency=32, cancel_share=0.1, max_minutes=8)
    assert summary["failures"] == 0, summary["failure_examples"]
    assert summary["requests"] == REQUESTS
    assert not any(summary["gauges_after"].values()), summary["gauges_after"]
    assert summary["outcomes"].get("cancelled", 0) > 10
    assert summary["engine_cancelled"] > 0  # the cancellations reached the engine
    assert set(summary["memory"]) >= {"rank 0", "tritonserver"}
    # Memory growth is judged by `make soak` over thousands of requests; a short run is mostly warm-up.
    problems = [p for p in verdict(summary, REQUESTS) if "memory" not in p]
    assert not problems, problems
