"""The model's architecture as Megatron training records it (the checkpoint's ``args``).

Megatron-LM stores its argparse namespace in every checkpoint and ``--use-checkpoint-args`` rebuilds the
model from it. We keep the same names so that a checkpoint written by Megatron training and one written by
the demo-model builder are read the same way.
"""

from __future__ import annotations

import argparse
import dataclasses

import torch
import torch.nn.functional as F

# Megatron's names that changed (megatron-core 0.16 renamed several): the old name is read when the new one is
# absent.
RENAMED = {"norm_epsilon": "layernorm_epsilon", "layernorm_zero_centered_gamma": "apply_layernorm_1p"}

# Recorded fields that change the model's math and that this server does not compute: a checkpoint that sets
# one is refused at start, by name, rather than served wrong without a word. Each entry: the field and the
# values that are the plain model.
NOT_SERVED = {
    "openai_gelu": (None, False),
    "rotary_seq_len_interpolation_factor": (None, 1, 1.0),
    "qk_l2_norm": (None, False),
    "window_attn_skip_freq": (None,),  # some layers full, some windowed: every layer here shares one window
    "multi_latent_attention": (None, False),
    "softmax_type": (None, "vanilla"),
    "add_qkv_bias": (None, False),
    "apply_residual_connection_post_layernorm": (None, False),
    "mrope_section": (None,),
    "softmax_scale": (None,),
    "attention_output_gate": (None, False),
    "no_rope_freq": (None,),
    "glu_linear_offset": (None, 0, 0.0),
    "activation_func_clamp_value": (None,),
    "experimental_attention_variant": (None,),
    "linear_attention_freq": (None,),
    "is_hybrid_model": (None, False),
    "heterogeneous_layers_config_path": (None,),
    "moe_latent_size": (None, 0),  # experts computed in a projected space
    "moe_apply_probs_on_input": (None, False),
    "moe_router_topk_limited_devices": (None, 0),  # device-limited routing: depends on training's expert layout
    "mtp_num_layers": (None, 0),  # multi-token prediction layers: their weights have no place in the served model
}
# Every TransformerConfig field is read, refused here, or declared harmless: model/config_fields.py.


def refused_fields(values: dict) -> list[str]:
    """The recorded fields this server cannot serve (``field=value``), in NOT_SERVED's order."""
    return [f"{name}={values[name]!r}" for name, plain in NOT_SERVED.items()
            if name in values and values[name] not in plain]


MOE_FIELDS = ("moe_router_topk", "moe_ffn_hidden_size", "moe_router_score_function", "moe_router_pre_softmax",
              "moe_router_topk_scaling_factor", "moe_router_enable_expert_bias", "moe_router_num_groups",
              "moe_router_group_topk", "moe_shared_expert_intermediate_size", "moe_shared_expert_gate",
              "moe_layer_freq")


@dataclasses.dataclass(frozen=True)
class GPTArchitecture:
    """Hyper-parameters that decide the shape of a Megatron GPT model (Megatron-LM argument names)."""

    num_layers: int
    hidden_size: int
    num_attention_heads: int
    ffn_hidden_size: int
    padded_vocab_size: int
    max_position_embeddings: int
    seq_length: int
    num_query_groups: int | None = None
    kv_channels: int | None = None
    position_embedding_type: str = "learned_absolute"
    normalization: str = "LayerNorm"
    norm_epsilon: float = 1e-5
    swiglu: bool = False
    add_bias_linear: bool = True
    untie_embeddings_and_output_weights: bool = False
    rotary_base: int = 10000
    rotary_percent: float = 1.0
    rotary_interleaved: bool = False  # rotate channel pairs (0, 1), (2, 3), ... instead of the two halves
    use_rope_scaling: bool = False  # Llama-3.1's frequency scaling (low 1, high 4, original context 8192)
    rope_scaling_factor: float = 8.0
    qk_layernorm: bool = False  # each head's query and key normalised (the model's norm type) before RoPE
    squared_relu: bool = False  # the MLP's activation is relu(x) ** 2
    layernorm_zero_centered_gamma: bool = False  # norms scale by 1 + the stored weight (apply_layernorm_1p)
    # Sliding-window attention (left, right), as flash attention takes it: a token sees itself and the ``left``
    # tokens before it; right must be 0 (causal). None or a negative left: the whole context.
    window_size: tuple[int, int] | None = None
    # Mixture of experts (Megatron's names): each MoE layer's MLP is ``num_experts`` experts of
    # ``moe_ffn_hidden_size`` (default ffn_hidden_size) behind a router that picks ``moe_router_topk`` per token.
    num_experts: int | None = None
    moe_router_topk: int = 2
    moe_ffn_hidden_size: int | None = None
    moe_router_score_function: str = "softmax"  # or "sigmoid" (DeepSeek-V3)
    moe_router_pre_softmax: bool = False  # softmax over all experts before the top-k (else over the top-k)
    moe_router_topk_scaling_factor: float | None = None
    moe_router_enable_expert_bias: bool = False  # a persistent per-expert bias added for selection only
    moe_router_num_groups: int | None = None  # group-limited routing: experts in groups, the best groups first
    moe_router_group_topk: int | None = None
    moe_shared_expert_intermediate_size: int | None = None  # a dense expert every token goes through
    moe_shared_expert_gate: bool = False  # the shared expert's output scaled by sigmoid(a learned gate)
    moe_layer_freq: int | tuple[int, ...] = 1  # every n-th layer is MoE, or a 0/1 pattern per layer
    # Uneven pipeline splits as training recorded them (Megatron's names); used when they fit the served PP
    num_layers_in_first_pipeline_stage: int | None = None
    num_layers_in_last_pipeline_stage: int | None = None

    @property
    def attention_window(self) -> int | None:
        """How many earlier tokens a token sees besides itself, or None for all of them."""
        if self.window_size is None or self.window_size[0] < 0:
            return None
        return int(self.window_size[0])

    @classmethod
    def from_megatron_args(cls, args: argparse.Namespace | dict) -> GPTArchitecture:
        """Read the architecture from a Megatron ``args`` namespace. Fields that change the math and are not
        served (``NOT_SERVED``) raise ``ValueError`` naming them; the others that do not shape the model are
        ignored."""
        values = vars(args) if isinstance(args, argparse.Namespace) else dict(args)
        values = {**{new: values[old] for new, old in RENAMED.items() if new not in values and old in values},
                  **values}
        refused = refused_fields(values)
        if refused:
            raise ValueError(f"the checkpoint's args set {', '.join(refused)}, which this server does not compute "
                             "yet; serving it would give wrong text")
        names = {f.name for f in dataclasses.fields(cls)}
        missing = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING and f.name not in values]
        if missing:
            raise ValueError(f"checkpoint args lack required model fields: {', '.join(missing)}")
        kept = {k: v for k, v in values.items() if k in names and v is not None}
        if "window_size" in kept:
            window = tuple(int(w) for w in kept["window_size"])
            if len(window) != 2 or window[1] not in (0, -1):
                raise ValueError(f"window_size={kept['window_size']!r}: only a causal window (left, 0) is served")
            kept["window_size"] = window
        if not values.get("group_query_attention", False):
            kept["num_query_groups"] = None
        if not kept.get("num_experts"):  # the MoE fields say nothing without experts
            kept = {k: v for k, v in kept.items() if k not in MOE_FIELDS}
        elif isinstance(kept.get("moe_layer_freq"), list):
            kept["moe_layer_freq"] = tuple(int(x) for x in kept["moe_layer_freq"])
        arch = cls(**kept)
        problem = arch.moe_problem()
        if problem:
            raise ValueError(problem)
        return arch

    @property
    def moe_layers(self) -> list[bool]:
        """Which layers (global, 0-based) are MoE layers (``moe_layer_freq``, Megatron's rule)."""
        if not self.num_experts:
            return [False] * self.num_layers
        if isinstance(self.moe_layer_freq, int):
            return [i % self.moe_layer_freq == 0 for i in range(self.num_layers)]
        return [bool(x) for x in self.moe_layer_freq]

    def moe_problem(self) -> str | None:
        """Why these MoE fields cannot be served, or None."""
        if not self.num_experts:
            return None
        freq = self.moe_layer_freq
        if isinstance(freq, int) and freq < 1 or not isinstance(freq, int) and len(freq) != self.num_layers:
            return f"moe_layer_freq={freq!r} must be a positive integer or one 0/1 entry per layer"
        if not 0 < self.moe_router_topk <= self.num_experts:
            return f"moe_router_topk={self.moe_router_topk} must be between 1 and num_experts={self.num_experts}"
        if self.moe_router_score_function not in ("softmax", "sigmoid"):
            return f"moe_router_score_function={self.moe_router_score_function!r} must be softmax or sigmoid"
        groups = self.moe_router_num_groups
        if groups and (self.num_experts % groups or not self.moe_router_group_topk
                       or self.moe_router_group_topk > groups):
            return (f"moe_router_num_groups={groups}, moe_router_group_topk={self.moe_router_group_topk}: the groups "
                    f"must divide num_experts={self.num_experts} and group_topk be 1 .. num_groups")
        return None

    def tensor_parallel_problem(self, tp: int, ep: int = 0) -> str | None:
        """Why this model cannot be split ``tp`` ways (its experts ``ep`` ways, default ``tp``), or None."""
        groups = self.num_query_groups or self.num_attention_heads
        for what, value in (("num_attention_heads", self.num_attention_heads), ("num_query_groups", groups),
                            ("ffn_hidden_size", self.ffn_hidden_size), ("padded_vocab_size", self.padded_vocab_size)):
            if value % tp:
                return f"{what}={value} is not divisible by {tp}"
        ep = ep or tp
        if self.num_experts:
            experts_ffn = self.moe_ffn_hidden_size or self.ffn_hidden_size
            for what, value, parts in (("num_experts", self.num_experts, ep),
                                       ("moe_ffn_hidden_size", experts_ffn, tp // ep),
                                       ("moe_shared_expert_intermediate_size",
                                        self.moe_shared_expert_intermediate_size or 0, tp)):
                if value % parts:
                    return f"{what}={value} is not divisible by {parts} (TP={tp}, EP={ep})"
        if self.position_embedding_type not in ("learned_absolute", "rope"):
            return f"position_embedding_type={self.position_embedding_type!r} is not supported"
        return None

    def stage_layers(self, pipeline_parallel: int) -> list[range]:
        """The layers (0-based, global) each of ``pipeline_parallel`` stages holds, as Megatron training splits them:
        the recorded first/last stage sizes when they fit this many stages, else evenly. ``ValueError`` when the
        layers cannot be split so (Megatron's own rules, by its own functions)."""
        from megatron.core.transformer.transformer_block import get_num_layers_to_build
        from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

        if pipeline_parallel == 1:
            return [range(self.num_layers)]
        uneven = {"num_layers_in_first_pipeline_stage": self.num_layers_in_first_pipeline_stage,
                  "num_layers_in_last_pipeline_stage": self.num_layers_in_last_pipeline_stage}
        even = dict.fromkeys(uneven)
        for fields in (uneven, even):  # the recorded split, else an even one
            try:  # Megatron checks by assert and ValueError alike
                config = self.transformer_config(pipeline_parallel=pipeline_parallel, **fields)
                stages = []
                for rank in range(pipeline_parallel):
                    start = get_transformer_layer_offset(config, pp_rank=rank)
                    stages.append(range(start, start + get_num_layers_to_build(config, pp_rank=rank)))
            except (AssertionError, ValueError):
                continue
            if all(len(s) > 0 for s in stages) and stages[-1].stop == self.num_layers:
                return stages
        recorded = ", ".join(f"{k}={v}" for k, v in uneven.items() if v is not None)
        raise ValueError(f"num_layers={self.num_layers} cannot be split in {pipeline_parallel} pipeline stages"
                         f"{' (recorded: ' + recorded + ')' if recorded else ''}: an even split needs num_layers "
                         "divisible by PP, an uneven one num_layers_in_first/last_pipeline_stage that fit it")

    def served_split(self, pipeline_parallel: int, layers: str = "") -> GPTArchitecture:
        """This architecture with the stage split ``PP_LAYERS`` asks for, to build and load the served stages by
        (any split reads any checkpoint: weights are found by their global layer index).

        ``layers``: empty, the recorded split else an even one (``stage_layers``); ``balanced``, the split that
        evens out each stage's weights read per step, the last stage's output layer counted as the layers its
        weights equal (with a large vocabulary an even split leaves the last stage the slowest, and with batches in
        flight the slowest stage paces all; a dense layer's weights are counted); or the layers of each stage,
        ``"14,10"``. Megatron's splits only: a first and a last
        stage of any size, the stages between them equal. ``ValueError`` names ``PP_LAYERS`` and the rule.
        """
        if pipeline_parallel == 1 or not layers:
            return self
        if layers == "balanced":
            sizes = self._balanced_split(pipeline_parallel)
        else:
            try:
                sizes = [int(n) for n in layers.split(",")]
            except ValueError:
                raise ValueError(f"PP_LAYERS must be 'balanced' or the layers of each stage, e.g. '14,10'; got "
                                 f"{layers!r}") from None
            if len(sizes) != pipeline_parallel or min(sizes) < 1 or sum(sizes) != self.num_layers:
                raise ValueError(f"PP_LAYERS={layers!r} must give each of the PP={pipeline_parallel} stages at least "
                                 f"one layer and {self.num_layers} layers in all")
            if len(set(sizes[1:-1])) > 1:
                raise ValueError(f"PP_LAYERS={layers!r}: the stages between the first and the last must hold as "
                                 "many layers each (Megatron's uneven split)")
        if len(set(sizes)) == 1:
            return dataclasses.replace(self, num_layers_in_first_pipeline_stage=None,
                                       num_layers_in_last_pipeline_stage=None)
        return dataclasses.replace(self, num_layers_in_first_pipeline_stage=sizes[0],
                                   num_layers_in_last_pipeline_stage=sizes[-1])

    def _balanced_split(self, pipeline_parallel: int) -> list[int]:
        """Layers per stage (Megatron's shape) whose largest stage, in weights read per step, is smallest."""
        hidden, ffn = self.hidden_size, self.ffn_hidden_size
        head = self.kv_channels or hidden // self.num_attention_heads
        groups = self.num_query_groups or self.num_attention_heads
        attention = hidden * head * (2 * self.num_attention_heads + 2 * groups)
        layer = attention + hidden * ffn * (3 if self.swiglu else 2)
        output = self.padded_vocab_size * hidden / layer  # the output layer, in layers
        n, middle_stages = self.num_layers, pipeline_parallel - 2
        best = None
        for first in range(1, n):
            for last in range(1, n - first + 1):
                rest = n - first - last
                if middle_stages == 0 and rest or middle_stages and (rest < middle_stages or rest % middle_stages):
                    continue
                sizes = [first] + [rest // middle_stages] * middle_stages + [last] if middle_stages else [first, last]
                cost = (max(max(sizes[:-1]), last + output), abs(first - last))
                if best is None or cost < best[0]:
                    best = (cost, sizes)
        if best is None:
            raise ValueError(f"num_layers={n} cannot be split in {pipeline_parallel} pipeline stages")
        return best[1]

    def to_megatron_args(self, **extra) -> argparse.Namespace:
        """The namespace Megatron training would have saved for this architecture."""
        values = dataclasses.asdict(self)
        values["group_query_attention"] = self.num_query_groups is not None
        if not isinstance(self.moe_layer_freq, int):
            values["moe_layer_freq"] = list(self.moe_layer_freq)
        values.update(extra)
        return argparse.Namespace(**values)

    def transformer_config(self, params_dtype: torch.dtype = torch.float32, tensor_parallel: int = 1,
                           pipeline_parallel: int = 1, **overrides):
        """Megatron-core ``TransformerConfig`` for inference (no dropout, CPU-safe initialisation); at
        ``pipeline_parallel`` > 1 with the recorded uneven split when it fits (``stage_layers``)."""
        from megatron.core.transformer.transformer_config import TransformerConfig

        fields = self._config_fields(params_dtype, tensor_parallel)
        if pipeline_parallel > 1:
            fields.update(pipeline_model_parallel_size=pipeline_parallel, pipeline_dtype=params_dtype)
            if "num_layers_in_first_pipeline_stage" not in overrides:
                sizes = [len(s) for s in self.stage_layers(pipeline_parallel)]
                if len(set(sizes)) > 1:
                    fields.update(num_layers_in_first_pipeline_stage=sizes[0],
                                  num_layers_in_last_pipeline_stage=sizes[-1])
        return TransformerConfig(**{**fields, **overrides})

    def _config_fields(self, params_dtype: torch.dtype, tensor_parallel: int) -> dict:
        return dict(
            num_layers=self.num_layers,
            hidden_size=self.hidden_size,
            num_attention_heads=self.num_attention_heads,
            num_query_groups=self.num_query_groups,
            kv_channels=self.kv_channels,
            ffn_hidden_size=self.ffn_hidden_size,
            normalization=self.normalization,
            layernorm_epsilon=self.norm_epsilon,
            gated_linear_unit=self.swiglu,
            activation_func=self._activation(),
            add_bias_linear=self.add_bias_linear,
            hidden_dropout=0.0,
            attention_dropout=0.0,
            tensor_model_parallel_size=tensor_parallel,
            params_dtype=params_dtype,
            bf16=params_dtype == torch.bfloat16,
            fp16=params_dtype == torch.float16,
            use_cpu_initialization=True,
            bias_activation_fusion=False,
            bias_dropout_fusion=False,
            masked_softmax_fusion=False,
            persist_layer_norm=False,
            gradient_accumulation_fusion=False,
            apply_rope_fusion=False,
            rotary_interleaved=self.rotary_interleaved,
            qk_layernorm=self.qk_layernorm,
            **self._moe_config_fields(),
        )

    def _moe_config_fields(self) -> dict:
        if not self.num_experts:
            return {}
        return dict(
            num_moe_experts=self.num_experts,
            moe_router_topk=self.moe_router_topk,
            moe_ffn_hidden_size=self.moe_ffn_hidden_size or self.ffn_hidden_size,
            moe_router_score_function=self.moe_router_score_function,
            moe_router_pre_softmax=self.moe_router_pre_softmax,
            moe_router_topk_scaling_factor=self.moe_router_topk_scaling_factor,
            moe_router_enable_expert_bias=self.moe_router_enable_expert_bias,
            moe_router_num_groups=self.moe_router_num_groups,
            moe_router_group_topk=self.moe_router_group_topk,
            moe_shared_expert_intermediate_size=self.moe_shared_expert_intermediate_size,
            moe_shared_expert_gate=self.moe_shared_expert_gate,
            moe_layer_freq=self.moe_layer_freq if isinstance(self.moe_layer_freq, int) else list(self.moe_layer_freq),
            # Inference is dropless (no capacity, whatever training's moe_expert_capacity_factor was) and has no
            # auxiliary losses; tokens are gathered to the experts' ranks (the all-to-all dispatcher needs CUDA).
            moe_expert_capacity_factor=None,
            moe_input_jitter_eps=None,  # training's noise on the router's input (applied in eval too)
            moe_router_load_balancing_type="none",
            moe_aux_loss_coeff=0.0,
            moe_token_dispatcher_type="allgather",
            moe_grouped_gemm=False,
        )

    def _activation(self):
        if self.squared_relu:
            from megatron.core.activations import squared_relu

            return squared_relu
        return F.silu if self.swiglu else F.gelu
