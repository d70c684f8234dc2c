"""Build a Megatron-core ``GPTModel`` from a ``GPTArchitecture`` and run cached forward passes on it."""

from __future__ import annotations

import logging
import os
from unittest import mock

import numpy as np
import torch

from triton_backend.cache.kv_cache import PagedKVCache, plan
from triton_backend.cache.tables import BatchTables

from . import decode_kernel, flex_paged, functional, moe
from .architecture import GPTArchitecture
from .attention import PagedAttention, Rotary
from .graphs import DecodeGraphs

LOG = logging.getLogger(__name__)


def init_parallel(tensor_parallel: int = 1, device: str = "cpu", timeout_s: float = 1800,
                  pipeline_parallel: int = 1, expert_parallel: int = 1) -> None:
    """Initialise torch.distributed (NCCL on CUDA, gloo on CPU) and Megatron's ``parallel_state``.

    Works both under torchrun and in a plain process (a single-rank group on a free local port).
    ``timeout_s`` bounds every collective: a stalled or vanished rank raises instead of hanging. Ranks are
    ordered as Megatron orders them: rank = TP rank + TP x PP rank, so ranks 0..TP-1 hold the first stage.
    ``expert_parallel`` (EP, dividing TP) ranks of a stage share out each MoE layer's experts; each expert is split
    TP / EP ways (Megatron's expert tensor parallelism).
    """
    from megatron.core import parallel_state

    init_distributed(device, timeout_s)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tensor_parallel,
                                                 pipeline_model_parallel_size=pipeline_parallel,
                                                 expert_model_parallel_size=expert_parallel,
                                                 expert_tensor_parallel_size=tensor_parallel // expert_parallel)


def init_distributed(device: str = "cpu", timeout_s: float = 1800) -> None:
    """The ranks meet: torch.distributed's default group (no model-parallel groups yet), unless it exists."""
    import datetime

    import torch.distributed as dist

    if dist.is_initialized():
        return
    if "RANK" not in os.environ:  # a plain process: a group of one (make exports MASTER_PORT even when empty)
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        if not os.environ.get("MASTER_PORT"):
            os.environ["MASTER_PORT"] = str(_free_port())
    backend = "nccl" if device == "cuda" else "gloo"
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def layer_spec(arch: GPTArchitecture):
    """Megatron's local (no Transformer Engine) GPT layer spec with our cache-aware core attention."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    spec = get_gpt_layer_local_spec(normalization=arch.normalization, qk_layernorm=arch.qk_layernorm)
    spec.submodules.self_attention.submodules.core_attention = PagedAttention
    return spec


def build_model(arch: GPTArchitecture, params_dtype=torch.float32, tensor_parallel: int = 1,
                pipeline_parallel: int = 1, **config):
    """A ``GPTModel`` on CPU (move it with ``.to(device)``); requires ``init_parallel`` first.

    At ``pipeline_parallel`` > 1 it is this rank's stage only (``parallel_state``'s pipeline rank): its layers
    (``arch.stage_layers``), the embedding on the first stage, the final norm and output layer on the last.
    ``config`` overrides TransformerConfig fields (e.g. ``init_method_std`` for random-init models).
    """
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    config = arch.transformer_config(params_dtype, tensor_parallel, pipeline_parallel, **config)
    rope = arch.position_embedding_type == "rope"
    first = last = True
    if pipeline_parallel > 1:
        first, last = parallel_state.is_pipeline_first_stage(), parallel_state.is_pipeline_last_stage()
    # A tied output layer on a last stage is synchronised with the first stage's embedding at construction, by an
    # all-reduce that moves the weight to CUDA whatever the device: a training-time step (served weights come
    # from the checkpoint), skipped here so that CPU stages build.
    from megatron.core.models.common.language_module.language_module import LanguageModule

    spec = layer_spec(arch)
    if arch.num_experts:
        moe.allocate_on_cpu()
        spec = moe.block_spec(arch, config, PagedAttention)
    with mock.patch.object(LanguageModule, "_is_in_embd_group", return_value=False):
        model = GPTModel(
            config=config,
            transformer_layer_spec=spec,
            vocab_size=arch.padded_vocab_size,
            max_sequence_length=arch.max_position_embeddings,
            pre_process=first,
            post_process=last,
            share_embeddings_and_output_weights=not arch.untie_embeddings_and_output_weights,
            # Rotary embeddings hold no weights; PagedAttention applies them at each row's own positions.
            position_embedding_type="none" if rope else arch.position_embedding_type,
            parallel_output=True,  # logits stay vocab-parallel; CachedGPT gathers only the rows it needs
        )
    if arch.layernorm_zero_centered_gamma:
        zero_centre_norms(model)
    attention = [m for m in model.modules() if isinstance(m, PagedAttention)]
    for index, module in enumerate(attention):
        module.window = arch.attention_window
        module.layer_index = index  # the stage's own cache holds its layers only (Megatron numbers them globally)
    if rope:
        head_dim = arch.kv_channels or arch.hidden_size // arch.num_attention_heads
        rotary = Rotary(config, head_dim, arch.rotary_percent, arch.rotary_base,
                        arch.rope_scaling_factor if arch.use_rope_scaling else None)
        for module in attention:
            module.rotary = rotary
    return model


class ZeroCenteredNorm(torch.nn.Module):
    """Megatron's ``layernorm_zero_centered_gamma`` (``apply_layernorm_1p``): the stored weight is centred on zero
    and the norm scales by 1 + weight. Megatron's local layer spec has no such norm (its torch norms refuse the
    setting), so the model is built with plain norms and each is wrapped here, keeping its parameters (and names).
    """

    def __init__(self, norm: torch.nn.LayerNorm | torch.nn.RMSNorm):
        super().__init__()
        self.rms = isinstance(norm, torch.nn.RMSNorm)
        self.normalized_shape, self.eps = tuple(norm.normalized_shape), norm.eps
        self.weight = norm.weight
        self.bias = None if self.rms else norm.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.weight + 1
        if self.rms:
            return torch.nn.functional.rms_norm(x, self.normalized_shape, scale, self.eps)
        return torch.nn.functional.layer_norm(x, self.normalized_shape, scale, self.bias, self.eps)


def zero_centre_norms(model: torch.nn.Module) -> None:
    """Wrap every norm of ``model`` in ``ZeroCenteredNorm``, in place."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, (torch.nn.LayerNorm, torch.nn.RMSNorm)):
                setattr(parent, name, ZeroCenteredNorm(child))


def kv_bytes_per_token(arch: GPTArchitecture, tensor_parallel: int, dtype: torch.dtype,
                       layers: int | None = None) -> int:
    """KV-cache bytes one token takes on one tensor-parallel rank (keys and values of every layer, or of the
    ``layers`` of a pipeline stage)."""
    groups = (arch.num_query_groups or arch.num_attention_heads) // tensor_parallel
    head_dim = arch.kv_channels or arch.hidden_size // arch.num_attention_heads
    layers = arch.num_layers if layers is None else layers
    return 2 * layers * groups * head_dim * torch.empty((), dtype=dtype).element_size()


class CacheBudgetError(ValueError):
    """The KV cache cannot hold one full-context sequence in the memory it may take."""


def fit_blocks(max_slots: int, max_len: int, block_size: int, per_token: int, budget_bytes: int | None) -> int:
    """KV blocks for the budget: enough for ``max_slots`` full-context sequences at most (more would never be
    used), and at least one full-context sequence (or a ``ValueError`` naming the numbers)."""
    per_block = per_token * block_size
    context_blocks = -(-max_len // block_size)
    wanted = max_slots * context_blocks
    if budget_bytes is None:
        return wanted
    fit = budget_bytes // per_block
    if fit < context_blocks:
        raise CacheBudgetError(
            f"the KV cache needs {context_blocks * per_block / 2**20:.1f} MiB for one sequence of the full "
            f"{max_len}-token context but only {budget_bytes / 2**20:.1f} MiB are available: raise KV_CACHE_MB or "
            f"free memory")
    return min(wanted, fit)


def read_back(*tensors: torch.Tensor) -> list[np.ndarray]:
    """``tensors`` (1-D int64) as numpy arrays, read back from the device in one transfer."""
    whole = torch.cat(tensors).cpu().numpy()
    return np.split(whole, np.cumsum([len(t) for t in tensors])[:-1])


class CachedGPT:
    """A GPTModel plus its paged KV cache: ``forward`` runs a packed step and returns the logits it asks for.

    ``max_slots`` bounds the sequences the engine runs at once; ``num_blocks`` (default: enough for
    ``max_slots`` full-context sequences) of ``block_size`` tokens is the cache. Every tensor-parallel rank runs
    ``forward`` with the same inputs (see ``protocol``); each returns the full logits.
    """

    BLOCK_SIZE = 32  # tokens per KV block (see docs/architecture.md, "KV cache")

    def __init__(self, model, arch: GPTArchitecture, max_slots: int, max_len: int | None = None,
                 num_blocks: int | None = None, block_size: int = BLOCK_SIZE, fast: bool = True,
                 graphs: str = "auto", attention: str = "auto"):
        self.model = model.eval()
        self.arch = arch
        param = next(model.parameters())
        config = model.config
        tp = config.tensor_model_parallel_size
        groups = (arch.num_query_groups or arch.num_attention_heads) // tp
        head_dim = arch.kv_channels or arch.hidden_size // arch.num_attention_heads
        self.max_len = min(max_len or arch.seq_length, arch.max_position_embeddings)
        self.max_slots = max_slots
        num_blocks = num_blocks or max_slots * -(-self.max_len // block_size)
        # The step's fast path (functional.py) unless asked for Megatron's own forward or the model needs it.
        why = functional.supported(model) if fast else None
        fast = fast and why is None
        # graphs: "auto" replays decode steps as CUDA graphs on CUDA (graphs.py), "eager" runs the same
        # static-shape steps without capture (the tests' way on CPU), "off" never; both need the fast path
        self.window = arch.attention_window  # sliding-window attention: the torch decode path masks by position
        static = fast and (graphs == "eager" or (graphs == "auto" and param.device.type == "cuda")) \
            and attention != "torch"  # the static steps read the cache through FlexAttention
        if static and arch.num_experts and graphs == "auto":  # how many tokens each expert gets is read per step
            LOG.warning("no CUDA graphs for a mixture-of-experts model: its steps run eagerly")
            static = False
        # attention: "flex" reads the pool through FlexAttention (flex_paged.py), the CUDA default and what static
        # steps run; "torch" the CPU kernel where it applies, else the torch paths of attention.py ("auto": by device)
        if attention not in ("auto", "flex", "torch"):
            raise ValueError(f"attention must be 'auto', 'flex' or 'torch', got {attention!r}")
        self.flex = attention == "flex" or static or (attention == "auto" and param.device.type == "cuda")
        self.attention = [m for m in model.modules() if isinstance(m, PagedAttention)]
        # a pipeline stage (``build_model``): its own layers only; the first embeds, the last makes the logits
        self.first, self.last = model.pre_process, model.post_process
        self.cache = PagedKVCache(len(self.attention), num_blocks, block_size, groups, head_dim, param.dtype,
                                  param.device, scratch=static, group_major=self.flex)
        if not hasattr(model.decoder, "wanted_rows"):
            model.decoder.wanted_rows = None
            model.decoder.register_forward_hook(_keep_wanted_rows)
        self.device = param.device
        self.tp = tp
        # the running sequences' block tables, kept here between steps and changed by each step's edits (``step``)
        self.tables = BatchTables(max_slots, -(-self.max_len // block_size), num_blocks, param.device)
        # decode attention by the CPU kernel where it applies and builds (decode_kernel.py), else torch's
        self.kernel = not self.flex and decode_kernel.applies(self.cache.keys[0], arch.num_attention_heads //
                                                              (groups * tp)) \
            and decode_kernel.library() is not None and self.window is None
        if why is not None:
            LOG.warning("Megatron's own forward runs every step (%s)", why)
        self.fast = functional.FunctionalGPT(model) if fast else None
        self.graphs = None
        if static:
            self.graphs = DecodeGraphs(self.fast, self.cache, max_slots, -(-self.max_len // block_size),
                                       capture=graphs == "auto", hidden_size=arch.hidden_size, dtype=param.dtype,
                                       window=self.window)

    def prepare(self, prefill_tokens: int = 2048) -> bool:
        """What the steps need made before the server is ready. On CUDA, FlexAttention compiled for prompt chunks of
        up to ``prefill_tokens``. Then every bucket of the static decode steps (captured as CUDA graphs on CUDA),
        the ranks of the job agreeing on each bucket with one collective: all replay, or all run eagerly (a rank
        replaying while another runs eagerly would issue other collectives, at TP > 1, and the job would hang).
        Every rank calls it, with or without static steps of its own. Returns whether they are on."""
        import torch.distributed as dist

        if self.flex and self.device.type == "cuda":  # the prompt chunks' attention compiles now, not under traffic
            flex_paged.warm_up(self.cache, self.arch.num_attention_heads // self.tp, prefill_tokens, self.window)
        joint = dist.is_initialized() and dist.get_world_size() > 1

        def agree(ok: bool) -> bool:
            if not joint:
                return ok
            flag = torch.tensor([int(ok)], device=self.device if dist.get_backend() == "nccl" else "cpu")
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
            if ok and not flag.item():
                LOG.warning("another rank could not capture a decode step: every rank runs decode steps eagerly")
            return bool(flag.item())

        if self.graphs is None:  # nothing to capture here: votes yes in as many rounds as the others have buckets
            for _ in DecodeGraphs.bucket_sizes(self.max_slots) if joint else ():
                if not agree(True):
                    break
            return False
        ok = self.graphs.capture_all(agree)
        if not ok:
            LOG.warning("static decode steps are off, every step runs eagerly")
            self.graphs = None
        return ok

    def expert_tokens(self) -> dict[int, list[int]]:
        """Tokens routed to each expert so far, per MoE layer of this stage (``moe.expert_tokens``)."""
        return moe.expert_tokens(self.model)

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor, positions: torch.Tensor, last: torch.Tensor, lengths: torch.Tensor,
             slots: torch.Tensor, keeps: torch.Tensor, table_lengths: torch.Tensor, entries: torch.Tensor,
             hidden: torch.Tensor | None = None, host: tuple[np.ndarray, ...] | None = None):
        """``forward`` with the block tables given as edits to the ones this rank keeps (``cache/tables.py``), the
        way the engine and the ranks run steps: sequence i runs in slot ``slots[i]``, keeps the first ``keeps[i]``
        entries of its table there and gets the next ``table_lengths[i] - keeps[i]`` of ``entries``. ``host``:
        positions, lengths, slots, keeps, table lengths and entries as numpy arrays (else they are read back
        from the device, in one transfer)."""
        positions_h, lengths_h, slots_h, keeps_h, table_lengths_h, entries_h = host if host is not None else \
            read_back(positions, lengths, slots, keeps, table_lengths, entries)
        tables = self.tables.apply(slots_h, keeps_h, table_lengths_h, entries_h)
        return self.forward(tokens, positions, last, lengths, None, table_lengths, hidden,
                            host=(positions_h, lengths_h, tables, table_lengths_h), slots=slots_h)

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, last: torch.Tensor, lengths: torch.Tensor,
                tables: torch.Tensor | None, table_lengths: torch.Tensor, hidden: torch.Tensor | None = None,
                host: tuple[np.ndarray, ...] | None = None, slots: np.ndarray | None = None):
        """Logits (float32, [len(last), vocab]) at packed indices ``last`` after running the packed ``tokens``.

        ``tokens`` and ``positions`` are [N], in segments of ``lengths`` (one per sequence); segment i's block
        table is the next ``table_lengths[i]`` entries of ``tables`` (see ``kv_cache.plan``). A pipeline stage
        after the first takes the previous stage's ``hidden`` states ([N, h]) instead of embedding ``tokens``;
        a stage before the last returns its hidden states ([N, h], every token: the next stage's cache needs
        them all) instead of logits. ``host``: the same positions, lengths, tables and table lengths as numpy
        arrays, which the step plans from; without them they are read back from the device, in one transfer.
        ``slots``: each sequence's slot in ``self.tables`` (``step``), whose device copy the attention's masks and
        the static steps then gather from, instead of uploading the tables.
        """
        host_positions, lengths, tables, table_lengths = host if host is not None else read_back(
            positions, lengths, tables, table_lengths)
        batch = None if slots is None else (self.tables, slots)
        if not (self.first and self.last):
            return self._stage_forward(tokens, positions, last, lengths, tables, table_lengths, hidden,
                                       host_positions, batch)
        if self.graphs is not None and (lengths == 1).all():
            try:
                logits = self.graphs.run(tokens, host_positions, tables, table_lengths, last, batch=batch)
            except Exception as err:  # never an outage: the eager path serves this step and every later one
                LOG.warning("static decode steps are off, every step runs eagerly: %s: %s", type(err).__name__, err)
                self.graphs, logits = None, None
            if logits is not None:
                return gather_vocab(logits.float().contiguous(), self.tp)
        step = plan(self.cache, positions, lengths, tables, table_lengths, pairs=not self.kernel, window=self.window,
                    host_positions=host_positions, batch=batch)
        if self.fast is not None:
            return gather_vocab(self.fast.forward(tokens, positions, step, last).float().contiguous(), self.tp)
        for module in self.attention:
            module.step = step
        self.model.decoder.wanted_rows = last
        try:
            logits = self.model(tokens[None], step.positions, None)[0]  # [len(last), vocab / tp]
        finally:
            for module in self.attention:
                module.step = None
            self.model.decoder.wanted_rows = None
        return gather_vocab(logits.float().contiguous(), self.tp)


    def _stage_forward(self, tokens, positions, last, lengths, tables, table_lengths, hidden, host_positions,
                       batch):
        """A pipeline stage's part of ``forward``: decode steps through its own static steps (graphs) when it has
        them, else eagerly."""
        if self.graphs is not None and (lengths == 1).all():
            try:
                out = self.graphs.run(tokens, host_positions, tables, table_lengths, last, hidden, batch)
            except Exception as err:  # never an outage: the eager path serves this step and every later one
                LOG.warning("static decode steps are off, every step runs eagerly: %s: %s", type(err).__name__, err)
                self.graphs, out = None, None
            if out is not None:
                return gather_vocab(out.float().contiguous(), self.tp) if self.last else out
        step = plan(self.cache, positions, lengths, tables, table_lengths, pairs=not self.kernel, window=self.window,
                    host_positions=host_positions, batch=batch)
        rows = last if self.last else None
        if self.fast is not None:
            out = self.fast.run(tokens, positions, lambda attention, q, k, v: attention.attend(step, q, k, v), rows,
                                hidden=hidden)
        else:
            for module in self.attention:
                module.step = step
            self.model.decoder.wanted_rows = rows
            if not self.first:
                self.model.set_input_tensor(hidden[:, None])  # Megatron's layout: [tokens, batch 1, h]
            try:
                out = self.model(tokens[None], step.positions, None)
                out = out[0] if self.last else out[:, 0]
            finally:
                for module in self.attention:
                    module.step = None
                self.model.decoder.wanted_rows = None
                if not self.first:
                    self.model.set_input_tensor(None)
        return gather_vocab(out.float().contiguous(), self.tp) if self.last else out.contiguous()


def _keep_wanted_rows(decoder, _inputs, hidden):
    """Forward hook on GPTModel's decoder: only the tokens whose logits a step wants reach the output layer.
    GPTModel projects every token onto the vocabulary otherwise, and a 512-token prompt chunk would pay for 512
    rows of logits to use one (Megatron's own way, ``materialize_only_last_token_logits``, needs its
    inference context)."""
    rows = decoder.wanted_rows
    return hidden if rows is None else hidden[rows]


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
