"""How often a decode step reads tensors back on the host: the calls that are a device-to-host copy on a GPU
(``.item()``, ``.tolist()``, ``.cpu()``; ``.numpy()`` only ever follows ``.cpu()``), counted on the engine
thread while it steps. On CPU they cost little; on a GPU each one waits for the device. A decode step of a
dense model reads back once: its sampled tokens with their log-probs. The engine hands the model the host arrays
it builds the step from (``CachedGPT.forward``'s ``host``), so nothing it uploaded is read back; a change that
adds a read fails here. (An MoE layer also reads how many tokens each expert gets.)"""

from __future__ import annotations

import collections
import contextlib
import threading

import pytest
import torch

from preprocessing.params import SamplingParams
from triton_backend.engine.engine import Engine
from triton_backend.model.gpt import CachedGPT

from .models import ARCH, EOS, VOCAB, context_model

HOST_READS = ("item", "tolist", "cpu")
DECODE_STEP_HOST_READS = 1  # per decode step of one sequence


@contextlib.contextmanager
def counted_host_reads(thread: threading.Thread):
    """Counts ``HOST_READS`` calls made on ``thread`` (by name)."""
    counts: collections.Counter = collections.Counter()
    originals = {name: getattr(torch.Tensor, name) for name in HOST_READS}

    def counting(name, original):
        def read(self, *args, **kwargs):
            if threading.current_thread() is thread:
                counts[name] += 1
            return original(self, *args, **kwargs)
        return read

    for name, original in originals.items():
        setattr(torch.Tensor, name, counting(name, original))
    try:
        yield counts
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


@pytest.fixture(scope="module")
def engine():
    started = Engine(CachedGPT(context_model(ARCH), ARCH, max_slots=2), VOCAB, EOS).start()
    yield started
    started.stop()


def count_per_decode_step(engine, params: dict) -> dict[str, float]:
    totals = []
    for tokens in (9, 17):  # the same prompt step, 8 and 16 decode steps: the difference is 8 decode steps
        with counted_host_reads(engine._thread) as counts:
            g = engine.submit([5, 6, 7], SamplingParams(max_tokens=tokens, end_id=-1, **params))
            assert g.wait(30) and g.error is None
        totals.append(counts)
    return {name: (totals[1][name] - totals[0][name]) / 8 for name in HOST_READS}


@pytest.mark.parametrize("params", [dict(temperature=0.0), dict(temperature=0.8, top_p=0.9, seed=1)],
                         ids=["greedy", "sampled"])
def test_a_decode_step_reads_back_once(engine, params):
    per_step = count_per_decode_step(engine, params)
    assert sum(per_step.values()) <= DECODE_STEP_HOST_READS, per_step


@pytest.mark.parametrize("graphs", ["auto", "eager"])
def test_without_the_cpu_kernels_as_on_a_gpu_too(monkeypatch, graphs):
    """The torch attention and sampling the CUDA path runs (the CPU kernels off), eagerly and through the static
    decode steps CUDA graphs replay (``graphs="eager"``: the same steps, not captured), on the same count."""
    from triton_backend.engine import sampling_kernel
    from triton_backend.model import decode_kernel

    monkeypatch.setattr(decode_kernel, "applies", lambda *_: False)
    monkeypatch.setattr(decode_kernel, "stores", lambda *_: False)
    monkeypatch.setattr(sampling_kernel, "applies", lambda *_: False)
    gpt = CachedGPT(context_model(ARCH), ARCH, max_slots=2, graphs=graphs)
    assert not gpt.kernel and (gpt.graphs is not None) == (graphs == "eager")
    engine = Engine(gpt, VOCAB, EOS).start()
    try:
        for params in (dict(temperature=0.0), dict(temperature=0.8, top_p=0.9, seed=1)):
            per_step = count_per_decode_step(engine, params)
            assert sum(per_step.values()) <= DECODE_STEP_HOST_READS, per_step
    finally:
        engine.stop()
