"""The API's own Prometheus metrics, on its ``/metrics``: requests by route and status, and how long each took
to answer (for a stream, until its first event: the events after it are the generation's, which Triton's
metrics and the ``llm_*`` gauges already count)."""

from __future__ import annotations

from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest

ROUTES = ("/v1/completions", "/completions", "/v1/chat/completions", "/chat/completions", "/api", "/tokenize",
          "/detokenize", "/tokenizer_info", "/v1/models", "/health")


class ApiMetrics:
    def __init__(self):
        self.registry = CollectorRegistry()  # its own, so that two apps in one process (tests) do not clash
        self.requests = Counter("api_requests", "HTTP API requests by route and status", ["route", "status"],
                                registry=self.registry)
        self.latency = Histogram("api_request_seconds", "Time until the response starts, by route", ["route"],
                                 registry=self.registry,
                                 buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))

    def observe(self, path: str, status: int, seconds: float) -> None:
        """A response started (``app.Gate``); routes are counted by name, anything else as "other"."""
        if path == "/metrics":
            return
        route = path if path in ROUTES else ("/v1/models/{id}" if path.startswith("/v1/models/") else "other")
        self.requests.labels(route, str(status)).inc()
        self.latency.labels(route).observe(seconds)

    def render(self) -> Response:
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)
