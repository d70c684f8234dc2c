"""The API's only way to the model: the two ensembles, over Triton's asyncio gRPC client."""

from __future__ import annotations

import asyncio
import dataclasses
import re
from collections.abc import AsyncIterator

import grpc
import numpy as np
import tritonclient.grpc.aio as tc

from client.generate import OUTPUTS as PLAIN_OUTPUTS
from client.generate import request_inputs

SCORE_OUTPUTS = ["output_tokens", "prompt_tokens", "prompt_log_probs", "output_top_log_probs", "output_top_tokens",
                 "prompt_top_log_probs", "prompt_top_tokens", "output_token_ids", "prompt_token_ids"]
TEXT_OUTPUTS = ["text_output", "finish_reason", "num_input_tokens", "num_output_tokens"]
_FIELD = re.compile(r"invalid input '(\w+)'")


@dataclasses.dataclass
class Output:
    """One response of an ensemble: all of it (unary) or the new part (a stream's delta)."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    log_probs: list[float]
    # Scoring and alternatives, when asked (else empty): each token's text, the prompt's log-probs (after its
    # first token) and, per position, the alternatives as (text, log-prob), most likely first.
    tokens: list[str] = dataclasses.field(default_factory=list)
    prompt_texts: list[str] = dataclasses.field(default_factory=list)
    prompt_log_probs: list[float] = dataclasses.field(default_factory=list)
    top: list[list[tuple[str, float]]] = dataclasses.field(default_factory=list)
    prompt_top: list[list[tuple[str, float]]] = dataclasses.field(default_factory=list)
    token_ids: list[int] = dataclasses.field(default_factory=list)  # the generated tokens' ids, when scored
    prompt_ids: list[int] = dataclasses.field(default_factory=list)  # the prompt's, with prompt log-probs


class TritonError(RuntimeError):
    """Triton refused or failed a request. ``field`` is the ensemble input it names, when it names one."""

    def __init__(self, message: str, status: str | None = None):
        super().__init__(message)
        self.message, self.status = message, status or ""
        found = _FIELD.search(message)
        self.field = found.group(1) if found else None

    @property
    def client_error(self) -> bool:
        """The request broke a rule (HTTP 400), as opposed to the server failing or shutting down."""
        return self.field is not None or "INVALID_ARGUMENT" in self.status

    @property
    def unavailable(self) -> bool:
        return any(s in self.message for s in ("shutting down", "queue is full", "UNAVAILABLE")) or \
            "UNAVAILABLE" in self.status


class _Stream:
    """One open gRPC stream to Triton, carrying one request at a time (``TritonLink.stream`` pools them)."""

    def __init__(self, client):
        self._requests: asyncio.Queue = asyncio.Queue()

        async def feed():
            while (request := await self._requests.get()) is not None:
                yield request

        self.responses = client.stream_infer(feed())

    def alive(self) -> bool:
        """False once the stream has ended (closed here, or by Triton). tritonclient keeps the grpc call it wraps
        as ``_grpc_call``; without it a stream counts as alive, and a dead one is replaced on its first read."""
        call = getattr(self.responses, "_grpc_call", None)
        return call is None or not call.done()

    def send(self, request: dict) -> None:
        self._requests.put_nowait(request)

    def close(self) -> None:
        """Cancel the stream: the request on it, if any, is cancelled on the server (its KV blocks freed)."""
        self._requests.put_nowait(None)
        self.responses.cancel()


class TritonLink:
    # Open streams kept for the next request: opening one costs a round trip to Triton and about 1.5 ms of this
    # process's time (a py-spy profile at one stream of 8-token requests: a quarter of what each cost here; about
    # 3 ms at sixteen streams).
    IDLE_STREAMS = 64

    def __init__(self, url: str, timeout_s: float):
        self.url, self.timeout_s = url, timeout_s
        self._client = tc.InferenceServerClient(url)
        self._idle: list[_Stream] = []

    async def close(self) -> None:
        while self._idle:
            self._idle.pop().close()
        await self._client.close()

    async def ready(self) -> bool:
        try:
            return await self._client.is_model_ready("ensemble") and \
                await self._client.is_model_ready("ensemble_stream")
        except Exception:  # tritonclient raises its own exception for a refused connection
            return False

    async def generate(self, prompt: str, params: dict) -> Output:
        """All of one generation: its deltas from ``ensemble_stream``, joined. Why not the unary ``ensemble``: once it
        runs, nothing stops it (Triton does not tell the model behind an ensemble that its caller left), so a
        choice whose sibling failed or whose client went away would run to its end holding KV blocks. Cancelling
        this call closes the stream instead, which stops the generation in the engine."""
        whole = None
        async for part in self.stream(prompt, params):
            whole = part if whole is None else _join(whole, part)
        return whole

    async def stream(self, prompt: str, params: dict) -> AsyncIterator[Output]:
        """The deltas of one streamed generation. It runs on an open stream when one is idle (a stream carries
        one request at a time, so cancelling it cancels only this one) and gives the stream back when its last
        response came; leaving early, an error or the deadline cancel the stream (its KV blocks are freed)."""
        request = {"model_name": "ensemble_stream", "inputs": request_inputs(tc, prompt, stream=True, **params),
                   "outputs": _outputs(params)}
        while self._idle and not self._idle[-1].alive():  # ended while idle (Triton went away, or closed)
            self._idle.pop()
        reused = bool(self._idle)
        stream = self._idle.pop() if reused else _Stream(self._client)
        stream.send(request)
        finished, expired = False, False

        def expire():  # the deadline (a timer, not ``asyncio.timeout``: the first response is awaited in another
            nonlocal expired  # task than the rest)
            expired = True
            stream.close()

        deadline = asyncio.get_running_loop().call_later(self.timeout_s, expire)
        try:
            while True:
                try:
                    result, error = await anext(stream.responses)
                except (grpc.RpcError, StopAsyncIteration, asyncio.CancelledError) as err:
                    if expired:
                        raise TritonError(f"the request did not finish within {self.timeout_s:g} s",
                                          "DEADLINE_EXCEEDED") from None
                    if isinstance(err, asyncio.CancelledError):
                        raise
                    if reused:  # an idle stream Triton closed meanwhile, before any answer: once more on a new one
                        stream.close()
                        reused, stream = False, _Stream(self._client)
                        stream.send(request)
                        continue
                    raise TritonError(f"the stream to Triton ended: {err}", "UNAVAILABLE") from None
                reused = False  # answered: a later failure is this request's
                if error is not None:  # the stream is closed below, whatever of the request may follow
                    raise TritonError(error.message(), str(error.status()))
                output = _output(result.as_numpy)
                finished = bool(output.finish_reason)
                yield output
                if finished:
                    return
        finally:
            deadline.cancel()
            if finished and len(self._idle) < self.IDLE_STREAMS:
                self._idle.append(stream)
            else:
                stream.close()


def _join(a: Output, b: Output) -> Output:
    """Two consecutive deltas of one stream as one: the texts and per-token lists follow each other, the counts
    and the finish reason are the later's (a stream's counts are running totals)."""
    joined = {f.name: getattr(a, f.name) + getattr(b, f.name) for f in dataclasses.fields(Output)
              if isinstance(getattr(a, f.name), (str, list)) and f.name != "finish_reason"}
    return Output(**{**joined, "finish_reason": b.finish_reason, "prompt_tokens": b.prompt_tokens,
                     "completion_tokens": b.completion_tokens})


def _outputs(params: dict) -> list:
    """The outputs to ask for: the log-probs and scoring ones only when the request asks for any (each is a
    tensor in every response, serialised by Triton and parsed here, even when empty: on two cores that cost a
    streamed request measurable CPU and time to first token)."""
    scored = any(params.get(name) for name in ("return_log_probs", "return_prompt_log_probs", "top_log_probs"))
    return [tc.InferRequestedOutput(n) for n in (PLAIN_OUTPUTS + SCORE_OUTPUTS if scored else TEXT_OUTPUTS)]


def _output(value) -> Output:
    def floats(name: str) -> list[float]:
        found = value(name)
        return [] if found is None else np.asarray(found[0], dtype=float).tolist()

    def texts(name: str) -> list[str]:
        found = value(name)
        return [] if found is None else [t.decode("utf-8") for t in found[0]]

    def ids(name: str) -> list[int]:
        found = value(name)
        return [] if found is None else [int(i) for i in found[0] if i >= 0]  # -1 pads rows of a batch

    def alternatives(prefix: str) -> list[list[tuple[str, float]]]:
        values, names = value(f"{prefix}_top_log_probs"), value(f"{prefix}_top_tokens")
        if values is None or names is None:
            return []
        return [[(t.decode("utf-8"), float(v)) for t, v in zip(ts, vs) if t] for ts, vs in zip(names[0], values[0])]

    return Output(
        text=value("text_output")[0][0].decode("utf-8"),
        finish_reason=value("finish_reason")[0][0].decode("utf-8"),
        prompt_tokens=int(value("num_input_tokens")[0][0]),
        completion_tokens=int(value("num_output_tokens")[0][0]),
        log_probs=floats("output_log_probs"),
        tokens=texts("output_tokens"),
        prompt_texts=texts("prompt_tokens"),
        prompt_log_probs=floats("prompt_log_probs"),
        top=alternatives("output"),
        prompt_top=alternatives("prompt"),
        token_ids=ids("output_token_ids"),
        prompt_ids=ids("prompt_token_ids"),
    )
