"""postprocessing's LLM metrics: kept in memory per response, sent to Triton in one flush (each call to
Triton's metrics API is a round trip to tritonserver)."""

import numpy as np

from triton_backend.serving.metrics import Publisher, stats_row


class FakeMetric:
    def __init__(self, calls, name):
        self.calls, self.name = calls, name

    def observe(self, value):
        self.calls.append((self.name, "observe", value))

    def increment(self, value):
        self.calls.append((self.name, "increment", value))


class FakePbUtils:
    """The part of ``triton_python_backend_utils`` that the publisher uses, recording every call."""

    def __init__(self):
        self.calls = []
        pb = self

        class MetricFamily:
            HISTOGRAM, COUNTER = "histogram", "counter"

            def __init__(self, name, description, kind):
                self.name = name

            def Metric(self, labels, buckets=None):  # noqa: N802 - pb_utils' name
                return FakeMetric(pb.calls, self.name)

        self.MetricFamily = MetricFamily


def test_published_stats_reach_triton_only_when_flushed_and_only_once():
    pb = FakePbUtils()
    publisher = Publisher(pb)
    publisher.publish(np.array([stats_row(0.25, -1, 7, 1)], np.float32))
    publisher.publish(np.array([stats_row(-1, -1, 0, 3), stats_row(-1, 0.01, 0, 2)], np.float32))
    assert pb.calls == []
    publisher.flush()
    assert sorted(pb.calls) == sorted([
        ("llm_time_to_first_token_seconds", "observe", 0.25),
        ("llm_inter_token_latency_seconds", "observe", np.float32(0.01).item()),
        ("llm_input_tokens_total", "increment", 7.0),
        ("llm_output_tokens_total", "increment", 6.0),
    ])
    publisher.flush()  # nothing new: nothing sent
    assert len(pb.calls) == 4
