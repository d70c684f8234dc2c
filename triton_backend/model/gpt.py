"""Build a Megatron-core ``GPTModel`` from a ``GPTArchitecture`` and run cached forward passes on it."""

from __future__ import annotations

import os

import torch

from triton_backend.cache.kv_cache import KVCache, plan

from .architecture import GPTArchitecture
from .attention import Rotary, SlotCacheAttention


def init_parallel(tensor_parallel: int = 1, device: str = "cpu", timeout_s: float = 1800) -> None:
    """Initialise torch.distributed (NCCL on CUDA, gloo on CPU) and Megatron's ``parallel_state``.

    Works both under torchrun and in a plain process (a single-rank group on a free local port).
    ``timeout_s`` bounds every collective: a stalled or vanished rank raises instead of hanging.
    """
    import datetime

    import torch.distributed as dist
    from megatron.core import parallel_state

    if not dist.is_initialized():
        if "RANK" not in os.environ:
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
        backend = "nccl" if device == "cuda" else "gloo"
        if device == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tensor_parallel)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def layer_spec(arch: GPTArchitecture):
    """Megatron's local (no Transformer Engine) GPT layer spec with our cache-aware core attention."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    spec = get_gpt_layer_local_spec(normalization=arch.normalization)
    spec.submodules.self_attention.submodules.core_attention = SlotCacheAttention
    return spec


def build_model(arch: GPTArchitecture, params_dtype=torch.float32, tensor_parallel: int = 1, **config):
    """A ``GPTModel`` on CPU (move it with ``.to(device)``); requires ``init_parallel`` first.

    ``config`` overrides TransformerConfig fields (e.g. ``init_method_std`` for random-init models).
    """
    from megatron.core.models.gpt import GPTModel

    config = arch.transformer_config(params_dtype, tensor_parallel, **config)
    rope = arch.position_embedding_type == "rope"
    model = GPTModel(
        config=config,
        transformer_layer_spec=layer_spec(arch),
        vocab_size=arch.padded_vocab_size,
        max_sequence_length=arch.max_position_embeddings,
        share_embeddings_and_output_weights=not arch.untie_embeddings_and_output_weights,
        # Rotary embeddings hold no weights; SlotCacheAttention applies them at each row's own positions.
        position_embedding_type="none" if rope else arch.position_embedding_type,
        parallel_output=True,  # logits stay vocab-parallel; CachedGPT gathers only the rows it needs
    )
    if rope:
        head_dim = arch.kv_channels or arch.hidden_size // arch.num_attention_heads
        rotary = Rotary(config, head_dim, arch.rotary_percent, arch.rotary_base)
        for module in model.modules():
            if isinstance(module, SlotCacheAttention):
                module.rotary = rotary
    return model


def kv_bytes_per_slot(arch: GPTArchitecture, tensor_parallel: int, max_len: int, dtype: torch.dtype) -> int:
    """KV-cache bytes one sequence of ``max_len`` tokens needs on one tensor-parallel rank."""
    groups = (arch.num_query_groups or arch.num_attention_heads) // tensor_parallel
    head_dim = arch.kv_channels or arch.hidden_size // arch.num_attention_heads
    return 2 * arch.num_layers * groups * max_len * head_dim * torch.empty((), dtype=dtype).element_size()


def fit_slots(requested: int, per_slot: int, budget_bytes: int | None) -> int:
    """Sequences the KV cache can hold: ``requested``, fewer if the budget is smaller (never zero)."""
    if budget_bytes is None:
        return requested
    fit = budget_bytes // per_slot
    if fit < 1:
        raise ValueError(f"the KV cache needs {per_slot / 2**20:.0f} MiB per sequence but only "
                         f"{budget_bytes / 2**20:.0f} MiB are available: lower the context or raise KV_CACHE_MB")
    return min(requested, fit)


class CachedGPT:
    """A GPTModel plus its KV cache: ``forward`` runs tokens of some slots and returns last-token logits.

    Every tensor-parallel rank runs ``forward`` with the same inputs (see ``protocol``); each returns the full
    logits.
    """

    def __init__(self, model, arch: GPTArchitecture, max_slots: int, max_len: int | None = None):
        self.model = model.eval()
        self.arch = arch
        param = next(model.parameters())
        config = model.config
        tp = config.tensor_model_parallel_size
        groups = (arch.num_query_groups or arch.num_attention_heads) // tp
        head_dim = arch.kv_channels or arch.hidden_size // arch.num_attention_heads
        self.max_len = min(max_len or arch.seq_length, arch.max_position_embeddings)
        self.cache = KVCache(arch.num_layers, max_slots, self.max_len, groups, head_dim, param.dtype, param.device)
        self.attention = [m for m in model.modules() if isinstance(m, SlotCacheAttention)]
        self.device = param.device
        self.tp = tp

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, last: torch.Tensor):
        """Logits (float32, [len(last), vocab]) at packed indices ``last`` after running the packed ``tokens``.

        ``tokens``, ``positions`` and ``slots`` are [N]: token i continues the sequence in slot ``slots[i]`` at
        ``positions[i]``; a slot's tokens are consecutive, and several of them are a whole prompt (see
        ``kv_cache.plan``).
        """
        step, run = plan(self.cache, slots, positions)
        if run is not None:
            tokens = tokens[run]
            last = run.argsort()[last]  # where each packed index now runs
        for module in self.attention:
            module.step = step
        try:
            logits = self.model(tokens[None], step.positions, None)[0]  # [N, vocab / tp]
        finally:
            for module in self.attention:
                module.step = None
        return gather_vocab(logits[last].float().contiguous(), self.tp)


def gather_vocab(logits: torch.Tensor, tp: int) -> torch.Tensor:
    """Concatenate the vocabulary shards of ``logits`` [b, vocab / tp] from every tensor-parallel rank.

    Megatron's own gather allocates on CUDA; a plain all_gather works with gloo and NCCL alike.
    """
    if tp == 1:
        return logits
    from megatron.core import parallel_state

    shards = [torch.empty_like(logits) for _ in range(tp)]
    torch.distributed.all_gather(shards, logits, group=parallel_state.get_tensor_model_parallel_group())
    return torch.cat(shards, dim=-1)
