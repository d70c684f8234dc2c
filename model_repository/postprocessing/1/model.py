"""Triton Python backend: generated token ids -> text (see preprocessing/pipeline.py)."""

import triton_python_backend_utils as pb_utils

from preprocessing.metrics import Publisher
from preprocessing.params import InvalidRequest
from preprocessing.pipeline import GenerationFailed, Postprocessor

INPUTS = [
    "OUTPUT_IDS", "OUTPUT_LENGTH", "OUTPUT_LOG_PROBS", "INPUT_IDS", "INPUT_LENGTH", "ERROR", "TEXT_INPUT",
    "EXCLUDE_INPUT_IN_OUTPUT", "RETURN_LOG_PROBS", "TEXT_LIMIT", "TEXT_DELTA", "LOG_PROBS_LENGTH", "ENGINE_STATS",
]


class TritonPythonModel:
    def initialize(self, args):
        self.post = Postprocessor.from_env()
        self.metrics = Publisher(pb_utils)

    def execute(self, requests):
        responses = []
        for request in requests:
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
