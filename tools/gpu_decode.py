"""Decode step time against the bytes a step must read, as a fraction of the GPU's memory bandwidth.

    python3 tools/gpu_decode.py [--rows 1 64] [--context 1024 8192 32768] [--bandwidth-gbs 3350]

A random-init model of Llama-3.2-1B's shape (16 layers, hidden 2048, 32 query heads in 8 key-value groups of
head_dim 64, SwiGLU 8192, vocabulary 128256, untied) in bfloat16 on one GPU, in-process: ``CachedGPT``, the
model rank 0 serves, with its CUDA graphs (captured at start) and FlexAttention over the paged cache. For each
rows x context it places every row's block table at that context and times decode steps (CUDA events, the
median of ``--steps``); a step must read the weights (all but the input embedding, of which it reads a row per
sequence) and every row's live keys and values. It also times one prefill chunk of ``--prefill`` tokens, and runs
decode steps with their sampling under ``torch.cuda.set_sync_debug_mode("warn")``, counting the times a step
waits on the device from the host (a read back, a synchronising copy): one, reading the sampled tokens back.
One JSON line per figure; the last lines hold the targets: batch-1 decode at 1k context >= 70 % of the
bandwidth, 64 x 8k within 1.5x of (weights + KV) / bandwidth.

``--tiny --device cpu`` runs the same code on a small model on CPU, without capture (a dry run: the tests do).
"""

from __future__ import annotations

import argparse
import functools
import json
import pathlib
import statistics
import sys
import time
import warnings

import numpy as np
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
from preprocessing.params import SamplingParams  # noqa: E402
from triton_backend.engine.outputs import compute  # noqa: E402
from triton_backend.engine.sampling import RowSampler  # noqa: E402
from triton_backend.model.architecture import GPTArchitecture  # noqa: E402
from triton_backend.model.gpt import CachedGPT, build_model, init_parallel, kv_bytes_per_token  # noqa: E402

LLAMA_1B = dict(num_layers=16, hidden_size=2048, num_attention_heads=32, num_query_groups=8, kv_channels=64,
                ffn_hidden_size=8192, padded_vocab_size=128256, position_embedding_type="rope", rotary_base=500000,
                normalization="RMSNorm", swiglu=True, add_bias_linear=False, untie_embeddings_and_output_weights=True)
TINY = dict(LLAMA_1B, num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, kv_channels=16,
            ffn_hidden_size=128, padded_vocab_size=512)
# HBM bandwidth by the name nvidia-smi gives (GB/s, the vendor's figure); --bandwidth-gbs overrides
BANDWIDTH_GBS = {"H200": 4800, "H100 NVL": 3900, "H100 PCIe": 2000, "H100": 3350, "A100-SXM4-80GB": 2039,
                 "A100 80GB PCIe": 1935, "A100": 1555, "L40S": 864}


def bandwidth(name: str) -> float | None:
    for key in sorted(BANDWIDTH_GBS, key=len, reverse=True):
        if key in name:
            return BANDWIDTH_GBS[key] * 1e9
    return None


class Clock:
    """Seconds of device work between two marks: CUDA events on CUDA, the wall clock elsewhere."""

    def __init__(self, device: str):
        self.cuda = device == "cuda"

    def time(self, fn) -> float:
        if not self.cuda:
            started = time.perf_counter()
            fn()
            return time.perf_counter() - started
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3


def decode_step(gpt: CachedGPT, rows: int, context: int, first_block: int = 0):
    """A decode step of ``rows`` sequences, each ``context`` tokens long (its last token being decoded), with
    consecutive blocks from ``first_block``, as the engine runs it (``CachedGPT.step``): the sequences' tables are
    put in slots 0 .. rows - 1 first, so the step itself carries none. Its device inputs and host arrays."""
    blocks = -(-context // gpt.cache.block_size)
    slots, table_lengths = np.arange(rows, dtype=np.int64), np.full(rows, blocks, np.int64)
    gpt.tables.apply(slots, np.zeros(rows, np.int64), table_lengths,
                     np.arange(first_block, first_block + rows * blocks, dtype=np.int64))
    host = (np.full(rows, context - 1, dtype=np.int64), np.ones(rows, np.int64), slots, table_lengths,
            table_lengths, np.zeros(0, np.int64))
    return step_args(gpt, rows, host, torch.arange(rows, device=gpt.device)), host


def step_args(gpt: CachedGPT, tokens: int, host: tuple, last: torch.Tensor) -> tuple:
    """``CachedGPT.step``'s device inputs: ``tokens`` zeros, then the host arrays (positions, lengths, slots,
    keeps, table lengths, entries) uploaded, ``last`` among them."""
    positions, lengths, *tables = (torch.from_numpy(a).to(gpt.device) for a in host)
    return (torch.zeros(tokens, dtype=torch.long, device=gpt.device), positions, last, lengths, *tables)


def step_syncs(gpt: CachedGPT, arch, rows: int, context: int, device: str, steps: int = 3):
    """Decode steps as the engine runs them (``CachedGPT.step``, then ``outputs.compute``: penalties, top-p,
    temperature, the tokens read back) under ``torch.cuda.set_sync_debug_mode("warn")``: the waits on the device
    per step, with what waited ({"count": n, "where": [...]}). On CPU the same steps run (a dry run), unchecked."""
    args, host = decode_step(gpt, rows, context)
    params = SamplingParams(max_tokens=steps, temperature=0.8, top_p=0.9, repetition_penalty=1.1)
    samplers = [RowSampler(params, [1, 2, 3], -1, seed=i) for i in range(rows)]

    def run():
        for _ in range(steps):
            out = compute(gpt.step(*args, host=host), [], samplers, arch.padded_vocab_size)
            for sampler, token in zip(samplers, out.tokens):
                sampler.accept(token)

    if device != "cuda":
        run()
        return "not checked (CPU)"
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            run()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    waits = [str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message)]
    return {"count": len(waits) / steps, "where": sorted(set(waits))[:5]}


def weight_bytes(model) -> int:
    """Bytes a decode step reads of the weights: all of them but the input embedding."""
    embedding = model.embedding.word_embeddings.weight
    return sum(p.numel() * p.element_size() for p in model.parameters() if p is not embedding)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--context", type=int, nargs="+", default=[1024, 8192, 32768])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--prefill", type=int, default=2048)
    parser.add_argument("--bandwidth-gbs", type=float, default=0)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="a small model (a dry run on CPU)")
    parser.add_argument("--kv-gb", type=float, default=0, help="KV cache size; default: what the largest case needs")
    a = parser.parse_args(argv)
    init_parallel(1, a.device)
    dtype = torch.bfloat16 if a.device == "cuda" else torch.float32
    longest = max(a.context)
    arch = GPTArchitecture(max_position_embeddings=longest, seq_length=longest, **(TINY if a.tiny else LLAMA_1B))
    torch.manual_seed(0)
    model = build_model(arch, dtype, init_method_std=0.02).to(a.device)
    block = CachedGPT.BLOCK_SIZE
    per_token = kv_bytes_per_token(arch, 1, dtype)
    wanted = max(r * -(-c // block) for r in a.rows for c in a.context) + -(-a.prefill // block)
    num_blocks = int(a.kv_gb * 2**30 // (per_token * block)) if a.kv_gb else wanted
    if a.device == "cuda":  # what fits: the cases past it are left out (64 x 32k needs 69 GB at this shape)
        num_blocks = min(num_blocks, int(torch.cuda.mem_get_info()[0] * 0.75 // (per_token * block)))
    gpt = CachedGPT(model, arch, max_slots=max(a.rows), max_len=longest, num_blocks=num_blocks,
                    graphs="auto" if a.device == "cuda" else "eager")
    gpt.prepare()
    name = torch.cuda.get_device_name() if a.device == "cuda" else "cpu"
    peak = a.bandwidth_gbs * 1e9 if a.bandwidth_gbs else bandwidth(name)
    weights = weight_bytes(model)
    clock = Clock(a.device)
    print(json.dumps({"device": name, "bandwidth_gbs": peak and peak / 1e9, "weights_gb": weights / 1e9,
                      "kv_blocks": num_blocks, "graphs": gpt.graphs is not None, "flex": gpt.flex}), flush=True)
    figures = {}
    for rows in a.rows:
        for context in a.context:
            if rows * -(-context // block) > num_blocks:
                continue
            args, host = decode_step(gpt, rows, context)
            for _ in range(3):  # warm-up
                gpt.step(*args, host=host)
            step = functools.partial(gpt.step, *args, host=host)
            times = [clock.time(step) for _ in range(a.steps)]
            seconds = statistics.median(times)
            needed = weights + rows * context * per_token
            line = {"rows": rows, "context": context, "step_ms": round(seconds * 1e3, 3),
                    "needed_gb": round(needed / 1e9, 3), "achieved_gbs": round(needed / seconds / 1e9, 1)}
            if peak:
                line["fraction_of_bandwidth"] = round(needed / seconds / peak, 3)
                line["step_over_ideal"] = round(seconds / (needed / peak), 2)
            figures[(rows, context)] = line
            print(json.dumps(line), flush=True)
    # one prefill chunk of a new sequence (its whole table sent), in blocks past the decode rows'
    chunk = a.prefill
    blocks = -(-chunk // block)
    host = (np.arange(chunk, dtype=np.int64), np.array([chunk]), np.array([0]), np.array([0]), np.array([blocks]),
            np.arange(num_blocks - blocks, num_blocks, dtype=np.int64))
    args = step_args(gpt, chunk, host, torch.tensor([chunk - 1], device=a.device))
    gpt.step(*args, host=host)
    seconds = statistics.median(clock.time(lambda: gpt.step(*args, host=host)) for _ in range(5))
    print(json.dumps({"prefill_tokens": chunk, "prefill_ms": round(seconds * 1e3, 2),
                      "prefill_tokens_per_s": round(chunk / seconds)}), flush=True)
    # a decode step, sampling included, waits on the device once: to read the sampled tokens back
    syncs = step_syncs(gpt, arch, min(a.rows), min(a.context), a.device)
    print(json.dumps({"device_waits_per_decode_step": syncs, "target": 1}), flush=True)
    if peak and (1, 1024) in figures:
        print(f"batch-1 decode at 1k context: {figures[(1, 1024)]['fraction_of_bandwidth']:.0%} of the memory "
              f"bandwidth (target: 70 %)")
    if peak and (64, 8192) in figures:
        print(f"64 x 8k decode step: {figures[(64, 8192)]['step_over_ideal']:.2f}x (weights + KV) / bandwidth "
              f"(target: 1.5x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
