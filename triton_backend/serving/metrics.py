"""LLM metrics on Triton's metrics port, published through Python-backend models.

The generation model runs in PyTriton's process, which has no access to Triton's metrics API. So it sends
a few numbers along with every response (ENGINE_STATS), which postprocessing turns into latency histograms
and token counters; postprocessing also polls the engine's load for the gauges (``LoadGauges``, over
``triton_backend/serving/control.py``), so that they are current even when no response flows.
"""

from __future__ import annotations

import threading

import numpy as np

# ENGINE_STATS columns (float32, one row per request row); -1 means "nothing to record in this response".
STATS = ["ttft_s", "itl_s", "input_tokens", "output_tokens"]


def stats_row(ttft_s=-1.0, itl_s=-1.0, input_tokens=0, output_tokens=0) -> list[float]:
    return [ttft_s, itl_s, input_tokens, output_tokens]


def request_timing(generation) -> tuple[float, float]:
    """Time to first token and mean inter-token latency of a finished generation (-1 when undefined)."""
    g = generation
    ttft = g.first_token_at - g.submitted if g.first_token_at is not None else -1.0
    n = len(g.tokens)
    itl = (g.finished_at - g.first_token_at) / (n - 1) if n > 1 and g.finished_at and g.first_token_at else -1.0
    return ttft, itl


TTFT_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]
ITL_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0]


class Publisher:
    """Latency histograms and token counters through ``pb_utils`` (passed in: this imports without Triton).

    ``publish`` (on every response) only adds to memory; ``flush`` (from postprocessing's background thread, every
    half second) makes the calls, each a round trip to tritonserver that cost about as much as the rest of a
    streamed response's postprocessing (measured: 0.6-1.0 ms a response on two cores).
    """

    def __init__(self, pb_utils):
        family = pb_utils.MetricFamily
        hist = family.HISTOGRAM
        self._families = [  # keep the families alive: their metrics die with them
            family("llm_time_to_first_token_seconds", "Time from a request reaching the engine to its first token",
                   hist),
            family("llm_inter_token_latency_seconds", "Mean time between a request's generated tokens", hist),
            family("llm_input_tokens_total", "Prompt tokens of finished or streaming requests", family.COUNTER),
            family("llm_output_tokens_total", "Generated tokens", family.COUNTER),
        ]
        ttft, itl, tin, tout = self._families
        self.ttft = ttft.Metric(labels={}, buckets=TTFT_BUCKETS)
        self.itl = itl.Metric(labels={}, buckets=ITL_BUCKETS)
        self.input_tokens, self.output_tokens = tin.Metric(labels={}), tout.Metric(labels={})
        self._lock = threading.Lock()
        self._ttfts, self._itls, self._tokens = [], [], [0.0, 0.0]

    def publish(self, stats: np.ndarray) -> None:
        rows = np.asarray(stats, dtype=np.float64).reshape(-1, len(STATS))
        with self._lock:
            self._ttfts += rows[rows[:, 0] >= 0, 0].tolist()
            self._itls += rows[rows[:, 1] >= 0, 1].tolist()
            self._tokens[0] += float(rows[:, 2].sum())
            self._tokens[1] += float(rows[:, 3].sum())

    def flush(self) -> None:
        with self._lock:
            ttfts, itls, (tin, tout) = self._ttfts, self._itls, self._tokens
            self._ttfts, self._itls, self._tokens = [], [], [0.0, 0.0]
        for value in ttfts:
            self.ttft.observe(value)
        for value in itls:
            self.itl.observe(value)
        if tin:
            self.input_tokens.increment(tin)
        if tout:
            self.output_tokens.increment(tout)


class ExpertCounters:
    """``llm_moe_expert_tokens_total{layer, expert}``: tokens the router sent to each expert of each MoE layer,
    from ``Engine.expert_tokens()`` (operators see hot experts and the imbalance). Made on the first tally that
    has layers: a dense model shows no such family."""

    def __init__(self, pb_utils):
        self._pb = pb_utils
        self._family = None
        self._metrics: dict[tuple[str, int], object] = {}
        self._seen: dict[tuple[str, int], int] = {}

    def set(self, tallies: dict) -> None:
        if not tallies:
            return
        if self._family is None:
            family = self._pb.MetricFamily
            self._family = family("llm_moe_expert_tokens_total", "Tokens routed to each expert of each MoE layer "
                                  "(the layers of rank 0's pipeline stage)", family.COUNTER)
        for layer, counts in tallies.items():
            for expert, count in enumerate(counts):
                key = (str(layer), expert)
                if key not in self._metrics:
                    self._metrics[key] = self._family.Metric(labels={"layer": key[0], "expert": str(expert)})
                    self._seen[key] = 0
                if count > self._seen[key]:
                    self._metrics[key].increment(float(count - self._seen[key]))
                    self._seen[key] = count


class LoadGauges:
    """The engine's running and waiting sequences, KV-cache use, cancellations and prefix-cache lookups, from
    ``Engine.load()``."""

    def __init__(self, pb_utils):
        family = pb_utils.MetricFamily
        self._families = [
            family("llm_running_sequences", "Sequences in the engine's running batch", family.GAUGE),
            family("llm_waiting_sequences", "Sequences waiting for KV blocks or a place in the batch (preempted "
                   "ones too)", family.GAUGE),
            family("llm_kv_cache_usage_ratio", "Share of KV-cache blocks held by sequences", family.GAUGE),
            family("llm_kv_cache_blocks_in_use", "KV-cache blocks held by sequences", family.GAUGE),
            family("llm_requests_cancelled_total", "Requests the engine stopped because the client cancelled",
                   family.COUNTER),
            family("llm_prefix_cache_queried_tokens_total", "Prompt tokens looked up in the prefix cache",
                   family.COUNTER),
            family("llm_prefix_cache_hit_tokens_total", "Prompt tokens found in the prefix cache (not computed)",
                   family.COUNTER),
        ]
        (self.running, self.waiting, self.kv, self.blocks, self.cancelled, self.queried,
         self.hits) = (f.Metric(labels={}) for f in self._families)
        self._seen = {"cancelled": 0, "prefix_queried_tokens": 0, "prefix_hit_tokens": 0}

    def set(self, load: dict) -> None:
        self.running.set(float(load["running"]))
        self.waiting.set(float(load["waiting"]))
        self.kv.set(float(load["kv_usage"]))
        self.blocks.set(float(load["kv_blocks_used"]))
        for name, counter in (("cancelled", self.cancelled), ("prefix_queried_tokens", self.queried),
                              ("prefix_hit_tokens", self.hits)):
            if load[name] > self._seen[name]:  # the engine counts; the counter follows
                counter.increment(float(load[name] - self._seen[name]))
                self._seen[name] = load[name]
