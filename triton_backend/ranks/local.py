"""A job's ranks as local processes over gloo, with the engine in-process on rank 0: for the tests and for
``tools/bench_pp.py``, which compare layouts (TP x PP, batches in flight) on the same weights without Triton.

    results = local.spawn(4, local.generate, "/tmp/ckpt", 2, 2, 2, requests)   # TP=2 x PP=2, 2 in flight
"""

from __future__ import annotations

import dataclasses
import os
import time
import traceback

import torch


def spawn(world: int, target, *args, timeout_s: float = 300, **kwargs) -> list:
    """Run ``target(*args, **kwargs)`` on ``world`` ranks (processes, torch.distributed env set); each rank's
    return value."""
    import torch.multiprocessing as mp

    from triton_backend.model.gpt import _free_port

    port = _free_port()  # the job's rendezvous (the package does not reach into tools/)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_entry, args=(rank, world, port, queue, target, args, kwargs)) for rank in range(world)]
    for p in procs:
        p.start()
    results, errors = [None] * world, []
    try:
        for _ in procs:
            rank, value, error = queue.get(timeout=timeout_s)
            results[rank] = value
            if error:
                errors.append(f"rank {rank}: {error}")
    finally:
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
    if errors:
        raise RuntimeError("\n".join(errors))
    return results


def _entry(rank: int, world: int, port: int, queue, target, args, kwargs) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    try:
        queue.put((rank, target(*args, **kwargs), None))
    except BaseException:
        queue.put((rank, None, traceback.format_exc()))


@dataclasses.dataclass
class Outcome:
    tokens: list[int]
    logprobs: list[float]
    prompt_logprobs: list[float]
    top: list
    finish_reason: str | None
    error: str | None


def generate(checkpoint: str, tp: int, pp: int, microbatches: int, requests: list, vocab_size: int = 0,
             eos_id: int = 2, max_slots: int = 64, kv_cache_mb: float = 64, threads: int = 1, graphs: str | None = None,
             tokenizer: bool = False, pp_layers: str = "", ep: int = 0, compile: int = 1,
             **engine) -> dict | None:
    """One rank of a TP x PP job serving ``checkpoint``: rank 0 runs ``requests`` ((prompt, SamplingParams), all
    submitted at once) through an engine and returns their outcomes, the seconds they took, and every rank's
    resident weight bytes; the other ranks follow and return None. ``kv_cache_mb`` may be a fraction here (a
    cache of a few blocks, for tests); ``graphs`` "eager" runs decode steps through the static steps of
    ``model/graphs.py`` without capture (how CPU tests check them); ``tokenizer``: the engine gets the
    checkpoint's tokenizer (stop words, guides); ``pp_layers``: the stage split (``PP_LAYERS``); ``ep``: EP (0:
    TP); ``compile``: 0 runs Megatron's own forward (COMPILE)."""
    import torch.distributed as dist

    from preprocessing import tokenization
    from triton_backend.config import ServerConfig
    from triton_backend.engine.engine import Engine
    from triton_backend.model.gpt import init_parallel
    from triton_backend.ranks import pipeline, protocol
    from triton_backend.server import load_gpt, tokenizer_spec

    torch.set_num_threads(threads)
    init_parallel(tp, "cpu", timeout_s=120, pipeline_parallel=pp, expert_parallel=ep or tp)
    rank = dist.get_rank()
    group = protocol.make_group(60) if tp * pp > 1 else None
    stage_groups = pipeline.make_stage_groups(tp, pp, 60) if pp > 1 else [None]
    cfg = ServerConfig(checkpoint=checkpoint, tensor_parallel=tp, pipeline_parallel=pp, pp_microbatches=microbatches,
                       pp_layers=pp_layers, expert_parallel=ep, max_slots=max_slots, kv_cache_mb=kv_cache_mb,
                       compile=compile, device="cpu")
    gpt = load_gpt(cfg, graphs)
    weights = torch.tensor([sum(p.numel() * p.element_size() for p in gpt.model.parameters())])
    if tp * pp > 1:
        every = [torch.zeros_like(weights) for _ in range(tp * pp)]
        dist.all_gather(every, weights)
        weights = torch.cat(every)
    if rank != 0:
        if pp > 1:
            pipeline.follow(gpt, tp, pp, group, stage_groups[rank // tp],
                            tokenizer=lambda: tokenization.load(tokenizer_spec(cfg, fresh=True)))
        elif tp > 1:
            protocol.follow(gpt, group)
        dist.destroy_process_group()
        return None
    if pp > 1:
        model = pipeline.PipelineLeader(gpt, tp, pp, cfg.microbatches, group, stage_groups[0])
    else:
        model = protocol.Leader(gpt, group) if tp > 1 else gpt
    vocab_size = vocab_size or gpt.arch.padded_vocab_size
    if tokenizer:
        engine["tokenizer"] = tokenization.load(tokenizer_spec(cfg, fresh=True))
    eng = Engine(model, vocab_size, eos_id, failures_fatal=tp * pp > 1, **engine).start()
    try:
        started = time.perf_counter()
        generations = [eng.submit(list(prompt), params) for prompt, params in requests]
        for g in generations:
            g.wait(600)
        seconds = time.perf_counter() - started
        experts = eng.expert_tokens(wait_s=30)  # every stage's, carried back by a heartbeat
    finally:
        eng.stop()
    outcomes = [Outcome(g.tokens, g.logprobs, g.prompt_logprobs, g.top, g.finish_reason, g.error)
                for g in generations]
    stats = dataclasses.asdict(eng.stats)
    dist.destroy_process_group()
    return {"outcomes": outcomes, "seconds": seconds, "weights": weights.tolist(), "stats": stats,
            "experts": experts,
            "fatal": repr(eng.fatal) if eng.fatal else None}
