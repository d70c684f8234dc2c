"""Triton Python backend: text and sampling parameters -> validated token ids (see preprocessing/pipeline.py)."""

import triton_python_backend_utils as pb_utils

from preprocessing.params import SCALARS, WORD_LISTS, InvalidRequest
from preprocessing.pipeline import Preprocessor

INPUTS = ["text_input", *SCALARS, *WORD_LISTS]


class TritonPythonModel:
    def initialize(self, args):
        self.pre = Preprocessor.from_env()

    def execute(self, requests):
        responses = []
        for request in requests:
            values = {}
            for name in INPUTS:
                tensor = pb_utils.get_input_tensor_by_name(request, name.upper())
                values[name] = None if tensor is None else tensor.as_numpy()
            try:
                out = self.pre(values)
            except InvalidRequest as err:
                error = pb_utils.TritonError(str(err), pb_utils.TritonError.INVALID_ARG)
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=error))
                continue
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor(k, v) for k, v in out.items()]))
        return responses
