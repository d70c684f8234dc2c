"""The CPU decode attention kernel (``model/decode_kernel.py``, ``paged_decode.c``) against the torch attention it
replaces: the same outputs on random steps of many shapes, the same greedy tokens through the engine, and a
kernel that cannot be built leaving the torch path to serve with one log line."""

import logging

import numpy as np
import pytest
import torch

from preprocessing.params import SamplingParams
from triton_backend import native
from triton_backend.cache.kv_cache import PagedKVCache, plan
from triton_backend.engine.engine import Engine
from triton_backend.model import decode_kernel
from triton_backend.model.attention import PagedAttention
from triton_backend.model.gpt import CachedGPT

from .models import ARCH, EOS, ROTARY_ARCH, VOCAB, context_model
from .test_kv_cache import reference


def attention() -> PagedAttention:
    attn = PagedAttention.__new__(PagedAttention)
    torch.nn.Module.__init__(attn)
    attn.layer_index, attn.softmax_scale = 0, None
    return attn


@pytest.mark.parametrize("groups,per_group,dim,block_size", [(8, 1, 32, 32), (2, 4, 16, 16), (1, 8, 64, 8),
                                                              (4, 2, 128, 64), (3, 1, 24, 5), (2, 3, 12, 7)])
def test_the_kernel_computes_the_torch_attention(groups, per_group, dim, block_size):
    """Rows of many lengths (a key or two, block boundaries, several blocks), tables in random pool order, some
    blocks shared by several rows (a common prefix): both paths against softmax attention in float64 over each
    row's own keys."""
    rng = np.random.default_rng(groups * dim + block_size)
    n, blocks = 9, 120
    cache = PagedKVCache(1, blocks, block_size, groups, dim, torch.float32, "cpu")
    g = torch.Generator().manual_seed(1)
    cache.keys[0].normal_(generator=g)
    cache.values[0].normal_(generator=g)
    positions = np.array([0, 1, block_size - 1, block_size, 2 * block_size, 5 * block_size + 3, 7, 40, 90])[:n]
    counts = positions // block_size + 1
    shared = rng.choice(blocks, size=2, replace=False)
    free = iter(rng.permutation(np.setdiff1d(np.arange(blocks), shared)))
    tables = [list(shared[:c]) + [next(free) for _ in range(c - 2)] if c > 2 and i % 2 else
              [next(free) for _ in range(c)] for i, c in enumerate(counts)]
    flat = np.array([b for t in tables for b in t], dtype=np.int64)
    args = (cache, torch.from_numpy(positions), np.ones(n, dtype=np.int64), flat, counts)
    q = torch.randn(n, groups * per_group, dim, generator=g)
    k, v = torch.randn(n, groups, dim, generator=g), torch.randn(n, groups, dim, generator=g)
    by_torch = attention()._cached(plan(*args), q, k, v)
    by_kernel = attention()._cached(plan(*args, pairs=False), q, k, v)
    seqs = [(torch.cat([cache.keys[0][b].transpose(0, 1) for b in t]),
             torch.cat([cache.values[0][b].transpose(0, 1) for b in t])) for t in tables]
    exact = reference(q, [s[0] for s in seqs], [s[1] for s in seqs], list(positions + 1), dim ** -0.5)
    torch.testing.assert_close(by_kernel.double(), exact, rtol=1e-5, atol=1e-5)
    # The torch path's first products in a process were seen 4e-5 off the float64 reference (once in a few runs,
    # MKL's batched GEMM; the same call again was within 3e-7), so it gets a looser bound.
    torch.testing.assert_close(by_torch.double(), exact, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", [ARCH, ROTARY_ARCH], ids=["gpt", "rotary"])
def test_the_engine_generates_the_same_with_and_without_the_kernel(arch, monkeypatch):
    model = context_model(arch)
    prompts = [[5, 17, 33, 4, 90, 61, 12], [6, 17, 33, 4, 90, 61, 12, 8, 77, 3, 40, 9, 100, 64, 1, 22, 35], [7, 1]]

    def generate(gpt):
        engine = Engine(gpt, VOCAB, EOS).start()
        try:
            runs = [engine.submit(p, SamplingParams(max_tokens=20, temperature=0.0, end_id=-1)) for p in prompts]
            assert all(g.wait(60) and g.error is None for g in runs)
        finally:
            engine.stop()
        return [(g.tokens, g.logprobs) for g in runs]

    with_kernel = CachedGPT(model, arch, max_slots=4, block_size=4)
    assert with_kernel.kernel
    got = generate(with_kernel)
    monkeypatch.setattr(decode_kernel, "library", lambda: None)
    without = CachedGPT(model, arch, max_slots=4, block_size=4)
    assert not without.kernel
    want = generate(without)
    assert len({tuple(tokens) for tokens, _ in got}) == len(prompts)
    for (tokens, logprobs), (want_tokens, want_logprobs) in zip(got, want):
        assert tokens == want_tokens  # 20 tokens after prompts of 2-17: blocks of 4 cross often
        assert logprobs == pytest.approx(want_logprobs, abs=1e-4)  # the torch path's looser bound (see above)


def test_a_kernel_that_cannot_be_built_leaves_torch_to_serve_with_one_log_line(monkeypatch, caplog):
    monkeypatch.setattr(decode_kernel.KERNEL, "_library", None)
    monkeypatch.setattr(decode_kernel.KERNEL, "_failed", False)
    monkeypatch.setattr(native.shutil, "which", lambda name: None)
    with caplog.at_level(logging.WARNING, logger="triton_backend.native"):
        assert decode_kernel.library() is None
        assert decode_kernel.library() is None  # tried once
        gpt = CachedGPT(context_model(ARCH), ARCH, max_slots=2, block_size=4)
    assert not gpt.kernel
    assert [r.getMessage() for r in caplog.records] == [
        "the CPU decode attention kernel is not available, torch operations run it: no C compiler (cc or gcc) on PATH"]


def test_the_kernel_is_built_once_per_source_and_cpu(tmp_path, monkeypatch):
    monkeypatch.setenv("KERNEL_CACHE", str(tmp_path))
    monkeypatch.setattr(decode_kernel.KERNEL, "_library", None)
    monkeypatch.setattr(decode_kernel.KERNEL, "_failed", False)
    assert decode_kernel.library() is not None
    built = list(tmp_path.glob("paged_decode-*.so"))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    monkeypatch.setattr(decode_kernel.KERNEL, "_library", None)
    assert decode_kernel.library() is not None and built[0].stat().st_mtime_ns == stamp  # reused, not rebuilt


@pytest.mark.parametrize("change", ["dtype", "device", "layout", "heads"])
def test_the_kernel_applies_only_where_it_can(change):
    keys = torch.zeros(4, 2, 16, 32)
    assert decode_kernel.applies(keys, 2)
    wrong = {"dtype": (keys.bfloat16(), 2), "device": (keys.to("meta"), 2), "layout": (keys.transpose(1, 2), 2),
             "heads": (keys, decode_kernel.MAX_HEADS + 1)}[change]
    assert not decode_kernel.applies(*wrong)


@pytest.mark.parametrize("rotated", [False, True], ids=["views", "rotated copy"])
def test_the_kernels_store_writes_what_torch_writes(rotated):
    """A step's keys and values (columns of a fused QKV product, keys possibly a rotated copy) into scattered blocks
    and offsets: the pool afterwards is the torch store's, bit for bit, and nothing else changed."""
    n, groups, per_group, d, bs = 11, 3, 2, 8, 4
    qkv = torch.randn(n, groups, (per_group + 2) * d, generator=torch.Generator().manual_seed(4))
    _, k, v = qkv.split([per_group * d, d, d], dim=-1)
    if rotated:
        k = k * 2.0  # a new contiguous tensor, as the rotary path gives: its strides differ from v's
    rng = np.random.default_rng(3)
    slots = rng.permutation(20 * bs)[:n]  # distinct (block, offset) places
    blocks, offsets = (slots // bs).astype(np.int64), (slots % bs).astype(np.int64)
    caches = [PagedKVCache(1, 20, bs, groups, d, torch.float32, "cpu") for _ in range(2)]
    for c in caches:
        c.keys[0].normal_(generator=torch.Generator().manual_seed(5))
        c.values[0].normal_(generator=torch.Generator().manual_seed(6))
    assert decode_kernel.stores(caches[0].keys[0], k, v)
    assert not decode_kernel.stores(caches[0].keys[0], k.double(), v.double())
    assert not decode_kernel.stores(caches[0].keys[0], k.transpose(1, 2).contiguous().transpose(1, 2), v)
    decode_kernel.store(caches[0].keys[0], caches[0].values[0], k, v, blocks, offsets)
    attention = PagedAttention.__new__(PagedAttention)
    torch.nn.Module.__init__(attention)
    attention.layer_index = 0
    attention.store(caches[1], torch.from_numpy(blocks), torch.from_numpy(offsets), k, v)
    assert torch.equal(caches[0].keys[0], caches[1].keys[0]) and torch.equal(caches[0].values[0], caches[1].values[0])
    assert torch.equal(caches[0].keys[0][blocks[0], :, offsets[0]], k[0])


def test_steps_planned_for_the_kernel_store_through_it():
    cache = PagedKVCache(1, 8, 4, 2, 8, torch.float32, "cpu")
    args = (cache, torch.tensor([0, 1, 2, 5]), np.array([3, 1]), np.array([0, 1, 2, 3]), np.array([1, 3]))
    assert plan(*args).host_writes is None
    blocks, offsets = plan(*args, pairs=False).host_writes
    assert blocks.tolist() == [0, 0, 0, 2] and offsets.tolist() == [0, 1, 2, 1]
