"""Serve a Megatron GPT checkpoint: ``torchrun --nproc-per-node $TP -m triton_backend.server``.

Rank 0 loads its shard and starts the engine, which leads the other ranks. It then starts the serving process
(``frontend.py``): Triton with ``model_repository/`` (preprocessing, postprocessing, the ensembles) and the
generation models bound by PyTriton, joined to the engine by ``engine_link.py``. Rank 0 supervises it and
drains on SIGTERM.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Connection

import psutil
import torch

from triton_backend import checkpoints
from triton_backend.config import ROOT, ServerConfig
from triton_backend.engine.engine import CPU_PREFILL_TOKENS, CUDA_PREFILL_TOKENS, Engine
from triton_backend.model import functional
from triton_backend.model.gpt import (
    CacheBudgetError,
    CachedGPT,
    build_model,
    fit_blocks,
    init_distributed,
    init_parallel,
    kv_bytes_per_token,
)
from triton_backend.model.graphs import reserve_bytes as graphs_reserve
from triton_backend.ranks import agreement, pipeline, session
from triton_backend.ranks.pipeline import PipelineLeader
from triton_backend.ranks.protocol import Leader, RankLost, describe, follow, make_group
from triton_backend.serving.engine_link import EngineHost
from triton_backend.serving.frontend import remove_shared_memory

LOG = logging.getLogger("megatron_triton")
KV_SHARE_OF_FREE_MEMORY = 0.8  # CUDA: the rest is left for activations and logits
# CPU: the serving processes (Triton, its Python backends, PyTriton) start after the cache is allocated and
# share the same memory, as do the other ranks of the job on this machine.
KV_SHARE_OF_AVAILABLE_RAM = 0.5
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_gpt(cfg: ServerConfig, graphs: str | None = None) -> CachedGPT:
    """This rank's shard of the model, built from the checkpoint's own args, weights loaded, KV cache ready.
    ``graphs`` overrides CUDA_GRAPHS (``CachedGPT``'s "auto", "eager" or "off": tests run static steps on CPU)."""
    arch = checkpoints.read_architecture(cfg.checkpoint, cfg.tensor_parallel, cfg.pipeline_parallel, cfg.pp_layers,
                                         cfg.experts_split)
    model = build_model(arch, DTYPES[cfg.dtype], cfg.tensor_parallel, cfg.pipeline_parallel)
    checkpoints.load_weights(model, cfg.checkpoint, arch)
    model = model.to(cfg.device)
    max_len = min(arch.seq_length, arch.max_position_embeddings)
    layers = len(model.decoder.layers)  # this pipeline stage's
    per_token = kv_bytes_per_token(arch, cfg.tensor_parallel, DTYPES[cfg.dtype], layers)
    block = CachedGPT.BLOCK_SIZE
    # the fast path's packed weights are made after the cache: their memory is not there to take
    packing = functional.packed_bytes(model) if cfg.compile and functional.supported(model) is None else 0
    budget = kv_budget(cfg, packing)
    # the graphs' memory is not the cache's
    if cfg.device == "cuda" and cfg.cuda_graphs and cfg.attention != "torch" and not cfg.kv_cache_mb:
        context = -(-max_len // block)
        reserve = graphs_reserve(arch, cfg.max_slots, cfg.tensor_parallel, DTYPES[cfg.dtype], cfg.max_slots * context,
                                 context)
        LOG.info("CUDA graphs: %.1f MiB kept out of the KV cache's budget", reserve / 2**20)
        budget = max(0, budget - reserve)
    blocks = fit_blocks(cfg.max_slots, max_len, block, per_token, budget)
    if torch.distributed.get_world_size() > 1:  # every rank (every stage) must hold the same blocks
        agreed = torch.tensor([blocks], device=cfg.device)
        torch.distributed.all_reduce(agreed, op=torch.distributed.ReduceOp.MIN)
        blocks = int(agreed)
    LOG.info("KV cache: %d blocks of %d tokens (%d full %d-token contexts), %.1f MiB per rank; %d sequences at "
             "most (MAX_SLOTS)", blocks, block, blocks * block // max_len, max_len,
             blocks * block * per_token / 2**20, cfg.max_slots)
    gpt = CachedGPT(model, arch, max_slots=cfg.max_slots, num_blocks=blocks, fast=bool(cfg.compile),
                    graphs=graphs or ("auto" if cfg.cuda_graphs else "off"), attention=cfg.attention)
    # every rank, before rank 0 serves: captured now, or off on all
    gpt.prepare(cfg.prefill_tokens or (CUDA_PREFILL_TOKENS if cfg.device == "cuda" else CPU_PREFILL_TOKENS))
    return gpt


def kv_budget(cfg: ServerConfig, pending_bytes: int = 0) -> int:
    """Bytes the KV cache may take on this rank: KV_CACHE_MB, else a share of the memory free after the weights
    (on CPU shared with the job's other ranks on this machine, and less the ``pending_bytes`` the model will
    still take: its packed weights)."""
    if cfg.kv_cache_mb:
        return int(cfg.kv_cache_mb * 2**20)
    if cfg.device == "cuda":
        free, _ = torch.cuda.mem_get_info()
        return int(free * KV_SHARE_OF_FREE_MEMORY)
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    available = psutil.virtual_memory().available - pending_bytes * local_ranks
    return int(max(0, available) * KV_SHARE_OF_AVAILABLE_RAM / local_ranks)


def tokenizer_spec(cfg: ServerConfig, fresh: bool = False):
    """The job's tokenizer spec: the one already exported (``main`` exports it, ``fresh``), else resolved here from
    the checkpoint's args and TOKENIZER / TOKENIZER_TYPE, its files checked, and exported for what follows (the
    serving process, Triton's models and the API inherit it)."""
    from preprocessing import tokenization

    if fresh or tokenization.ENV not in os.environ:
        os.environ[tokenization.ENV] = checkpoints.tokenizer_spec(cfg.checkpoint, cfg.tokenizer,
                                                                  cfg.tokenizer_type).to_json()
    return tokenization.TokenizerSpec.from_json(os.environ[tokenization.ENV])


def set_threads(cfg: ServerConfig) -> None:
    """Torch's CPU threads: on a CPU-only box Triton, its Python backends and PyTriton need cores too. Measured on
    2 cores (``tools/bench.py``): one torch thread serves 797 tokens/s at concurrency 16, two serve 580 (the
    spinning intra-op threads and the serving processes take cores from each other), and the engine alone is
    no slower with one."""
    if cfg.torch_threads:
        torch.set_num_threads(cfg.torch_threads)
    elif cfg.device == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))


def load_engine(cfg: ServerConfig, group=None, cpus: set[int] | None = None, stage_group=None) -> Engine:
    """Rank 0: the model (leading the followers over ``group`` when TP > 1, launching steps into the pipeline
    when PP > 1, ``stage_group`` being the first stage's TP group) and the tokenizer (the spec ``main``
    exported), in an engine whose thread runs on ``cpus`` (see ``engine_cpus``)."""
    from preprocessing import tokenization

    spec = tokenizer_spec(cfg)
    tokenizer = tokenization.load(spec)
    LOG.info("tokenizer %s: %d ids, end of document %d", spec.describe(), tokenizer.vocab_size, tokenizer.eos_id)
    gpt = load_gpt(cfg)
    if tokenizer.vocab_size > gpt.arch.padded_vocab_size:
        raise checkpoints.CheckpointError(
            f"tokenizer {spec.describe()} has {tokenizer.vocab_size} ids but the model only "
            f"{gpt.arch.padded_vocab_size} embeddings (is TOKENIZER_TYPE right?)")
    tp, pp = cfg.tensor_parallel, cfg.pipeline_parallel
    if pp > 1:
        model = PipelineLeader(gpt, tp, pp, cfg.microbatches, group, stage_group)
    else:
        model = Leader(gpt, group) if tp > 1 else gpt
    return Engine(model, tokenizer.vocab_size, tokenizer.eos_id,
                  max_queue=cfg.max_queue, failures_fatal=cfg.world_size > 1, tokenizer=tokenizer,
                  max_request_s=cfg.max_request_s, cpus=cpus, prefix_caching=bool(cfg.prefix_caching),
                  prefill_tokens=cfg.prefill_tokens or (CUDA_PREFILL_TOKENS if cfg.device == "cuda" else
                                                        CPU_PREFILL_TOKENS))


def engine_cpus(cfg: ServerConfig) -> set[int] | None:
    """On CPU at TP=1, cores of the engine thread's own (one per torch thread); the calling thread keeps the
    rest, and so do the threads and processes it starts later: gloo's (call this before ``init_parallel``),
    PyTriton's, tritonserver, the backend stubs.

    The engine thread is the server's critical path; unpinned, the scheduler puts Triton's processes on its
    core. On 2 cores at 16 streams, served steps took 10.2-10.4 ms pinned against 11.7-12.0 unpinned, and
    16 streams got 1,400-1,440 tokens/s against 1,260-1,300 (``PIN_ENGINE=0|1 .venv/bin/python
    tools/bench.py --concurrency 16 --requests-per-client 8``, two runs each). Off with ``PIN_ENGINE=0``,
    and where there is no core to spare.
    """
    if not cfg.pin_engine or cfg.device != "cpu" or cfg.world_size != 1:
        return None
    cores = sorted(os.sched_getaffinity(0))
    n = torch.get_num_threads()
    if len(cores) <= n:
        return None
    os.sched_setaffinity(0, cores[n:])
    LOG.info("engine thread on cores %s, the rest of the server on %s", cores[:n], cores[n:])
    return set(cores[:n])


class ServingProcess:
    """Rank 0's serving process (``frontend.py``: Triton, the pipeline, PyTriton), joined to the engine.

    It inherits this thread's cores, which ``engine_cpus`` left to everything but the engine thread.
    """

    def __init__(self, cfg: ServerConfig, engine: Engine):
        ours, theirs = socket.socketpair()
        self.process = subprocess.Popen(
            [sys.executable, "-u", "-m", "triton_backend.serving.frontend", str(theirs.fileno()),
             str(engine.vocab_size), str(engine.context)],
            pass_fds=[theirs.fileno()], env={**os.environ, "DEVICE": cfg.device}, cwd=ROOT,
        )
        theirs.close()
        self.host = EngineHost(engine, Connection(ours.detach()), serving=SERVING,
                               handover_timeout_s=cfg.collective_timeout_s)
        self._seen: dict[int, psutil.Process] = {}  # its descendants (tritonserver, the stubs), as last seen

    def alive(self) -> bool:
        """Whether it runs and its end of the link is open."""
        if self.process.poll() is not None or self.host.gone.is_set():
            return False
        if not self._seen and self.host.serving.is_set():  # Triton and its stubs are all up: note them once
            self._note_descendants()
        return True

    def _note_descendants(self) -> None:
        """Remember what it started, to kill what outlives it if it dies abruptly (its children are then
        re-parented and no longer found under it)."""
        with contextlib.suppress(psutil.NoSuchProcess):
            self._seen |= {p.pid: p for p in psutil.Process(self.process.pid).children(recursive=True)}

    def stop(self, timeout_s: float = 20.0) -> None:
        """Ask it to stop Triton and exit; kill it if it does not, and whatever it started that outlived it."""
        self._note_descendants()
        self.host.stop_serving()
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            LOG.warning("the serving process did not stop within %.0f s; killing it", timeout_s)
            self.process.kill()
            self.process.wait()
        # Normally gone: the serving process reaps them, and PyTriton gives tritonserver a SIGTERM when its
        # parent dies. That SIGTERM still lets tritonserver wait up to DRAIN_TIMEOUT_S for requests in flight.
        for child in self._seen.values():
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()
        remove_shared_memory(self.process.pid)  # what it could not remove itself (it was killed)


def watch(cfg: ServerConfig, frontend: ServingProcess, engine: Engine) -> int:
    """Serve until the serving process or the engine fails, or SIGTERM/SIGINT; then drain while Triton still
    answers. Returns the exit code: 1 when the serving process ended on its own."""
    while frontend.alive() and engine.alive() and engine.fatal is None and not STOP.is_set():
        if engine.stalled(cfg.collective_timeout_s):
            engine.fatal = TimeoutError(f"a step has not finished in {cfg.collective_timeout_s} s (a rank is stuck)")
        STOP.wait(0.2)
    if engine.fatal is not None or not engine.alive():
        engine.fatal = engine.fatal or RuntimeError("the engine thread ended")
        return 1
    if not STOP.is_set():
        LOG.error("the serving process (Triton) ended with %s; stopping", frontend.process.poll())
        return 1
    started = time.monotonic()
    LOG.info("draining: new requests are refused, %d in flight get up to %d s", sum(engine.load()[k] for k in
             ("running", "waiting")), cfg.drain_timeout_s)
    drained = engine.drain(cfg.drain_timeout_s)
    if not drained:
        engine.stop()  # what is left gets an error ("the server is shutting down"), still through Triton
    time.sleep(0.5)  # let the last responses leave before Triton stops
    LOG.info("drained in %.1f s (%s)", time.monotonic() - started, "all finished" if drained else "grace ran out")
    return 0


STOP = threading.Event()  # set by SIGTERM/SIGINT once serving: drain, then stop


def _on_signal(signum, _frame):
    """Before serving starts, stop at once; while serving, drain first (see ``watch``)."""
    if SERVING.is_set():
        STOP.set()
    else:
        raise KeyboardInterrupt(f"signal {signum}")


SERVING = threading.Event()


def main(module: str = "triton_backend.server") -> int:
    """One rank of the torchrun job; ``module`` is the one torchrun runs (a test may wrap this one in its own)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    if session.should_detach():  # rank 0 runs in a session of its own (see session.py)
        return session.supervise(module)
    session.end_session_when_parent_dies()
    started = time.monotonic()
    try:
        cfg = ServerConfig.from_env()
    except ValueError as err:
        print(f"configuration error: {err}", file=sys.stderr)
        return 2
    if os.environ.get("RANK", "0") == "0" and (busy := cfg.busy_ports()):
        print(f"configuration error: {' and '.join(busy)} already in use on {cfg.host} (another server?)",
              file=sys.stderr)
        return 2
    # Rank 0 checks the tokenizer's files before any collective (followers never tokenize): a missing file ends
    # the job at once, by name, as a busy port does, instead of after the checkpoint has loaded.
    from preprocessing import tokenization

    if os.environ.get("RANK", "0") == "0":
        try:
            tokenizer_spec(cfg, fresh=True)
        except (tokenization.TokenizerError, checkpoints.CheckpointError) as err:
            print(f"configuration error: {err}", file=sys.stderr)
            return 2
    # The world group waits as long as checkpoint loading may take; steps are bounded by the protocol group's
    # timeout (followers) and by rank 0's watchdog (COLLECTIVE_TIMEOUT_S).
    set_threads(cfg)
    # Before init_parallel: gloo starts a score of polling threads, and they must keep off the engine's core.
    cpus = engine_cpus(cfg)  # None unless one rank, rank 0
    init_distributed(cfg.device, timeout_s=cfg.load_timeout_s)
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    if world > 1:  # before any model-parallel group: every node must build the same ones
        differences = agreement.check(cfg)
        if differences:
            for line in differences:
                print(f"configuration error: {line}", file=sys.stderr)
            return 2
    if world != cfg.world_size:
        print(f"configuration error: TP={cfg.tensor_parallel} x PP={cfg.pipeline_parallel} needs "
              f"{cfg.world_size} ranks but torchrun started {world}", file=sys.stderr)
        return 2
    init_parallel(cfg.tensor_parallel, cfg.device, timeout_s=cfg.load_timeout_s,
                  pipeline_parallel=cfg.pipeline_parallel, expert_parallel=cfg.experts_split)
    group = make_group(cfg.collective_timeout_s) if world > 1 else None
    tp, pp = cfg.tensor_parallel, cfg.pipeline_parallel
    stage_groups = pipeline.make_stage_groups(tp, pp, cfg.collective_timeout_s) if pp > 1 else [None]
    try:
        if rank == 0:
            return lead(cfg, started, group, cpus, module, stage_groups[0])
        gpt = load_gpt(cfg)
        # Once loaded, a follower leaves when rank 0 says so (after draining) or when rank 0 is gone (the
        # protocol group's timeout): a SIGTERM from torchrun must not end it in the middle of the drain.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if pp > 1:
            pipeline.follow(gpt, tp, pp, group, stage_groups[rank // tp],
                            tokenizer=lambda: tokenization.load(tokenizer_spec(cfg)))
        else:
            follow(gpt, group)
        return 0
    except (checkpoints.CheckpointError, tokenization.TokenizerError, FileNotFoundError) as err:
        print(f"rank {rank}: cannot load the model: {err}", file=sys.stderr)
        return 1
    except CacheBudgetError as err:
        print(f"rank {rank}: cannot serve the model: {err}", file=sys.stderr)
        return 1
    except RankLost as err:  # a follower whose neighbour is gone: this rank's end ends its node's torchrun
        print(f"{describe(rank)}: {err}; ending", file=sys.stderr)
        return 1
    finally:
        torch.distributed.destroy_process_group()


def lead(cfg: ServerConfig, started: float, group=None, cpus: set[int] | None = None,
         module: str = "triton_backend.server", stage_group=None) -> int:
    """Rank 0: load, start the engine (which leads the followers) and the serving process, serve until stopped
    or failed."""
    engine = load_engine(cfg, group, cpus, stage_group)
    LOG.info("model loaded in %.1f s on %s (%s, TP=%d, PP=%d)", time.monotonic() - started, cfg.device, cfg.dtype,
             cfg.tensor_parallel, cfg.pipeline_parallel)
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    engine.start()
    frontend, code = None, 1
    try:
        frontend = ServingProcess(cfg, engine)
        code = watch(cfg, frontend, engine)
    except KeyboardInterrupt:  # a stop signal before serving began
        LOG.info("interrupted, shutting down")
        code = 0
    finally:
        if engine.fatal is None:
            engine.stop()  # what is left gets its error through the serving process, which stops next
        if frontend is not None:
            frontend.stop()
        LOG.info("engine: %s", engine.stats.summary())
    if engine.fatal is not None:
        # Triton is already stopped. Ranks may be stuck inside a collective that will never finish: take
        # the job down now rather than wait for timeouts (torchrun then exits non-zero).
        LOG.error("engine failed, ending the job: %s", engine.fatal)
        end_other_ranks(module)
        os._exit(1)
    return code


def end_other_ranks(module: str) -> None:
    """SIGKILL the sibling ranks that torchrun started (same agent, same module; not this rank's supervisor)."""
    me = psutil.Process()
    mine = {me.pid, me.ppid()}
    for sibling in session.torchrun_agent().children():
        try:
            if sibling.pid not in mine and module in sibling.cmdline():
                sibling.kill()
        except psutil.Error:
            pass


if __name__ == "__main__":
    sys.exit(main())
