"""One client for both of Triton's protocols, speaking the ensemble's tensors (docs/triton.md's tables)."""

from __future__ import annotations

import dataclasses

import numpy as np

from preprocessing.params import SCALARS, WORD_LISTS

OUTPUTS = ["text_output", "finish_reason", "num_input_tokens", "num_output_tokens", "cum_log_probs",
           "output_log_probs"]
_WIRE = {"TYPE_INT32": "INT32", "TYPE_FP32": "FP32", "TYPE_UINT64": "UINT64", "TYPE_BOOL": "BOOL",
         "TYPE_STRING": "BYTES"}


class GenerationError(RuntimeError):
    """The server refused or failed the request; ``status`` is the HTTP status or gRPC code name."""

    def __init__(self, message: str, status=None):
        super().__init__(message)
        self.status = status


@dataclasses.dataclass
class Result:
    text: str
    finish_reason: str
    num_input_tokens: int
    num_output_tokens: int
    cum_log_probs: float
    output_log_probs: list[float]


class GenerationClient:
    """``GenerationClient("localhost:8000").generate("Hello", max_tokens=16, temperature=0)``."""

    def __init__(self, url: str = "localhost:8000", protocol: str = "http", model: str = "ensemble",
                 timeout_s: float = 120.0):
        if protocol not in ("http", "grpc"):
            raise ValueError(f"protocol must be 'http' or 'grpc', got {protocol!r}")
        self.protocol, self.model, self.timeout_s = protocol, model, timeout_s
        self._responses = None  # the open gRPC stream's responses (see ``stream``)
        if protocol == "http":
            import tritonclient.http as tc

            self._client = tc.InferenceServerClient(url, network_timeout=timeout_s, connection_timeout=timeout_s)
        else:
            import tritonclient.grpc as tc

            self._client = tc.InferenceServerClient(url)
        self._tc = tc

    def close(self) -> None:
        self._client.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def inputs(self, prompt: str, **params) -> list:
        """The ensemble's input tensors for one request; ``None`` values are left out (server default)."""
        return request_inputs(self._tc, prompt, **params)

    def stream(self, prompt: str, **params):
        """Yield one ``Result`` per streamed response from ``ensemble_stream`` (gRPC only); ``text`` is the delta.

        Requests that run to the end share one gRPC stream, as perf_analyzer's do: opening a stream per request
        costs a round trip and a client thread. Leaving the loop early (``break``, an exception, closing the
        generator) closes the stream, which cancels the request on the server and frees its slot in the engine.
        """
        import queue

        if self.protocol != "grpc":
            raise ValueError("streaming uses gRPC; create the client with protocol='grpc'")
        if self._responses is None:
            responses: queue.Queue = queue.Queue()
            self._client.start_stream(callback=lambda result, error: responses.put((result, error)))
            self._responses = responses
        final = False
        try:
            outputs = [self._tc.InferRequestedOutput(name) for name in OUTPUTS]
            self._client.async_stream_infer("ensemble_stream", self.inputs(prompt, **params), outputs=outputs,
                                            enable_empty_final_response=True)
            while True:
                result, error = self._responses.get(timeout=self.timeout_s)
                if error is not None:
                    raise GenerationError(error.message(), error.status())
                final = result.get_response().parameters["triton_final_response"].bool_param
                if result.as_numpy("text_output") is not None:
                    yield _result(result.as_numpy)
                if final:
                    return
        finally:
            if not final:
                self._responses = None
                self._client.stop_stream(cancel_requests=True)

    def generate(self, prompt: str, **params) -> Result:
        outputs = [self._tc.InferRequestedOutput(name) for name in OUTPUTS]
        try:
            if self.protocol == "http":
                response = self._client.infer(self.model, self.inputs(prompt, **params), outputs=outputs)
            else:
                response = self._client.infer(self.model, self.inputs(prompt, **params), outputs=outputs,
                                              client_timeout=self.timeout_s)
        except Exception as err:  # tritonclient raises InferenceServerException for both protocols
            status = err.status() if hasattr(err, "status") else None
            message = err.message() if hasattr(err, "message") else str(err)
            raise GenerationError(message, status) from None
        return _result(response.as_numpy)


def request_inputs(tc, prompt: str, **params) -> list:
    """The ensemble's input tensors for one request (``tc``: tritonclient.http or .grpc); ``None``: default."""
    unknown = set(params) - set(SCALARS) - set(WORD_LISTS) - {"stream"}
    if unknown:
        raise ValueError(f"unknown parameters: {', '.join(sorted(unknown))}")
    text = tc.InferInput("text_input", [1, 1], "BYTES")
    text.set_data_from_numpy(np.array([[prompt.encode("utf-8")]], dtype=object))
    tensors = [text]
    for name, value in params.items():
        if value is None:
            continue
        if name in WORD_LISTS:
            tensor = tc.InferInput(name, [1, len(value)], "BYTES")
            tensor.set_data_from_numpy(np.array([[w.encode("utf-8") for w in value]], dtype=object))
            tensors.append(tensor)
            continue
        wire, dtype = ("BOOL", np.bool_) if name == "stream" else (_WIRE[SCALARS[name].triton_type],
                                                                     SCALARS[name].dtype)
        if dtype is np.object_:
            value = value.encode("utf-8")
        tensor = tc.InferInput(name, [1, 1], wire)
        tensor.set_data_from_numpy(np.array([[value]], dtype=dtype))
        tensors.append(tensor)
    return tensors


def _result(value) -> Result:
    return Result(
        text=value("text_output")[0][0].decode("utf-8"),
        finish_reason=value("finish_reason")[0][0].decode("utf-8"),
        num_input_tokens=int(value("num_input_tokens")[0][0]),
        num_output_tokens=int(value("num_output_tokens")[0][0]),
        cum_log_probs=float(value("cum_log_probs")[0][0]),
        output_log_probs=[float(x) for x in value("output_log_probs")[0]],
    )
