"""Mixture-of-experts layers as Megatron-core builds them, made to serve on any device.

A checkpoint with ``num_experts`` gets Megatron's own ``MoELayer`` (router, ``SequentialMLP`` experts, the
all-gather token dispatcher) where its ``moe_layer_freq`` says, from Megatron's decoder block spec. Megatron-core
0.16 trains on CUDA and assumes it in three places, which this module answers:

* ``TopKRouter.gating`` moves a CPU gate weight to ``torch.cuda.current_device()`` on every call, then calls
  ``router_gating_linear``, whose forward reads ``te_general_gemm``, a name bound only when TransformerEngine
  imports. ``ServedRouter`` computes the same product with torch where the weights are.
* The router's expert-bias buffers and the dispatcher's gather buffers are made on
  ``torch.cuda.current_device()``. With a torch that has no CUDA that call can only fail: there it names the
  CPU (``allocate_on_cpu``).
* The all-to-all dispatcher makes a CUDA stream: the all-gather one serves instead (``GPTArchitecture``'s
  config), on gloo and NCCL alike.
"""

from __future__ import annotations

from unittest import mock

import torch
import torch.nn.functional as F
from megatron.core.transformer.moe.moe_utils import group_limited_topk
from megatron.core.transformer.moe.router import TopKRouter


class ServedRouter(TopKRouter):
    """Megatron's top-k router (scores, expert bias, groups, scaling: all its own) with a gate that stays on the
    model's device, and a tally of the tokens sent to each expert (``served_tokens``, on the device: no host
    read in a step) for the metrics."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_buffer("served_tokens", torch.zeros(self.config.num_moe_experts, dtype=torch.int64),
                             persistent=False)

    def count(self, per_expert: torch.Tensor) -> None:
        """Add a step's tokens per expert (``per_expert``: [experts]) to the tally."""
        self.served_tokens += per_expert

    def forward(self, input: torch.Tensor, *args, **kwargs):
        probs, chosen = super().forward(input, *args, **kwargs)
        self.count(chosen.sum(dim=0))
        return probs, chosen

    def gating(self, input: torch.Tensor) -> torch.Tensor:
        dtype = {"fp32": torch.float32, "fp64": torch.float64}.get(self.config.moe_router_dtype, input.dtype)
        bias = None if self.bias is None else self.bias.to(dtype)
        return F.linear(input.to(dtype), self.weight.to(dtype), bias)


def top_k(logits: torch.Tensor, config, expert_bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights, experts) [tokens, k]: each token's chosen experts and their routing weights, by the arithmetic of
    Megatron's ``topk_routing_with_score_function`` (softmax before or after the top-k, or sigmoid with the
    expert bias for selection only; group-limited selection by Megatron's own ``group_limited_topk``; the
    scaling factor). Written out rather than called because Megatron's returns them spread over dense
    [tokens, experts] maps, made by two scatters, that a grouped computation must turn back into these
    indices: at a decode step's few rows those operations cost as much as the experts' products. Held to
    Megatron's function in tests/unit/test_moe.py."""
    k = config.moe_router_topk

    def pick(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if config.moe_router_group_topk:
            return group_limited_topk(scores, k, *scores.shape, config.moe_router_num_groups,
                                      config.moe_router_group_topk)
        return torch.topk(scores, k=k, dim=1)

    if config.moe_router_score_function == "softmax":
        if config.moe_router_pre_softmax:
            weights, chosen = pick(torch.softmax(logits, dim=-1, dtype=torch.float32).type_as(logits))
        else:
            scores, chosen = pick(logits)
            weights = torch.softmax(scores, dim=-1, dtype=torch.float32).type_as(logits)
    else:  # sigmoid (the architecture refuses any other)
        scores = torch.sigmoid(logits.float()).type_as(logits)
        if expert_bias is not None:
            chosen = pick(scores + expert_bias)[1]
            scores = torch.gather(scores, dim=1, index=chosen).type_as(logits)
        else:
            scores, chosen = pick(scores)
        weights = scores / (scores.sum(dim=-1, keepdim=True) + 1e-20) if k > 1 else scores
    if config.moe_router_topk_scaling_factor:
        weights = weights * config.moe_router_topk_scaling_factor
    return weights, chosen


def expert_tokens(model) -> dict[int, list[int]]:
    """Tokens routed to each expert so far, per MoE layer of ``model`` (this pipeline stage's), by the layer's
    global number (from 1, Megatron's ``layer_number``)."""
    return {r.layer_number: r.served_tokens.tolist() for r in model.modules() if isinstance(r, ServedRouter)}


def allocate_on_cpu() -> None:
    """On a torch without CUDA, ``torch.cuda.current_device()`` names the CPU for the rest of the process."""
    if not torch.cuda.is_available() and not isinstance(torch.cuda.current_device, mock.Mock):
        mock.patch("torch.cuda.current_device", return_value=torch.device("cpu")).start()


def block_spec(arch, config, core_attention):
    """Megatron's local decoder block spec for this pipeline stage's layers (MoE and dense, as ``moe_layer_freq``
    places them), with ``core_attention`` and the served router."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    spec = get_gpt_decoder_block_spec(config, use_transformer_engine=False, normalization=arch.normalization)
    for layer in spec.layer_specs:
        layer.submodules.self_attention.submodules.core_attention = core_attention
        if hasattr(layer.submodules.mlp.submodules, "router"):
            layer.submodules.mlp.submodules.router = ServedRouter
    return spec
