"""How often a decode step reads tensors back on the host: the calls that are a device-to-host copy on a GPU
(``.item()``, ``.tolist()``, ``.cpu()``; ``.numpy()`` only ever follows ``.cpu()``), counted on the engine
thread while it steps. On CPU they cost little; on a GPU each one waits for the device. The target is one per
step (the sampled tokens). Today a step makes ``DECODE_STEP_HOST_READS``: ``CachedGPT.forward`` reads back the
lengths, block tables and table lengths the engine has just uploaded, ``kv_cache.plan`` the positions, and
sampling reads the tokens with their log-probs; a change that adds one fails here."""

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
DECODE_STEP_HOST_READS = 5  # per decode step of one sequence (target 1)


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


@pytest.mark.parametrize("kind", ["greedy", "sampled"])
def test_a_decode_step_reads_back_no_more_than_it_did(engine, kind):
    params = dict(end_id=-1, temperature=0.0) if kind == "greedy" else dict(end_id=-1, temperature=0.8, top_p=0.9,
                                                                             seed=1)
    totals = []
    for tokens in (9, 17):  # the same prompt step, 8 and 16 decode steps: the difference is 8 decode steps
        with counted_host_reads(engine._thread) as counts:
            g = engine.submit([5, 6, 7], SamplingParams(max_tokens=tokens, **params))
            assert g.wait(30) and g.error is None
        totals.append(counts)
    per_step = {name: (totals[1][name] - totals[0][name]) / 8 for name in HOST_READS}
    assert sum(per_step.values()) <= DECODE_STEP_HOST_READS, per_step
