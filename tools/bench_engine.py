"""`make bench-engine`: the engine against Hugging Face transformers' ``generate()`` on the same weights, one run.

    torchrun --standalone --nproc-per-node 1 -m tools.bench_engine [--models demo gpt-350m moe] [--rounds 1]

For each model (the demo model; ``gpt-350m``, a random-init ~350M GPT-2 shape written once to
``results/gpt-350m``; ``moe``, the Mixtral-style preset, 8 experts top-2, against ``MixtralForCausalLM``, written
once to ``results/moe``) and batch size, both generate greedily exactly N new tokens after the same prompt
(``tools.offline.BENCH_PROMPT``) repeated ``batch`` times, each after a warm-up: the engine in-process
(``tools.offline.bench``) and ``generate()`` on the model ``tools.hf_reference`` builds from the engine's own
loaded weights, float32 on CPU. It prints tokens/s and the ratio (engine / transformers) per row, the batch-1
step time of each against the time one read of the weights takes at the memory bandwidth measured in this run,
and checks that both models agree: the largest logit difference on the prompt, and how many of the batch-1 greedy
tokens match. For a mixture of experts it also counts the weight bytes a batch-1 decode step multiplies by
(``decode_weight_bytes``) against what such a step must read: the dense parts and the top-k experts of each
MoE layer.

Fair placement: the threads and cores are the server's (``set_threads``: TORCH_THREADS, else half the cores;
``engine_cpus``: PIN_ENGINE pins the engine thread to cores of its own). transformers runs on one worker thread
that pins itself to the same cores as the engine thread does, with the same torch thread count, while this
thread (which only waits, in both) keeps to the rest. The bandwidth is measured on
that worker too: it is what those cores can read.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import math
import os
import pathlib
import statistics
import subprocess
import sys
import time

import torch

from preprocessing.params import SamplingParams
from preprocessing.tokenization import load_path
from tools import hf_reference
from tools.offline import BENCH_PROMPT, bench
from triton_backend.config import ServerConfig
from triton_backend.model.gpt import CachedGPT, init_parallel, kv_bytes_per_token
from triton_backend.server import engine_cpus, load_engine, set_threads

ROOT = pathlib.Path(__file__).resolve().parent.parent
DEMO = ROOT / "demo_model"
BIG_CHECKPOINT = ROOT / "results" / "gpt-350m"
MOE_CHECKPOINT = ROOT / "results" / "moe"
BANDWIDTH_MIB = 512  # big enough to leave every cache level behind
# What torchrun tells its workers. A child given TORCHELASTIC_USE_AGENT_STORE would wait for a store server that
# never comes, so a plain child process gets none of it.
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK", "ROLE_NAME",
                      "ROLE_WORLD_SIZE", "GROUP_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


class PinnedWorker:
    """One thread for everything transformers runs, pinned to ``cpus`` as the engine thread pins itself
    (``Engine._loop``), so that its torch thread pool starts on the same cores with the same thread count."""

    def __init__(self, cpus: set[int] | None):
        self.cpus = cpus
        self.pool = concurrent.futures.ThreadPoolExecutor(1, "transformers", initializer=self._pin)

    def _pin(self) -> None:
        if self.cpus:
            os.sched_setaffinity(0, self.cpus)  # this thread only

    def run(self, fn, *args):
        return self.pool.submit(fn, *args).result()

    def placement(self) -> dict:
        return self.run(lambda: {"torch_threads": torch.get_num_threads(), "cores": sorted(os.sched_getaffinity(0))})


def memory_bandwidth(mib: int = BANDWIDTH_MIB, repeats: int = 5) -> dict:
    """Bytes/s of the best of ``repeats`` sums (a pure read) and copies (a read and a write) of ``mib`` MiB."""
    src = torch.ones(mib * 2**20 // 4)
    dst = torch.empty_like(src)
    sums, copies = [], []
    for _ in range(repeats):
        started = time.perf_counter()
        src.sum()
        sums.append(time.perf_counter() - started)
        started = time.perf_counter()
        dst.copy_(src)
        copies.append(time.perf_counter() - started)
    size = src.numel() * 4
    return {"read_gb_per_s": round(size / min(sums) / 1e9, 2), "copy_gb_per_s": round(2 * size / min(copies) / 1e9, 2)}


class StepClock:
    """A logits processor that notes when each new token's logits are ready (and masks the padded vocabulary
    rows the engine never samples): the first is the prompt's, the gaps between the others are decode steps."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size
        self.times: list[float] = []

    def __call__(self, input_ids, scores):
        self.times.append(time.perf_counter())
        if scores.shape[-1] > self.vocab_size:
            scores[:, self.vocab_size:] = float("-inf")
        return scores


def hf_bench(model, prompt: list[int], batch: int, max_tokens: int, vocab_size: int, pad_id: int) -> dict:
    """``bench``'s figures for transformers' ``generate()``: ``batch`` copies of ``prompt``, greedy, exactly
    ``max_tokens`` new tokens each (no end token: ``eos_token_id`` is None, as the engine's ``end_id=-1``)."""
    from transformers import LogitsProcessorList

    ids = torch.tensor([prompt] * batch)

    def generate(n: int, clock: StepClock):
        with torch.inference_mode():
            return model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                                  min_new_tokens=n, eos_token_id=None, pad_token_id=pad_id,
                                  logits_processor=LogitsProcessorList([clock]))

    generate(2, StepClock(vocab_size))  # warm-up
    clock = StepClock(vocab_size)
    started = time.perf_counter()
    out = generate(max_tokens, clock)
    seconds = time.perf_counter() - started
    new = out[:, len(prompt):]
    first = clock.times[0] - started
    return {"batch": batch, "output_tokens": new.numel(), "seconds": round(seconds, 3),
            "tokens_per_s": round(new.numel() / seconds, 1), "first_token_s": round(first, 4),
            "step_ms": round(1000 * (clock.times[-1] - clock.times[0]) / max(1, max_tokens - 1), 2),
            "tokens": new[0].tolist()}


def agreeing_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens two greedy continuations share (float rounding may split near-ties later)."""
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def ensure_checkpoint(path: pathlib.Path, preset: str = "gpt-350m") -> None:
    """Write a random-init preset once (gpt-350m: 1.2 GB, about 40 s on 2 cores) in a plain process with a
    one-rank group of its own, since ``make_checkpoint`` ends the process group it runs in."""
    if (path / "latest_checkpointed_iteration.txt").exists():
        return
    print(f"writing the {preset} checkpoint to {path} (once)", flush=True)
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARIABLES and not k.startswith("TORCHELASTIC_")}
    subprocess.run([sys.executable, "-m", "triton_backend.make_checkpoint", "--random", preset, "--vocab", "4096",
                    "--out", str(path)], cwd=ROOT, env=env, check=True)


def kv_cache_mb(checkpoint: pathlib.Path, batch: int, tokens_per_sequence: int) -> int:
    """A KV cache for ``batch`` sequences of ``tokens_per_sequence`` (at least one full context, which the
    engine requires): the server's default, half the free RAM, would allocate gigabytes for gpt-350m."""
    from triton_backend import checkpoints

    arch = checkpoints.read_architecture(checkpoint)
    block = CachedGPT.BLOCK_SIZE
    context = min(arch.seq_length, arch.max_position_embeddings)
    blocks = max(-(-context // block), batch * -(-tokens_per_sequence // block))
    return math.ceil(blocks * block * kv_bytes_per_token(arch, 1, torch.float32) / 2**20) + 1


def decode_weight_bytes(engine, prompt: list[int], max_tokens: int) -> dict:
    """Weight bytes the fast path multiplies by in a batch-1 decode step (every product of one row, counted by
    wrapping ``functional._Linear``), against what the step must read: every linear weight but the routed
    experts', plus ``moe_router_topk`` experts per MoE layer."""
    from triton_backend.model import functional

    fast = engine.gpt.fast
    if fast is None:
        return {}
    counted = [0]
    call = functional._Linear.__call__

    def counting(linear, x):
        if x.shape[0] == 1:
            counted[0] += linear.weight.numel() * linear.weight.element_size()
        return call(linear, x)

    functional._Linear.__call__ = counting
    try:
        g = engine.submit(prompt, SamplingParams(max_tokens=max_tokens, temperature=0.0, end_id=-1))
        g.wait()
    finally:
        functional._Linear.__call__ = call
    size = lambda linear: linear.weight.numel() * linear.weight.element_size()  # noqa: E731
    needed = size(fast.output)
    for layer in fast.layers:
        needed += size(layer.qkv) + size(layer.proj)
        if layer.moe is None:
            needed += size(layer.fc1) + size(layer.fc2)
            continue
        expert = size(layer.moe.experts[0][0]) + size(layer.moe.experts[0][1])
        needed += layer.moe.router.config.moe_router_topk * expert
        if layer.moe.shared is not None:
            needed += size(layer.moe.shared[0]) + size(layer.moe.shared[1])
    per_step = counted[0] / (max_tokens - 1)
    return {"decode_weight_mb_read": round(per_step / 1e6, 3), "decode_weight_mb_needed": round(needed / 1e6, 3),
            "read_over_needed": round(per_step / needed, 3)}


def bench_model(name: str, checkpoint: pathlib.Path, batches: list[int], max_tokens: int, rounds: int,
                base: ServerConfig, cpus: set[int] | None, worker: PinnedWorker, bandwidth: dict) -> list[dict]:
    """One model: its engine (the server's settings, a KV cache sized for the run) and the transformers copy of
    its weights, each batch size run by both; one row per batch size, medians over ``rounds``."""
    tokenizer = load_path(DEMO / "tokenizer.model")
    prompt = tokenizer.encode(BENCH_PROMPT)
    cfg = ServerConfig(**{**base.__dict__, "checkpoint": checkpoint, "tokenizer": DEMO / "tokenizer.model",
                          "max_slots": max(batches),
                          "kv_cache_mb": base.kv_cache_mb or kv_cache_mb(checkpoint, max(batches),
                                                                          len(prompt) + max_tokens)})
    started = time.perf_counter()
    engine = load_engine(cfg, cpus=cpus).start()
    try:
        megatron = engine.gpt.model
        hf = hf_reference.hf_from_megatron(megatron, engine.gpt.arch)
        with torch.inference_mode():
            diff = hf_reference.max_logit_difference(megatron, hf, torch.tensor([prompt]))
        params = sum(p.numel() for p in hf.parameters())  # tied embeddings counted once
        weights_bytes = params * 4
        print(json.dumps({"model": name, "parameters_m": round(params / 1e6, 1), "load_s":
                          round(time.perf_counter() - started, 1), "prompt_tokens": len(prompt),
                          "max_abs_logit_diff_on_prompt": diff}), flush=True)
        runs: dict[int, dict[str, list[dict]]] = {b: {"engine": [], "hf": []} for b in batches}
        for round_ in range(rounds):
            for batch in batches:
                order = ("engine", "hf") if round_ % 2 == 0 else ("hf", "engine")
                for who in order:
                    if who == "engine":
                        runs[batch][who].append(bench(engine, tokenizer, batch, max_tokens))
                    else:
                        runs[batch][who].append(worker.run(hf_bench, hf, prompt, batch, max_tokens,
                                                           tokenizer.vocab_size, tokenizer.pad_id))
        rows = []
        for batch in batches:
            row = {"model": name, "batch": batch, "max_tokens": max_tokens}
            for who in ("engine", "hf"):
                for key in ("tokens_per_s", "step_ms", "first_token_s"):
                    row[f"{who}_{key}"] = round(statistics.median(r[key] for r in runs[batch][who]), 4)
            row["ratio"] = round(row["engine_tokens_per_s"] / row["hf_tokens_per_s"], 2)
            if batch == 1:
                g = engine.submit(prompt, SamplingParams(max_tokens=max_tokens, temperature=0.0, end_id=-1))
                g.wait()
                row["greedy_tokens_agree"] = f"{agreeing_prefix(g.tokens, runs[1]['hf'][0]['tokens'])}/{max_tokens}"
                read_ms = 1000 * weights_bytes / (bandwidth["read_gb_per_s"] * 1e9)
                row.update(weights_mb=round(weights_bytes / 1e6, 1), weights_read_ms=round(read_ms, 2),
                           engine_step_over_read=round(row["engine_step_ms"] / read_ms, 2),
                           hf_step_over_read=round(row["hf_step_ms"] / read_ms, 2))
            print(json.dumps(row), flush=True)
            rows.append(row)
        if engine.gpt.arch.num_experts:
            print(json.dumps({"model": name, **decode_weight_bytes(engine, prompt, max_tokens)}), flush=True)
        return rows
    finally:
        engine.stop()


def table(rows: list[dict]) -> None:
    print("\nmodel    | batch | tokens | engine tok/s | transformers tok/s | engine / transformers")
    for r in rows:
        print(f"{r['model']:<8} | {r['batch']:>5} | {r['max_tokens']:>6} | {r['engine_tokens_per_s']:>12} | "
              f"{r['hf_tokens_per_s']:>18} | {r['ratio']:>5.2f}")
    print("\nbatch 1  | engine step ms | transformers step ms | weights MB | one read of them ms | "
          "engine / read | transformers / read | greedy tokens agree")
    for r in rows:
        if r["batch"] == 1:
            print(f"{r['model']:<8} | {r['engine_step_ms']:>14} | {r['hf_step_ms']:>20} | {r['weights_mb']:>10} | "
                  f"{r['weights_read_ms']:>19} | {r['engine_step_over_read']:>13} | {r['hf_step_over_read']:>19} | "
                  f"{r['greedy_tokens_agree']}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=["demo", "gpt-350m", "moe"], default=["demo", "gpt-350m", "moe"])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16, 64], help="demo model batch sizes")
    parser.add_argument("--max-tokens", type=int, default=64, help="demo model new tokens per sequence")
    parser.add_argument("--big-batch", type=int, nargs="+", default=[1, 16, 64], help="gpt-350m batch sizes")
    parser.add_argument("--big-max-tokens", type=int, default=32)
    parser.add_argument("--moe-batch", type=int, nargs="+", default=[1, 16], help="moe preset batch sizes")
    parser.add_argument("--moe-max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=1, help="runs of each, order alternating; medians printed")
    a = parser.parse_args()
    if int(os.environ.get("WORLD_SIZE", "1")) != 1:
        print("run with one process: torchrun --standalone --nproc-per-node 1 -m tools.bench_engine",
              file=sys.stderr)
        return 2
    if "gpt-350m" in a.models:
        ensure_checkpoint(BIG_CHECKPOINT)
    if "moe" in a.models:
        ensure_checkpoint(MOE_CHECKPOINT, "moe")

    # The engine as the server runs it on CPU, in float32 like the transformers model.
    base = ServerConfig(**{**ServerConfig.from_env().__dict__, "device": "cpu", "dtype": "float32",
                           "tensor_parallel": 1})
    set_threads(base)
    cpus = engine_cpus(base)  # before init_parallel, as the server does: gloo's threads keep off these cores
    init_parallel(1, "cpu")
    worker = PinnedWorker(cpus)
    placement = worker.placement()
    bandwidth = worker.run(memory_bandwidth)
    print(json.dumps({"torch_threads": torch.get_num_threads(), "pin_engine": base.pin_engine,
                      "engine_thread_cores": sorted(cpus) if cpus else "unpinned (all)",
                      "transformers_thread": placement, "main_thread_cores": sorted(os.sched_getaffinity(0)),
                      "memory_bandwidth": bandwidth}), flush=True)
    rows = []
    models = {"demo": (DEMO / "checkpoint", a.batch, a.max_tokens),
              "gpt-350m": (BIG_CHECKPOINT, a.big_batch, a.big_max_tokens),
              "moe": (MOE_CHECKPOINT, a.moe_batch, a.moe_max_tokens)}
    try:
        for name in a.models:
            checkpoint, batches, max_tokens = models[name]
            rows += bench_model(name, checkpoint, batches, max_tokens, a.rounds, base, cpus, worker, bandwidth)
    finally:
        worker.pool.shutdown()
        torch.distributed.destroy_process_group()
    table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
