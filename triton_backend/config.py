"""Server configuration: one keyword-only dataclass, read from the environment (the Makefile's variables)."""

from __future__ import annotations

import dataclasses
import os
import pathlib
import socket

ROOT = pathlib.Path(__file__).resolve().parent.parent
DEMO_DIR = ROOT / "demo_model"


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclasses.dataclass(kw_only=True)
class ServerConfig:
    """Everything ``make serve`` can set; see the README's configuration table."""

    checkpoint: pathlib.Path = DEMO_DIR / "checkpoint"
    tokenizer: str = ""  # a tokenizer file or directory replacing the paths the checkpoint's args record
    tokenizer_type: str = ""  # replaces the checkpoint's tokenizer_type (preprocessing/tokenization/spec.py)
    tensor_parallel: int = 1
    pipeline_parallel: int = 1  # PP: pipeline stages; the job has TP x PP ranks (ranks/pipeline.py)
    pp_microbatches: int = 0  # groups of running sequences in the pipeline at once; 0: PP (1: Megatron's way)
    pp_layers: str = ""  # layers per stage, "14,10"; "balanced": the output layer counted as the layers it weighs;
    # empty: the checkpoint's recorded split, else even (GPTArchitecture.served_split)
    expert_parallel: int = 0  # EP: ranks of a stage sharing out each MoE layer's experts (divides TP); 0: TP
    nnodes: int = 1  # machines the job spans; each runs TP x PP / NNODES ranks (``launch.py``)
    node_rank: int = 0  # this machine's place: node 0 holds rank 0 and serves
    master_addr: str = "127.0.0.1"  # node 0's address, which every node can reach
    master_port: int = 29500  # torchrun's rendezvous on node 0
    device: str = ""
    dtype: str = ""  # float32 | bfloat16 | float16; default: bfloat16 on CUDA, float32 on CPU
    host: str = "0.0.0.0"
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    model_repository: pathlib.Path = ROOT / "model_repository"
    max_batch_size: int = 64  # Triton's dynamic batcher, per execution of megatron_gpt
    instances: int = 4  # megatron_gpt instances: batches that can be in flight in the engine at once
    max_slots: int = 64  # sequences running in the engine at once (they take KV blocks as they grow)
    kv_cache_mb: int = 0  # KV-cache budget per rank; 0: 80 % of the GPU memory free after the weights, on CPU
    # half the memory available after them (shared by the ranks on the machine)
    prefix_caching: int = 1  # prompts reuse the KV blocks of a prefix an earlier one computed (0: off)
    compile: int = 1  # 1: steps run the fast functional forward over the weights (model/functional.py); 0:
    # Megatron's own modules run every step (the reference; torch.compile itself does not pay on CPU, see
    # docs/measured.md)
    cuda_graphs: int = 1  # 1: on CUDA, decode steps replay CUDA graphs, one per bucket of rows, captured at start
    # (model/graphs.py); 0: they run eagerly. Needs COMPILE=1 and ATTENTION flex; nothing changes on CPU
    attention: str = "auto"  # flex: FlexAttention over the cache in place (model/flex_paged.py); torch: the CPU
    # kernel where it applies, else torch operations (no CUDA graphs); auto: flex on CUDA, torch on CPU
    prefill_tokens: int = 0  # prompt tokens per engine step, longer prompts run in chunks; 0: 128 CPU, 2048 CUDA
    max_queue: int = 1024  # waiting sequences beyond which requests are refused
    queue_delay_us: int = 2000  # how long the dynamic batcher waits to grow a batch
    max_request_s: int = 600  # a request still running after this is ended with an error (abandoned streams)
    drain_timeout_s: int = 20  # on SIGTERM, how long requests in flight may take (torchrun kills at 30 s)
    collective_timeout_s: int = 30  # a step or heartbeat stalled this long ends the job (TP > 1), no hang
    load_timeout_s: int = 1800  # collectives while ranks load the checkpoint (slow disks, big models)
    stream_responses_per_s: int = 200  # streamed responses per second shared by all streams (0: no coalescing)
    pin_engine: int = 1  # CPU, TP=1: the engine thread gets cores of its own, the rest of the server the others
    torch_threads: int = 0  # CPU threads per rank for torch; 0: half the cores on CPU (Triton needs the rest)
    admin_token: str = ""  # token for model-control endpoints; random when empty
    api: int = 1  # the OpenAI- and Megatron-compatible HTTP API beside Triton (0: off)
    api_port: int = 9000
    api_key: str = ""  # when set, API requests need "Authorization: Bearer <key>"
    chat_template: str = ""  # a Jinja file for /v1/chat/completions; empty: the default (docs/api.md)
    model_name: str = ""  # the model id the API lists and expects; empty: "megatron-gpt"
    log_verbose: int = 0

    def __post_init__(self):
        self.checkpoint = pathlib.Path(self.checkpoint)
        from preprocessing.tokenization import TYPES

        if self.tokenizer_type and self.tokenizer_type not in TYPES:
            raise ValueError(f"TOKENIZER_TYPE must be one of {', '.join(TYPES)}, got {self.tokenizer_type!r}")
        self.model_repository = pathlib.Path(self.model_repository)
        self.device = self.device or _default_device()
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"DEVICE must be 'cpu' or 'cuda', got {self.device!r}")
        self.dtype = self.dtype or ("bfloat16" if self.device == "cuda" else "float32")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"DTYPE must be float32, bfloat16 or float16, got {self.dtype!r}")
        for name in self.port_fields():
            if not 0 < getattr(self, name) < 65536:
                raise ValueError(f"{_variable(name)} must be a TCP port, got {getattr(self, name)}")
        ports = [getattr(self, name) for name in self.port_fields()]
        if len(set(ports)) < len(ports):
            names = ", ".join(_variable(name) for name in self.port_fields())
            raise ValueError(f"{names} must differ, got {ports}")
        if not 0 < self.master_port < 65536:
            raise ValueError(f"MASTER_PORT must be a TCP port, got {self.master_port}")
        if self.nnodes < 1 or not 0 <= self.node_rank < self.nnodes:
            raise ValueError(f"NODE_RANK must be 0 .. NNODES - 1 and NNODES at least 1, got NODE_RANK={self.node_rank} "
                             f"NNODES={self.nnodes}")
        if (self.tensor_parallel * self.pipeline_parallel) % self.nnodes:
            raise ValueError(f"TP x PP = {self.tensor_parallel * self.pipeline_parallel} ranks cannot be spread evenly "
                             f"over NNODES={self.nnodes} nodes")
        if self.pp_layers and self.pp_layers != "balanced" and not all(
                n.strip().isdigit() for n in self.pp_layers.split(",")):
            raise ValueError(f"PP_LAYERS must be 'balanced' or the layers of each stage, e.g. '14,10'; got "
                             f"{self.pp_layers!r}")
        if self.expert_parallel < 0 or self.expert_parallel and self.tensor_parallel % self.expert_parallel:
            raise ValueError(f"EP must divide TP={self.tensor_parallel} (0: TP), got {self.expert_parallel}")
        if self.api not in (0, 1):
            raise ValueError(f"API must be 0 or 1, got {self.api}")
        for name in ("tensor_parallel", "pipeline_parallel", "max_batch_size", "instances", "max_slots", "max_queue",
                     "collective_timeout_s", "load_timeout_s"):
            if getattr(self, name) < 1:
                raise ValueError(f"{_variable(name)} must be at least 1, got {getattr(self, name)}")
        if self.attention not in ("auto", "flex", "torch"):
            raise ValueError(f"ATTENTION must be auto, flex or torch, got {self.attention!r}")
        for name in ("prefix_caching", "compile", "cuda_graphs"):
            if getattr(self, name) not in (0, 1):
                raise ValueError(f"{_variable(name)} must be 0 or 1, got {getattr(self, name)}")
        for name in ("pp_microbatches", "kv_cache_mb", "prefill_tokens", "queue_delay_us", "max_request_s",
                     "drain_timeout_s", "stream_responses_per_s", "torch_threads", "log_verbose"):
            if getattr(self, name) < 0:
                raise ValueError(f"{_variable(name)} must be 0 or more, got {getattr(self, name)}")

    @property
    def microbatches(self) -> int:
        """Steps in flight in the pipeline (PP_MICROBATCHES, else one per stage)."""
        return self.pp_microbatches or self.pipeline_parallel

    @property
    def experts_split(self) -> int:
        """EP, else TP."""
        return self.expert_parallel or self.tensor_parallel

    @property
    def world_size(self) -> int:
        return self.tensor_parallel * self.pipeline_parallel

    @property
    def ranks_per_node(self) -> int:
        return self.world_size // self.nnodes

    def node_of(self, rank: int) -> int:
        """The node a rank runs on (torchrun gives each node a contiguous block of ranks, node 0 the first)."""
        return rank // self.ranks_per_node

    def port_fields(self) -> list[str]:
        """The ports this job listens on (the API's only when it runs)."""
        return ["http_port", "grpc_port", "metrics_port"] + (["api_port"] if self.api else [])

    def busy_ports(self) -> list[str]:
        """The port variables whose port cannot be bound on HOST now (another server holds it).

        Checked by rank 0 before the checkpoint loads: tritonserver would otherwise fail to start and PyTriton
        only gives up after its two-minute start timeout, with a socket timeout that names no port.
        """
        busy = []
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        for name in self.port_fields():
            port = getattr(self, name)
            with socket.socket(family, socket.SOCK_STREAM) as probe:
                # As tritonserver binds: a port left in TIME_WAIT by a previous server counts as free.
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    probe.bind((self.host, port))
                except OSError:
                    busy.append(f"{name.upper()} {port}")
        return busy

    @classmethod
    def from_env(cls, env=os.environ) -> ServerConfig:
        """Read every field from its upper-case environment variable (``TP`` for ``tensor_parallel``)."""
        values = {}
        for field in dataclasses.fields(cls):
            raw = env.get(_variable(field.name), "")
            if raw == "":
                continue
            kind = type(field.default)
            if kind is int:
                try:
                    values[field.name] = int(raw)
                except ValueError:
                    raise ValueError(f"{_variable(field.name)} must be an integer, got {raw!r}") from None
            else:
                values[field.name] = raw if kind is str else pathlib.Path(raw)
        return cls(**values)


_SHORT = {"tensor_parallel": "TP", "pipeline_parallel": "PP", "expert_parallel": "EP"}


def _variable(name: str) -> str:
    """The environment (and make) variable of a field."""
    return _SHORT.get(name, name.upper())
