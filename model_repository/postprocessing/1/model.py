"""Triton Python backend: generated token ids -> text (see preprocessing/pipeline.py)."""

import threading
import time

import triton_python_backend_utils as pb_utils

from preprocessing.params import InvalidRequest
from preprocessing.pipeline import GenerationFailed, Postprocessor
from triton_backend.serving.control import ControlClient
from triton_backend.serving.metrics import ExpertCounters, LoadGauges, Publisher

INPUTS = [
    "OUTPUT_IDS", "OUTPUT_LENGTH", "OUTPUT_LOG_PROBS", "INPUT_IDS", "INPUT_LENGTH", "ERROR", "TEXT_INPUT",
    "EXCLUDE_INPUT_IN_OUTPUT", "RETURN_LOG_PROBS", "TEXT_LIMIT", "TEXT_DELTA", "LOG_PROBS_LENGTH", "ENGINE_STATS",
    "SCORES",
]
LOAD_EVERY_S = 0.5  # how often the metrics are sent and the running / waiting / KV-cache gauges refreshed
# How often a stream's cancellation is asked of Triton: each ask is a round trip to tritonserver that cost a
# streamed response more than the rest of its postprocessing (1-1.6 ms on two cores), and postprocessing is one
# instance that every stream's responses pass through. A cancelled stream is noticed this much later at most.
CANCEL_CHECK_S = 0.2


class TritonPythonModel:
    def initialize(self, args):
        self.post = Postprocessor.from_env()
        self.metrics = Publisher(pb_utils)
        self.gauges = LoadGauges(pb_utils)
        self.experts = ExpertCounters(pb_utils)
        self.control = ControlClient()
        self.stopping = threading.Event()
        self.checked = {}  # cancel key -> when its stream's cancellation was last asked
        self.pruned = time.monotonic()
        threading.Thread(target=self.refresh_gauges, name="gauges", daemon=True).start()

    def refresh_gauges(self):
        while not self.stopping.wait(LOAD_EVERY_S):
            self.metrics.flush()
            load = self.control.load()
            if load is not None:
                self.gauges.set(load)
                tallies = self.control.expert_tokens()
                if tallies:
                    self.experts.set(tallies)

    def finalize(self):
        self.stopping.set()
        self.metrics.flush()
        self.control.close()

    def due(self, key) -> bool:
        """Whether this stream's cancellation should be asked now (at most every CANCEL_CHECK_S)."""
        now = time.monotonic()
        if now - self.checked.get(key, float("-inf")) < CANCEL_CHECK_S:
            return False
        self.checked[key] = now
        if now - self.pruned > 1.0:  # once a second: a key asked longer ago is due anyway, so it can go
            self.checked = {k: t for k, t in self.checked.items() if now - t < CANCEL_CHECK_S}
            self.pruned = now
        return True

    def execute(self, requests):
        responses = []
        for request in requests:
            key = pb_utils.get_input_tensor_by_name(request, "CANCEL_KEY")  # streamed responses carry one
            if key is not None and self.due(key.as_numpy().reshape(-1)[0]) and request.is_cancelled():
                # The client cancelled this stream: stop its generation (see control.py in triton_backend/serving). The
                # response below is answered as usual and Triton drops it. Answering with a CANCELLED error
                # instead made tritonserver 2.51 keep 6-9 KiB per cancelled stream, for good (measured: see
                # tests/functional/test_soak.py and docs/measured.md's soak figures).
                self.control.cancel(key.as_numpy().reshape(-1)[0].decode())
            values = {}
            for name in INPUTS:
                tensor = pb_utils.get_input_tensor_by_name(request, name)
                values[name] = None if tensor is None else tensor.as_numpy()
            if values["ENGINE_STATS"] is not None:
                self.metrics.publish(values["ENGINE_STATS"])
            try:
                out = self.post(values)
            except (InvalidRequest, GenerationFailed) as err:
                # megatron_gpt reports per-row failures in ERROR: a broken rule is the client's, the rest ours.
                client = isinstance(err, InvalidRequest) or err.invalid
                code = pb_utils.TritonError.INVALID_ARG if client else pb_utils.TritonError.UNAVAILABLE
                error = pb_utils.TritonError(str(err), code)
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=error))
                continue
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor(k, v) for k, v in out.items()]))
        return responses
