"""The serving process: Triton, its Python-backend pipeline and the PyTriton-bound generation models.

Rank 0 starts it (``server.ServingProcess``) and joins it to the engine by a socket (``engine_link.py``):

    python -m triton_backend.serving.frontend FD VOCAB_SIZE CONTEXT

It needs no torch: it validates requests, mirrors the engine's generations, detokenizes streams and talks to
Triton. Rank 0 decides when serving ends (drain on SIGTERM, see ``server.watch``) and then sends ``stop``;
this process stops Triton, reaps what Triton left behind and exits. It also ends when rank 0 is gone.
"""

from __future__ import annotations

import logging
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
from multiprocessing.connection import Connection

import psutil

from triton_backend.config import ROOT, ServerConfig
from triton_backend.serving.control import ENV as CONTROL_ENV
from triton_backend.serving.control import ControlChannel, default_path

from .binding import MODEL_NAME, STREAM_MODEL_NAME, make_infer, make_stream_infer, stream_tensors, tensors
from .engine_link import RemoteEngine

LOG = logging.getLogger("megatron_triton.frontend")
TRITON_EXIT_MIN_S = 5
START_ATTEMPTS = 5  # see the handshake race below; under heavy load on 2 cores three in a row have failed


def pipeline_env(cfg: ServerConfig, context: int) -> None:
    """Environment the Triton process and its Python-backend models inherit."""
    # The backend stub links the system libpython; a pyenv/venv interpreter must put its own libdir first.
    libdir = sysconfig.get_config_var("LIBDIR")
    os.environ["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [libdir, os.environ.get("LD_LIBRARY_PATH")]))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    os.environ["MEGATRON_TRITON_CONTEXT"] = str(context)


def serve(cfg: ServerConfig, engine: RemoteEngine) -> None:
    """Run Triton with the pipeline and bind the generation models; return when rank 0 says stop or is gone,
    or Triton failed."""
    control = ControlChannel(default_path(), engine)  # cancellations in, load out (see control.py)
    os.environ[CONTROL_ENV] = str(control.path)
    # PyTriton's default moves tensors through a shared-memory store run by a multiprocessing manager, a child
    # of this process. A signal to the process group (torchrun's SIGTERM without session.py, a terminal's
    # Ctrl-C) would reach that manager too, and responses still in flight would then fail. base64 over
    # PyTriton's socket has no such process (and measured no slower here: 835 against 958 tokens/s at 16
    # streams, within the run-to-run spread).
    os.environ.setdefault("PYTRITON_NO_TENSORSTORE", "1")
    pipeline_env(cfg, engine.context)
    try:
        _serve(cfg, engine, control)
    finally:
        control.close()


def _serve(cfg: ServerConfig, engine: RemoteEngine, control: ControlChannel) -> None:
    from pytriton.model_config import DynamicBatcher, ModelConfig
    from pytriton.triton import Triton, TritonConfig, TritonSecurityConfig

    triton_config = TritonConfig(
        model_repository=cfg.model_repository.resolve(),
        http_address=cfg.host, http_port=cfg.http_port,
        grpc_address=cfg.host, grpc_port=cfg.grpc_port,
        metrics_port=cfg.metrics_port,
        exit_on_error=False,  # the ensemble's first load fails until megatron_gpt is bound; Triton retries it
        # When tritonserver is stopped (or signalled directly) with requests in flight, it refuses new ones and
        # waits this long for those and for its models to unload. Normally rank 0 has drained the engine first
        # (see ``server.watch``); with less than a few seconds Triton gives up on unloading and exits with an error.
        exit_timeout_secs=max(cfg.drain_timeout_s, TRITON_EXIT_MIN_S),
        log_verbose=cfg.log_verbose,
    )
    # Loading a model is code execution: keep model control (and shared memory, trace, logging) behind a
    # token. Statistics stay open because perf_analyzer reads them.
    security = TritonSecurityConfig(
        access_token=cfg.admin_token or None,
        restricted_endpoints=["model-repository", "shared-memory", "trace", "logging"],
    )
    inputs, outputs = tensors()
    model_config = ModelConfig(
        max_batch_size=cfg.max_batch_size,
        batcher=DynamicBatcher(max_queue_delay_microseconds=cfg.queue_delay_us),
    )
    for attempt in range(1, START_ATTEMPTS + 1):
        # Short: PyTriton puts Unix sockets in it (108-byte path limit).
        workspace = pathlib.Path(tempfile.gettempdir()) / f"megatron_triton_{os.getpid()}_{attempt}"
        # One left by an earlier process that had our pid (killed before it cleaned up) is stale: PyTriton
        # refuses a workspace that exists.
        shutil.rmtree(workspace, ignore_errors=True)
        children: list[psutil.Process] = []
        try:
            with Triton(config=triton_config, workspace=workspace, security_config=security) as triton:
                try:
                    # Triton is already running here (PyTriton's default lifecycle): bind loads megatron_gpt.
                    # One decoupled instance: its async generator keeps every stream in flight at once.
                    stream_inputs, stream_outputs = stream_tensors()
                    stream_infer = make_stream_infer(engine, control, cfg.stream_responses_per_s)
                    triton.bind(
                        model_name=STREAM_MODEL_NAME, infer_func=stream_infer,
                        inputs=stream_inputs, outputs=stream_outputs, strict=False,
                        config=ModelConfig(max_batch_size=1, decoupled=True),
                    )
                    # Bound last, so that /v2/models/ensemble/ready implies ensemble_stream is ready too.
                    triton.bind(
                        model_name=MODEL_NAME, infer_func=[make_infer(engine)] * cfg.instances,
                        inputs=inputs, outputs=outputs, config=model_config, strict=False,
                    )
                    triton.run()
                except Exception as err:  # PyTriton surfaces load failures as several exception types
                    # PyTriton 0.7's instance handshake races (the first instance's socket file appears before
                    # it listens); the other instances then fail with ConnectionRefusedError. A fresh start
                    # fixes it.
                    if attempt == START_ATTEMPTS:
                        raise
                    LOG.warning("start attempt %d failed (%s); restarting Triton", attempt, str(err).splitlines()[0])
                    continue
                LOG.info("serving on http :%d, grpc :%d, metrics :%d", cfg.http_port, cfg.grpc_port,
                         cfg.metrics_port)
                engine.serving()
                api = start_api(cfg, engine.context) if cfg.api else None
                try:
                    while triton.is_alive() and not engine.stopped.wait(0.5):
                        if api is not None and api.poll() is not None:
                            LOG.error("the HTTP API exited with %s; Triton goes on serving", api.returncode)
                            api = None
                finally:
                    children = psutil.Process().children(recursive=True)
                    stop_api(api)
                return
        finally:
            reap(children)


def start_api(cfg: ServerConfig, context: int) -> subprocess.Popen:
    """The HTTP API (``python -m api``), a client of this Triton over gRPC, on API_PORT."""
    env = {**os.environ, "HOST": cfg.host, "GRPC_PORT": str(cfg.grpc_port), "API_PORT": str(cfg.api_port),
           "MEGATRON_TRITON_CONTEXT": str(context),
           "MAX_REQUEST_S": str(cfg.max_request_s)}
    LOG.info("HTTP API (OpenAI, Megatron) on :%d", cfg.api_port)
    return subprocess.Popen([sys.executable, "-m", "api"], cwd=ROOT, env=env)


def stop_api(api: subprocess.Popen | None, timeout_s: float = 5.0) -> None:
    """Rank 0 has drained the engine by now: what the API still holds has its answer or its error."""
    if api is None or api.poll() is not None:
        return
    api.terminate()
    try:
        api.wait(timeout_s)
    except subprocess.TimeoutExpired:
        api.kill()
        api.wait()


def reap(processes: list[psutil.Process]) -> None:
    """Kill what Triton's shutdown left behind and remove this process's PyTriton shared memory.

    When shutdown is abrupt (a rank died, SIGTERM mid-request) a backend stub can outlive tritonserver's
    exit timeout; PyTriton's tensor-store segments are named after the process that created them.
    """
    for process in processes:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(processes, timeout=5)
    remove_shared_memory(os.getpid())


def remove_shared_memory(pid: int) -> None:
    """Remove the PyTriton shared-memory segments of process ``pid`` (named ``pytrtion<pid>-...``)."""
    for segment in pathlib.Path("/dev/shm").glob(f"pytrtion{pid}-*"):
        segment.unlink(missing_ok=True)


def main(argv=None) -> int:
    from preprocessing import tokenization

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    fd, vocab_size, context = (int(a) for a in (argv or sys.argv)[1:4])
    # Rank 0 orders the shutdown (it drains first); its own end closes the link, which ends this process too.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    cfg = ServerConfig.from_env()  # rank 0 passes DEVICE resolved, so no torch is imported here
    engine = RemoteEngine(Connection(fd), vocab_size, context, tokenization.from_env())
    signal.signal(signal.SIGTERM, lambda *_: engine.stopped.set())
    serve(cfg, engine)
    return 0 if engine.stopped.is_set() else 1  # else Triton failed


if __name__ == "__main__":
    sys.exit(main())
