"""The ``megatron_gpt`` model as PyTriton sees it: its tensors and the callable that feeds the engine.

PyTriton can only fail a whole batch, so a row that breaks a rule gets its message in the ``ERROR`` output
instead and the other rows of the batch are served; postprocessing turns ``ERROR`` into a per-request
error response of the ensemble.
"""

from __future__ import annotations

import numpy as np

from preprocessing.params import SCALARS, InvalidRequest, from_tensors

from .engine import Engine, EngineBusy

MODEL_NAME = "megatron_gpt"


def tensors():
    """Input and output specs of megatron_gpt (internal upper-case names, see model_repository/ensemble)."""
    from pytriton.model_config import Tensor

    inputs = [
        Tensor(name="INPUT_IDS", dtype=np.int32, shape=(-1,)),
        Tensor(name="INPUT_LENGTH", dtype=np.int32, shape=(1,)),
    ]
    inputs += [
        Tensor(name=name.upper(), dtype=spec.dtype, shape=(1,), optional=not spec.required)
        for name, spec in SCALARS.items()
    ]
    outputs = [
        Tensor(name="OUTPUT_IDS", dtype=np.int32, shape=(-1,)),
        Tensor(name="OUTPUT_LENGTH", dtype=np.int32, shape=(1,)),
        Tensor(name="FINISH_REASON", dtype=bytes, shape=(1,)),
        Tensor(name="CUM_LOG_PROB", dtype=np.float32, shape=(1,)),
        Tensor(name="OUTPUT_LOG_PROBS", dtype=np.float32, shape=(-1,)),
        Tensor(name="ERROR", dtype=bytes, shape=(1,)),
    ]
    return inputs, outputs


def _submit_row(engine: Engine, request, row: int):
    """Submit one row, or return the message of the rule it breaks."""
    try:
        length = int(request["INPUT_LENGTH"][row][0])
        ids = request["INPUT_IDS"][row]
        if not 0 < length <= len(ids):
            raise InvalidRequest("INPUT_LENGTH", length, f"must be between 1 and the length of INPUT_IDS ({len(ids)})")
        values = {name: request[name][row][0] for name in request if name not in ("INPUT_IDS", "INPUT_LENGTH")}
        return engine.submit(ids[:length].tolist(), from_tensors(values, upper=True))
    except (InvalidRequest, EngineBusy) as err:
        return str(err)


def _outputs(rows) -> dict:
    """Stack the rows of one request into its output tensors (ids and log-probs right-padded).

    PyTriton cannot send zero-size tensors, so ids and log-probs are at least one wide; OUTPUT_LENGTH says
    how much is real and postprocessing trims.
    """
    width = max([len(g.tokens) for g in rows if not isinstance(g, str)] + [1])
    ids = np.zeros((len(rows), width), np.int32)
    logprobs = np.zeros((len(rows), width), np.float32)
    length = np.zeros((len(rows), 1), np.int32)
    cum = np.zeros((len(rows), 1), np.float32)
    reason = np.full((len(rows), 1), b"", dtype=object)
    error = np.full((len(rows), 1), b"", dtype=object)
    for i, g in enumerate(rows):
        if isinstance(g, str) or g.error:
            error[i, 0] = (g if isinstance(g, str) else g.error).encode()
            continue
        n = len(g.tokens)
        ids[i, :n], length[i, 0], reason[i, 0] = g.tokens, n, g.finish_reason.encode()
        if g.params.return_log_probs:
            logprobs[i, :n] = g.logprobs
            cum[i, 0] = float(np.sum(g.logprobs, dtype=np.float64))
    return {
        "OUTPUT_IDS": ids, "OUTPUT_LENGTH": length, "FINISH_REASON": reason,
        "CUM_LOG_PROB": cum, "OUTPUT_LOG_PROBS": logprobs, "ERROR": error,
    }


def make_infer(engine: Engine, timeout_s: float = 600.0):
    """A PyTriton callable over a list of requests (the dynamic batcher's batch) that shares ``engine``."""

    def infer(requests):
        pending = [[_submit_row(engine, r, row) for row in range(len(r["INPUT_IDS"]))] for r in requests]
        for rows in pending:
            for g in rows:
                if not isinstance(g, str) and not g.wait(timeout_s):
                    g.error = f"no result within {timeout_s:.0f} s"
        return [_outputs(rows) for rows in pending]

    return infer
