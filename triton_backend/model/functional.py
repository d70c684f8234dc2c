"""The GPTModel's cached forward written as one function of the model's own parameters: the fast path of a step.

Why not Megatron's modules themselves on this path: they are built for training at scale, and every call carries
Python for features a cached inference step never uses (offloading hooks, CUDA-graph and fused-kernel switches,
deprecation checks with ``get_rank()``, argument plumbing through five levels of modules). On the demo model that
Python was half of a decode step (docs/measured.md, "The step's fast forward"), and it is what stops
``torch.compile`` from tracing a step whole (Megatron's attention breaks the graph). This path runs the same
arithmetic in the same order over the very same parameter tensors (the checkpoint loaded into the GPTModel is
what runs), with the same tensor-parallel collectives on Megatron's tensor-parallel group, and the same
``PagedAttention`` over the KV cache: with ``F.linear`` products its logits are Megatron's bit for bit. On CPU the
large weights and the output layer also get packed copies for products of several rows (``_pack``), whose
results agree with ``F.linear``'s to rounding. ``CachedGPT(fast=False)`` (``COMPILE=0``) keeps Megatron's own
forward, the reference the tests hold this one to (``tests/unit/test_functional.py``).

``supported`` says why a model cannot take this path (a layer spec or feature it does not implement); such a
model runs Megatron's forward instead, with one log line.
"""

from __future__ import annotations

import dataclasses
import logging

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .attention import PagedAttention
from .moe import top_k

LOG = logging.getLogger(__name__)


@dataclasses.dataclass
class _Norm:
    kind: str  # "layer" or "rms"
    shape: tuple[int, ...]
    weight: torch.Tensor
    bias: torch.Tensor | None
    eps: float

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "rms":
            return F.rms_norm(x, self.shape, self.weight, self.eps)
        return F.layer_norm(x, self.shape, self.weight, self.bias, self.eps)


class _Linear:
    """``F.linear(x, weight)`` without a bias, by the kernel that is fastest on this CPU for ``x``'s row count
    (``_pack``): the weight itself for one row, oneDNN's product over a copy of it in oneDNN's blocked layout up to
    ``MANY_ROWS`` rows, MKL's packed GEMM over a copy packed for MKL beyond. A missing copy falls back to the next
    kernel that has one, and to ``F.linear``."""

    def __init__(self, weight: torch.Tensor, few: torch.Tensor | None = None, many: torch.Tensor | None = None):
        self.weight, self.few, self.many = weight, few, many

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[0]
        if rows > MANY_ROWS and self.many is not None:
            return torch.ops.mkl._mkl_linear(x, self.many, self.weight, None, rows)
        if rows > 1 and self.few is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self.few, None, "none", [], "")
        return F.linear(x, self.weight)


@dataclasses.dataclass
class _Layer:
    input_norm: _Norm
    qkv: _Linear
    qkv_bias: torch.Tensor | None
    attention: PagedAttention
    proj: _Linear
    proj_bias: torch.Tensor | None
    mlp_norm: _Norm
    fc1: _Linear
    fc1_bias: torch.Tensor | None
    fc2: _Linear
    fc2_bias: torch.Tensor | None
    q_norm: _Norm | None = None  # qk_layernorm: each head's query and key, before RoPE
    k_norm: _Norm | None = None
    moe: _MoE | None = None  # a mixture-of-experts layer's MLP (fc1 and fc2 then None)


@dataclasses.dataclass
class _MoE:
    """A mixture-of-experts MLP: Megatron's router (its own routing function, over the same weights) and this rank's
    experts, each a dense MLP; a shared expert beside them, gated or not."""

    router: object  # the layer's ``TopKRouter``: its config, weight and expert bias
    first: int  # the global number of this rank's first expert (expert parallelism)
    experts: list[tuple[_Linear, _Linear]]  # (fc1, fc2) of each local expert, column- and row-parallel
    shared: tuple[_Linear, _Linear] | None = None
    shared_gate: torch.Tensor | None = None  # [1, h]

    def __post_init__(self):
        # what each step reads of the router, looked up once (a module's attributes go through nn.Module lookups)
        r = self.router
        self._config, self._expert_bias = r.config, r.expert_bias
        self._count = getattr(r, "count", None)  # the served router's tally (model/moe.py)
        self._gating = r.gating

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """Each token's k (expert, weight) pairs grouped by this rank's experts, as Megatron permutes them (by
        expert, tokens in order): (tokens [pairs], weights [pairs], pairs per local expert). The routing is
        Megatron's (``moe.top_k``, dropless: no capacity); the router's tally counts every expert's tokens."""
        weights, chosen = top_k(self._gating(x), self._config, self._expert_bias)
        chosen = chosen.flatten()  # token-major: token t's choices at t x k ..
        per_expert = torch.bincount(chosen, minlength=self._config.num_moe_experts)
        if self._count is not None:
            self._count(per_expert)
        counts = per_expert.tolist()  # the layer's one host read: tokens per expert
        order = torch.argsort(chosen, stable=True)  # by expert, tokens in order within each
        skip, local = sum(counts[:self.first]), counts[self.first:self.first + len(self.experts)]
        if len(local) < len(counts):  # expert parallelism: this rank's experts' pairs only
            order = order[skip:skip + sum(local)]
        return order // weights.shape[1], weights.flatten()[order], local


def _qk_norm(module) -> _Norm | None:
    from megatron.core.transformer.identity_op import IdentityOp

    return None if module is None or isinstance(module, IdentityOp) else _norm(module)


def _norm(module) -> _Norm:
    from .gpt import ZeroCenteredNorm

    if isinstance(module, ZeroCenteredNorm):  # the scale 1 + weight, made once (the weights do not change)
        scale = (module.weight + 1).detach()
        return _Norm("rms" if module.rms else "layer", module.normalized_shape, scale, module.bias, module.eps)
    if isinstance(module, torch.nn.LayerNorm):
        return _Norm("layer", tuple(module.normalized_shape), module.weight, module.bias, module.eps)
    return _Norm("rms", tuple(module.normalized_shape), module.weight, None, module.eps)


def _dense_mlp(mlp) -> bool:
    return hasattr(mlp, "linear_fc1") and mlp.linear_fc1.skip_bias_add


def _moe_problem(mlp) -> str | None:
    """Why a layer's MLP is not an MoE this path computes: Megatron's ``MoELayer`` with ``SequentialMLP`` experts
    without biases, its top-k router without one."""
    from megatron.core.transformer.moe.experts import SequentialMLP
    from megatron.core.transformer.moe.moe_layer import MoELayer

    if not isinstance(mlp, MoELayer) or not isinstance(mlp.experts, SequentialMLP):
        return "not Megatron's MoELayer over SequentialMLP experts"
    if mlp.router.bias is not None or mlp.config.moe_latent_size or mlp.config.add_bias_linear:
        return "biases or a latent projection"
    return None


def supported(model) -> str | None:
    """Why ``model`` (a GPTModel built by ``gpt.build_model``) cannot run on this path, or None."""
    from megatron.core.transformer.identity_op import IdentityOp

    c = model.config
    flags = {"sequence_parallel": c.sequence_parallel, "fp32_residual_connection": c.fp32_residual_connection,
             "apply_residual_connection_post_layernorm": c.apply_residual_connection_post_layernorm,
             "attention_output_gate": getattr(c, "attention_output_gate", False),
             "no_rope_freq": bool(getattr(c, "no_rope_freq", None)),
             "activation_func_clamp_value": getattr(c, "activation_func_clamp_value", None) is not None,
             "glu_linear_offset": bool(getattr(c, "glu_linear_offset", 0.0)),
             "bias_activation_fusion": c.bias_activation_fusion,
             "multi_token_prediction": bool(getattr(c, "mtp_num_layers", None)),
             "embedding_scaling": bool(getattr(getattr(model, "embedding", None), "scale_factor", None))}
    on = [name for name, value in flags.items() if value]
    if on:
        return "unsupported settings: " + ", ".join(on)
    from .gpt import ZeroCenteredNorm

    norms = (torch.nn.LayerNorm, torch.nn.RMSNorm, ZeroCenteredNorm)
    qk_norms = (IdentityOp, *norms)  # qk_layernorm: a norm over each head's channels, or none
    if model.post_process and not isinstance(model.decoder.final_layernorm, norms):
        return f"final norm {type(model.decoder.final_layernorm).__name__}"
    for layer in model.decoder.layers:
        attention = layer.self_attention
        parts = {"input_layernorm": isinstance(layer.input_layernorm, norms),
                 "pre_mlp_layernorm": isinstance(layer.pre_mlp_layernorm, norms),
                 "core_attention": isinstance(attention.core_attention, PagedAttention),
                 "q_layernorm": attention.q_layernorm is None or isinstance(attention.q_layernorm, qk_norms),
                 "k_layernorm": attention.k_layernorm is None or isinstance(attention.k_layernorm, qk_norms),
                 "cross_attention": isinstance(layer.cross_attention, IdentityOp),
                 "linear_qkv": not attention.linear_qkv.skip_bias_add,
                 "mlp": _dense_mlp(layer.mlp) or _moe_problem(layer.mlp) is None}
        wrong = [name for name, ok in parts.items() if not ok]
        if wrong:
            return f"layer {layer.layer_number}: unsupported " + ", ".join(wrong)
    return None


# Weights with a side at most this long are stored column-major on CPU (``_cpu_layout``); the others, and the
# output layer, get packed copies for products of several rows (``_pack``), MKL's beyond MANY_ROWS rows.
NARROW_SIDE = 512
MANY_ROWS = 48


def _cpu_layout(weight: torch.Tensor) -> None:
    """Store a narrow CPU weight column-major ([out, in] with strides (1, out), GPT-2's ``Conv1D`` layout), in place:
    the same parameter, values and memory, so Megatron's modules read it too. On this machine's CPU ``F.linear``
    with such a weight ran 1.1-1.6x faster at the demo model's shapes (a side of 256) at 1, 16 and 64 rows, and
    about as fast as a packed copy (``tools/probes/linear_layouts.py``); CUDA's GEMMs take either layout at full speed,
    so only CPU weights move."""
    if weight.device.type == "cpu" and weight.dim() == 2 and min(weight.shape) <= NARROW_SIDE \
            and weight.stride() == (weight.shape[1], 1):
        weight.data = weight.data.t().contiguous().t()


def _packs(weight: torch.Tensor, output: bool) -> bool:
    """Whether ``_pack`` makes packed copies of this weight: a float32 CPU weight that stays row-major (both sides
    over ``NARROW_SIDE``), or an output layer that does (``output``: the vocabulary's rows of a table shared with
    the embedding, kept for the lookups). A narrow untied output layer goes column-major instead, which ran
    faster than either packed copy up to 48 rows (the ``long`` preset's 4,096 x 128 at 8 and 43 rows: 117 and
    299 us against oneDNN's 142 and 350, ``tools/probes/linear_layouts.py``) and as fast as MKL's beyond."""
    return weight.device.type == "cpu" and weight.dtype == torch.float32 and weight.dim() == 2 \
        and (output or min(weight.shape) > NARROW_SIDE)


def packed_bytes(model) -> int:
    """Memory the fast path's packed copies of ``model``'s weights take (two per weight, each about its size),
    for the KV cache's budget."""
    return sum(2 * w.numel() * w.element_size() for w, output in _linear_weights(model) if _packs(w, output))


def _linear_weights(model):
    """(weight, is the output layer's) of every linear layer the fast path multiplies by."""
    for layer in model.decoder.layers:
        for linear in _linears(layer):
            yield linear.weight, False
    if model.post_process:  # a pipeline stage before the last has no output layer
        yield _output_weight(model), model.share_embeddings_and_output_weights and model.pre_process


def _linears(layer) -> list:
    """A layer's linear modules: attention's, then the dense MLP's or each local expert's and the shared one's."""
    a, m = layer.self_attention, layer.mlp
    if _dense_mlp(m):
        mlps = [m]
    else:
        mlps = list(m.experts.local_experts) + ([m.shared_experts] if m.shared_experts is not None else [])
    return [a.linear_qkv, a.linear_proj] + [linear for mlp in mlps for linear in (mlp.linear_fc1, mlp.linear_fc2)]


def _output_weight(model) -> torch.Tensor:
    return (model.shared_embedding_or_output_weight() if model.share_embeddings_and_output_weights
            else model.output_layer.weight)


def _pack(weight: torch.Tensor, output: bool = False) -> _Linear:
    """The product by ``weight``, through packed copies of it where ``_packs`` says so.

    Why: a GEMM reorders its weight operand into the blocked layout its kernel reads before it multiplies, on
    every call; a copy in that layout, made once at load, saves it. Measured with the weights coming from memory
    as in a step (``tools/probes/linear_layouts.py``, gpt-350m's shapes and the demo model's output layer): oneDNN's
    product over its reordered copy (``torch.ops.mkldnn``, what inductor's CPU freezing emits) ran 1.3-1.7x
    faster than ``F.linear`` at 4 to 32 rows; MKL's packed GEMM (``cblas_sgemm_compute``) 1.3-1.5x at 64, where
    oneDNN's gains little; at one row ``F.linear`` is as fast as either. Each copy costs memory about the
    weight's size (``packed_bytes``); Megatron's modules keep reading the parameter itself. A copy whose product
    does not reproduce ``F.linear`` on a probe (to rounding: the kernels sum in another order) is dropped with a
    log line, and so is one a torch build cannot make.
    """
    if not _packs(weight, output):
        return _Linear(weight)
    w = weight.detach()
    makers = {"few": ("oneDNN", lambda: torch.ops.mkldnn._reorder_linear_weight(w, 16)),
              "many": ("MKL", lambda: torch.ops.mkl._mkl_reorder_linear_weight(w, 1))}
    copies = {}
    for name, (library, make) in makers.items():
        try:
            copy = make()
        except (RuntimeError, AttributeError) as err:  # a torch built without the library
            LOG.warning("no %s packed copy of a %s weight: %s", library, tuple(weight.shape), err)
            continue
        rows = MANY_ROWS + 1 if name == "many" else 2
        probe = torch.randn(rows, weight.shape[1], generator=torch.Generator().manual_seed(0))
        if torch.allclose(_Linear(weight, **{name: copy})(probe), F.linear(probe, weight), rtol=1e-4, atol=1e-4):
            copies[name] = copy
        else:
            LOG.warning("%s's packed product disagrees with F.linear on a %s weight: it runs unpacked", library,
                        tuple(weight.shape))
    return _Linear(weight, **copies)


def _biased(x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x + bias`` as its own operation after the product, as Megatron's linear layers add it (``addmm`` would
    start the sum from the bias and round differently): this path's logits are then Megatron's, bit for bit."""
    return x if bias is None else x + bias


def _moe(mlp) -> _MoE:
    shared = mlp.shared_experts
    return _MoE(mlp.router, mlp.local_expert_indices[0],
                [(_pack(e.linear_fc1.weight), _pack(e.linear_fc2.weight)) for e in mlp.experts.local_experts],
                None if shared is None else (_pack(shared.linear_fc1.weight), _pack(shared.linear_fc2.weight)),
                None if shared is None else shared.gate_weight)


class FunctionalGPT:
    """``forward(tokens, positions, step, rows)``: the logits of packed ``rows`` ([len(rows), vocab / tp]), as
    ``GPTModel.forward`` computes them with ``PagedAttention`` over ``step``."""

    def __init__(self, model):
        from megatron.core import parallel_state

        c = model.config
        self.tp = c.tensor_model_parallel_size
        self.group = parallel_state.get_tensor_model_parallel_group() if self.tp > 1 else None
        # a pipeline stage has the embedding if it is the first, the final norm and output layer if the last
        self.first, self.last = model.pre_process, model.post_process
        embedding = model.embedding if self.first else None
        self.word = embedding.word_embeddings.weight if self.first else None  # [vocab / tp, h]
        if self.first:
            self.vocab_start = embedding.word_embeddings.vocab_start_index
            self.vocab_end = embedding.word_embeddings.vocab_end_index
        positions = getattr(embedding, "position_embeddings", None)
        self.position = positions.weight if positions is not None else None  # learned absolute positions
        self.activation, self.gated = c.activation_func, c.gated_linear_unit
        self.layers = []
        for layer in model.decoder.layers:
            a, m = layer.self_attention, layer.mlp
            for linear in _linears(layer):
                _cpu_layout(linear.weight)
            dense = _dense_mlp(m)
            self.layers.append(_Layer(
                _norm(layer.input_layernorm), _pack(a.linear_qkv.weight), a.linear_qkv.bias, a.core_attention,
                _pack(a.linear_proj.weight), a.linear_proj.bias, _norm(layer.pre_mlp_layernorm),
                _pack(m.linear_fc1.weight) if dense else None, m.linear_fc1.bias if dense else None,
                _pack(m.linear_fc2.weight) if dense else None, m.linear_fc2.bias if dense else None,
                _qk_norm(a.q_layernorm), _qk_norm(a.k_layernorm), None if dense else _moe(m)))
        a = model.decoder.layers[0].self_attention
        self.groups = a.num_query_groups_per_partition
        self.heads = a.num_attention_heads_per_partition
        self.head_dim = a.hidden_size_per_attention_head
        if self.last:
            self.final_norm = _norm(model.decoder.final_layernorm)
            output = _output_weight(model)
            if output is not self.word:  # the embedding table is read by rows: a shared one keeps its layout
                _cpu_layout(output)
            self.output = _pack(output, output=output is self.word)

    def _reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The sum over tensor-parallel ranks (Megatron's ``reduce_from_tensor_model_parallel_region``)."""
        if self.group is not None:
            dist.all_reduce(x, group=self.group)
        return x

    def _row_parallel(self, x: torch.Tensor, linear: _Linear, bias: torch.Tensor | None) -> torch.Tensor:
        """A row-parallel linear layer: each rank's partial product, summed over the ranks, then the bias."""
        return _biased(self._reduce(linear(x)), bias)

    def _embed(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        if self.tp > 1:  # this rank holds embeddings vocab_start .. vocab_end: the others contribute zeros
            outside = (tokens < self.vocab_start) | (tokens >= self.vocab_end)
            x = F.embedding((tokens - self.vocab_start).masked_fill(outside, 0), self.word)
            x = self._reduce(x.masked_fill(outside[:, None], 0.0))
        else:
            x = F.embedding(tokens, self.word)
        if self.position is not None:
            x = x + F.embedding(positions, self.position)
        return x

    def _attention(self, layer: _Layer, x: torch.Tensor, attend) -> torch.Tensor:
        n = x.shape[0]
        per_group = self.heads // self.groups
        qkv = _biased(layer.qkv(x), layer.qkv_bias).view(n, self.groups, -1)
        q, k, v = qkv.split([per_group * self.head_dim, self.head_dim, self.head_dim], dim=-1)
        q = q.reshape(n, self.heads, self.head_dim)
        if layer.q_norm is not None:  # Megatron's qk_layernorm, over each head's channels
            q, k = layer.q_norm(q), layer.k_norm(k)
        out = attend(layer.attention, q, k, v)
        return self._row_parallel(out, layer.proj, layer.proj_bias)

    def _activate(self, h: torch.Tensor) -> torch.Tensor:
        """An MLP's fc1 output [rows, units] to its hidden units: the activation, gating it when gated."""
        if self.gated:
            gate, linear = h.chunk(2, dim=-1)
            return self.activation(gate) * linear
        return self.activation(h)

    def _mlp(self, layer: _Layer, x: torch.Tensor) -> torch.Tensor:
        h = _biased(layer.fc1(x), layer.fc1_bias)  # column-parallel: this rank's bias shard
        return self._row_parallel(self._activate(h), layer.fc2, layer.fc2_bias)

    def _expert(self, fc1: _Linear, fc2: _Linear, x: torch.Tensor) -> torch.Tensor:
        """A dense MLP's partial product on this rank (its slice of the hidden units), not yet summed."""
        return fc2(self._activate(fc1(x)))

    def _moe(self, moe: _MoE, x: torch.Tensor) -> torch.Tensor:
        """Each token through its top-k experts, weighted, plus the shared expert. Tokens are grouped by expert: one
        product per expert this rank holds and some token chose (a decode step of one sequence reads k experts'
        weights). Every rank of the tensor-parallel group has every token: it computes its own experts' part
        (expert parallelism) of its slice of each expert (tensor parallelism within experts) and of the shared
        expert, and one sum over the group completes them all."""
        tokens, weights, counts = moe.route(x)
        out = torch.zeros_like(x)
        active = [e for e, count in enumerate(counts) if count]
        if active:
            # fc1 and fc2 per expert; what lies between (activation, routing weight) once over every expert's
            # rows together: element by element, the same values, in a few operations instead of a few per expert
            rows = x[tokens].split(counts)
            h = self._activate(torch.cat([moe.experts[e][0](rows[e]) for e in active]))
            h = (h * weights.unsqueeze(-1)).to(x.dtype)  # the routing weight, as Megatron's experts apply it
            parts = [moe.experts[e][1](piece) for e, piece in zip(active, h.split([counts[e] for e in active]))]
            # summed per token in Megatron's order (its ``unpermute``): the same sums
            out.scatter_add_(0, tokens[:, None].expand(-1, x.shape[1]), torch.cat(parts))
        if moe.shared is not None:
            y = self._expert(*moe.shared, x)
            if moe.shared_gate is not None:
                y = y * torch.sigmoid(F.linear(x, moe.shared_gate))
            out = out + y
        return self._reduce(out)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, step, rows: torch.Tensor) -> torch.Tensor:
        return self.run(tokens, positions, lambda attention, q, k, v: attention.attend(step, q, k, v), rows)

    def run(self, tokens: torch.Tensor, positions: torch.Tensor, attend, rows: torch.Tensor | None = None,
            hidden: torch.Tensor | None = None):
        """The logits of packed ``rows`` (all when None), with ``attend(attention, q, k, v)`` as each layer's
        attention over the cache (``forward``'s, or the static-shape one of ``graphs.py``). A pipeline stage
        starts from the previous stage's ``hidden`` unless it is the first, and returns its hidden states
        unless it is the last."""
        x = self._embed(tokens, positions) if self.first else hidden  # [N, h]
        for layer in self.layers:
            out = self._attention(layer, layer.input_norm(x), attend)
            x = x + out
            h = layer.mlp_norm(x)
            out = self._mlp(layer, h) if layer.moe is None else self._moe(layer.moe, h)
            x = x + out
        if not self.last:
            return x
        return self.output(self.final_norm(x if rows is None else x[rows]))
