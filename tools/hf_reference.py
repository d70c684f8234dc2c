"""A Megatron checkpoint as a Hugging Face transformers model (CPU, float32): the reference `make bench-engine`
measures the engine against, and its proof of being the same model.

    .venv/bin/python -m tools.hf_reference [--checkpoint demo_model/checkpoint]

prints the largest absolute logit difference between this project's Megatron ``GPTModel`` (``build_model`` and
``load_weights``, one plain causal forward, no KV cache) and the transformers model on the same token ids, and
exits non-zero above ``--tolerance``. transformers is a benchmark-only dependency (``requirements-bench.txt``).

Two families map onto stock transformers classes:

* GPT-2 style (learned absolute positions, LayerNorm, GELU): ``GPT2LMHeadModel``. Megatron's GELU here is
  ``F.gelu``, the exact erf form (``GPTArchitecture.transformer_config``), so ``activation_function="gelu"``;
  GPT-2's own ``"gelu_new"`` is the tanh approximation and moves the demo model's logits by 3e-3 (5.7e-6 with "gelu").
* Llama style (rotary positions, RMSNorm, SwiGLU, optional grouped-query attention): ``LlamaForCausalLM``, with
  Llama-3.1's ``rope_type: llama3`` where the checkpoint sets ``use_rope_scaling``; with ``qk_layernorm``,
  ``Qwen3ForCausalLM`` (the same model with an RMSNorm over each head's query and key before RoPE); with a
  sliding window, ``MistralForCausalLM`` (its ``sliding_window`` counts the token itself: Megatron's left + 1).

Megatron fuses Q, K and V into one ``linear_qkv`` whose output rows are grouped per query group: for each group,
its query heads, then its key head, then its value head (``SelfAttention.get_query_key_value_tensors`` views the
output as [groups, (heads per group + 2) * head_dim] and splits it in that order). ``split_qkv`` undoes this.
The vocabulary stays padded (``padded_vocab_size`` rows), so logits line up id for id with the engine's.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import torch

from triton_backend import checkpoints
from triton_backend.model.architecture import GPTArchitecture
from triton_backend.model.gpt import build_model, init_parallel

ROOT = pathlib.Path(__file__).resolve().parent.parent
DEMO_CHECKPOINT = ROOT / "demo_model" / "checkpoint"


class UnsupportedArchitecture(ValueError):
    """The checkpoint's architecture has no transformers counterpart here."""


def family(arch: GPTArchitecture) -> str:
    """"gpt2" or "llama", or ``UnsupportedArchitecture`` naming what does not fit either."""
    gpt2 = (arch.position_embedding_type, arch.normalization, arch.swiglu) == ("learned_absolute", "LayerNorm", False)
    llama = (arch.position_embedding_type, arch.normalization, arch.swiglu) == ("rope", "RMSNorm", True)
    if gpt2:
        head_dim = arch.kv_channels or arch.hidden_size // arch.num_attention_heads
        if arch.num_query_groups not in (None, arch.num_attention_heads) or \
                head_dim * arch.num_attention_heads != arch.hidden_size:
            raise UnsupportedArchitecture("GPT2LMHeadModel has neither grouped-query attention nor a head size "
                                          "other than hidden_size / heads")
        return "gpt2"
    if llama:
        if arch.rotary_percent != 1.0 or arch.rotary_interleaved:
            raise UnsupportedArchitecture(f"rotary_percent={arch.rotary_percent}, rotary_interleaved="
                                          f"{arch.rotary_interleaved}: LlamaForCausalLM rotates every channel of a "
                                          "head, by halves")
        if arch.squared_relu:
            raise UnsupportedArchitecture("squared_relu: LlamaForCausalLM's MLP is SwiGLU")
        return "llama"
    raise UnsupportedArchitecture(
        f"no transformers counterpart for position_embedding_type={arch.position_embedding_type!r}, "
        f"normalization={arch.normalization!r}, swiglu={arch.swiglu}: supported are GPT-2 style "
        "(learned_absolute, LayerNorm, GELU) and Llama style (rope, RMSNorm, SwiGLU)")


def load_megatron(checkpoint: str | pathlib.Path) -> tuple[torch.nn.Module, GPTArchitecture]:
    """This project's ``GPTModel`` (float32, CPU, TP=1) with the checkpoint's weights, as the engine loads it.
    Initialises torch.distributed (a one-rank group) when nothing has yet."""
    init_parallel(1, "cpu")
    arch = checkpoints.read_architecture(checkpoint)
    family(arch)  # fail before loading weights that cannot be mapped
    model = build_model(arch, torch.float32)
    checkpoints.load_weights(model, checkpoint, arch)
    return model.eval(), arch


def split_qkv(fused: torch.Tensor, arch: GPTArchitecture) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q, K, V rows (weight or bias) of Megatron's fused ``linear_qkv``, each with its heads in head order."""
    heads = arch.num_attention_heads
    groups = arch.num_query_groups or heads
    head_dim = arch.kv_channels or arch.hidden_size // heads
    per_group = fused.reshape(groups, (heads // groups + 2) * head_dim, *fused.shape[1:])
    q, k, v = per_group.split([heads // groups * head_dim, head_dim, head_dim], dim=1)
    return tuple(t.reshape(-1, *fused.shape[1:]).contiguous() for t in (q, k, v))


def to_gpt2(state: dict, arch: GPTArchitecture):
    """``GPT2LMHeadModel`` with ``state``'s weights. GPT-2's ``Conv1D`` stores [in, out], so weights transpose."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=arch.padded_vocab_size, n_positions=arch.max_position_embeddings,
                        n_embd=arch.hidden_size, n_layer=arch.num_layers, n_head=arch.num_attention_heads,
                        n_inner=arch.ffn_hidden_size, activation_function="gelu",
                        layer_norm_epsilon=arch.norm_epsilon, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        tie_word_embeddings=not arch.untie_embeddings_and_output_weights,
                        bos_token_id=None, eos_token_id=None)  # GPT-2's 50256 is outside this vocabulary
    hf = {"transformer.wte.weight": state["embedding.word_embeddings.weight"],
          "transformer.wpe.weight": state["embedding.position_embeddings.weight"],
          "transformer.ln_f.weight": state["decoder.final_layernorm.weight"],
          "transformer.ln_f.bias": state["decoder.final_layernorm.bias"]}
    hf["lm_head.weight"] = state.get("output_layer.weight", hf["transformer.wte.weight"])

    def bias(name: str, size: int) -> torch.Tensor:  # add_bias_linear=False: GPT-2 has biases, zero ones are none
        return state.get(name, torch.zeros(size))

    h = arch.hidden_size
    for i in range(arch.num_layers):
        m, g = f"decoder.layers.{i}.", f"transformer.h.{i}."
        qkv_w = torch.cat(split_qkv(state[m + "self_attention.linear_qkv.weight"], arch))
        qkv_b = torch.cat(split_qkv(bias(m + "self_attention.linear_qkv.bias", 3 * h), arch))
        hf.update({
            g + "ln_1.weight": state[m + "input_layernorm.weight"], g + "ln_1.bias": state[m + "input_layernorm.bias"],
            g + "attn.c_attn.weight": qkv_w.t(), g + "attn.c_attn.bias": qkv_b,
            g + "attn.c_proj.weight": state[m + "self_attention.linear_proj.weight"].t(),
            g + "attn.c_proj.bias": bias(m + "self_attention.linear_proj.bias", h),
            g + "ln_2.weight": state[m + "pre_mlp_layernorm.weight"],
            g + "ln_2.bias": state[m + "pre_mlp_layernorm.bias"],
            g + "mlp.c_fc.weight": state[m + "mlp.linear_fc1.weight"].t(),
            g + "mlp.c_fc.bias": bias(m + "mlp.linear_fc1.bias", arch.ffn_hidden_size),
            g + "mlp.c_proj.weight": state[m + "mlp.linear_fc2.weight"].t(),
            g + "mlp.c_proj.bias": bias(m + "mlp.linear_fc2.bias", h),
        })
    return _filled(GPT2LMHeadModel(config), hf)


def to_llama(state: dict, arch: GPTArchitecture):
    """``LlamaForCausalLM`` with ``state``'s weights. Megatron's SwiGLU ``linear_fc1`` is [gate; up] stacked
    (its GLU applies the activation to the first half), and both rotate the halves of a head alike."""
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen3Config,
        Qwen3ForCausalLM,
    )

    heads = arch.num_attention_heads
    rope = {"rope_type": "default", "rope_theta": float(arch.rotary_base)}
    if arch.use_rope_scaling:  # as Megatron hard-codes it: low 1, high 4, original context 8192
        rope.update(rope_type="llama3", factor=float(arch.rope_scaling_factor), low_freq_factor=1.0,
                    high_freq_factor=4.0, original_max_position_embeddings=8192)
    config_class, model_class = (Qwen3Config, Qwen3ForCausalLM) if arch.qk_layernorm else \
        (LlamaConfig, LlamaForCausalLM)
    extra = {} if arch.qk_layernorm else {"mlp_bias": arch.add_bias_linear}
    if arch.num_experts:
        config_class, model_class, extra = moe_classes(arch)
        if "n_group" in extra:  # Glm4Moe rotates part of each head unless told otherwise
            extra["rope_parameters"] = {**rope, "partial_rotary_factor": 1.0}
    if arch.attention_window is not None:
        if arch.qk_layernorm:
            raise UnsupportedArchitecture("qk_layernorm with a sliding window has no transformers counterpart here")
        config_class, model_class = MistralConfig, MistralForCausalLM
        extra = {"sliding_window": arch.attention_window + 1}
    config = config_class(**{**dict(vocab_size=arch.padded_vocab_size, hidden_size=arch.hidden_size,
                                    intermediate_size=arch.ffn_hidden_size, num_hidden_layers=arch.num_layers,
                                    num_attention_heads=heads, num_key_value_heads=arch.num_query_groups or heads,
                                    head_dim=arch.kv_channels or arch.hidden_size // heads,
                                    max_position_embeddings=arch.max_position_embeddings,
                                    rms_norm_eps=arch.norm_epsilon, rope_parameters=rope,
                                    attention_bias=arch.add_bias_linear,
                                    tie_word_embeddings=not arch.untie_embeddings_and_output_weights), **extra})
    hf = {"model.embed_tokens.weight": state["embedding.word_embeddings.weight"],
          "model.norm.weight": state["decoder.final_layernorm.weight"]}
    hf["lm_head.weight"] = state.get("output_layer.weight", hf["model.embed_tokens.weight"])
    for i in range(arch.num_layers):
        m, g = f"decoder.layers.{i}.", f"model.layers.{i}."
        names = ["weight"] + (["bias"] if arch.add_bias_linear else [])
        for kind in names:
            q, k, v = split_qkv(state[m + "self_attention.linear_qkv." + kind], arch)
            hf.update({g + "self_attn.q_proj." + kind: q, g + "self_attn.k_proj." + kind: k,
                       g + "self_attn.v_proj." + kind: v,
                       g + "self_attn.o_proj." + kind: state[m + "self_attention.linear_proj." + kind]})
            if not arch.moe_layers[i]:
                hf.update(_mlp(state, m + "mlp.", g + "mlp.", kind))
        if arch.moe_layers[i]:
            hf.update(_moe(state, m + "mlp.", g + "mlp.", arch))
        if arch.qk_layernorm:
            hf[g + "self_attn.q_norm.weight"] = state[m + "self_attention.q_layernorm.weight"]
            hf[g + "self_attn.k_norm.weight"] = state[m + "self_attention.k_layernorm.weight"]
        hf[g + "input_layernorm.weight"] = state[m + "input_layernorm.weight"]
        hf[g + "post_attention_layernorm.weight"] = state[m + "pre_mlp_layernorm.weight"]
    return _filled(model_class(config), hf)


def moe_classes(arch: GPTArchitecture):
    """The transformers family of a mixture-of-experts checkpoint: ``MixtralForCausalLM`` (softmax over the top-k
    logits, no shared expert), ``Qwen2MoeForCausalLM`` (a gated shared expert; softmax over all experts, the top-k
    renormalised or not) or, for DeepSeek-V3's routing with standard attention, ``Glm4MoeForCausalLM`` (sigmoid
    scores, the expert bias for selection only, groups ranked by their two best experts, the top-k renormalised
    and scaled; an ungated shared expert; the first layers dense). Their experts are Megatron's: [gate; up]
    stacked in fc1, then fc2."""
    from transformers import (
        Glm4MoeConfig,
        Glm4MoeForCausalLM,
        MixtralConfig,
        MixtralForCausalLM,
        Qwen2MoeConfig,
        Qwen2MoeForCausalLM,
    )

    unmapped = {"add_bias_linear": arch.add_bias_linear, "qk_layernorm": arch.qk_layernorm,
                "window_size": arch.attention_window is not None}
    if any(unmapped.values()):
        raise UnsupportedArchitecture("no transformers MoE counterpart here for " +
                                      ", ".join(k for k, v in unmapped.items() if v))
    ffn = arch.moe_ffn_hidden_size or arch.ffn_hidden_size
    dense = [i for i, moe in enumerate(arch.moe_layers) if not moe]
    if arch.moe_router_score_function == "sigmoid":
        groups, best = arch.moe_router_num_groups or 1, arch.moe_router_group_topk or 1
        shared = arch.moe_shared_expert_intermediate_size
        if dense != list(range(len(dense))) or not shared or shared % ffn or arch.moe_shared_expert_gate or \
                arch.moe_router_topk // best != 2 and groups > 1:
            raise UnsupportedArchitecture("Glm4MoeForCausalLM: the dense layers first, ungated shared experts of "
                                          "whole experts' size, groups ranked by their two best experts")
        return Glm4MoeConfig, Glm4MoeForCausalLM, dict(
            n_routed_experts=arch.num_experts, num_experts_per_tok=arch.moe_router_topk, moe_intermediate_size=ffn,
            n_shared_experts=shared // ffn, n_group=groups, topk_group=best, first_k_dense_replace=len(dense),
            routed_scaling_factor=arch.moe_router_topk_scaling_factor or 1.0, norm_topk_prob=arch.moe_router_topk > 1)
    unmapped = {"moe_router_enable_expert_bias": arch.moe_router_enable_expert_bias,
                "moe_router_num_groups": bool(arch.moe_router_num_groups),
                "moe_router_topk_scaling_factor": arch.moe_router_topk_scaling_factor not in (None, 1.0)}
    if any(unmapped.values()):
        raise UnsupportedArchitecture("no transformers softmax-routed counterpart here for " +
                                      ", ".join(k for k, v in unmapped.items() if v))
    if arch.moe_shared_expert_intermediate_size:
        if not arch.moe_shared_expert_gate:
            raise UnsupportedArchitecture("a shared expert without its gate: Qwen2MoE's is always gated")
        return Qwen2MoeConfig, Qwen2MoeForCausalLM, dict(
            num_experts=arch.num_experts, num_experts_per_tok=arch.moe_router_topk, moe_intermediate_size=ffn,
            shared_expert_intermediate_size=arch.moe_shared_expert_intermediate_size,
            norm_topk_prob=not arch.moe_router_pre_softmax, decoder_sparse_step=1, mlp_only_layers=dense,
            qkv_bias=False)
    if dense or arch.moe_router_pre_softmax:
        raise UnsupportedArchitecture("MixtralForCausalLM has MoE in every layer and renormalises the top-k")
    return MixtralConfig, MixtralForCausalLM, dict(num_local_experts=arch.num_experts,
                                                   num_experts_per_tok=arch.moe_router_topk,
                                                   intermediate_size=ffn)


def _mlp(state: dict, m: str, g: str, kind: str = "weight") -> dict:
    """A dense SwiGLU MLP: Megatron's fc1 is [gate; up]."""
    gate, up = state[m + "linear_fc1." + kind].chunk(2)
    return {g + "gate_proj." + kind: gate, g + "up_proj." + kind: up,
            g + "down_proj." + kind: state[m + "linear_fc2." + kind]}


def _moe(state: dict, m: str, g: str, arch: GPTArchitecture) -> dict:
    experts = range(arch.num_experts)
    hf = {g + "gate.weight": state[m + "router.weight"],
          g + "experts.gate_up_proj": torch.stack([state[f"{m}experts.local_experts.{e}.linear_fc1.weight"]
                                                   for e in experts]),
          g + "experts.down_proj": torch.stack([state[f"{m}experts.local_experts.{e}.linear_fc2.weight"]
                                                for e in experts])}
    if arch.moe_router_score_function == "sigmoid":  # Glm4Moe
        hf[g + "gate.e_score_correction_bias"] = state.get(m + "router.expert_bias", torch.zeros(arch.num_experts))
        hf.update(_mlp(state, m + "shared_experts.", g + "shared_experts."))
    elif arch.moe_shared_expert_intermediate_size:  # Qwen2Moe
        hf.update(_mlp(state, m + "shared_experts.", g + "shared_expert."))
        hf[g + "shared_expert_gate.weight"] = state[m + "shared_experts.gate_weight"]
    return hf


def _filled(model, weights: dict):
    """``model`` (float32, eval) holding exactly ``weights``: every parameter set, none left at its random init."""
    own = model.state_dict()
    missing = sorted(set(own) - set(weights))
    unexpected = sorted(set(weights) - set(own))
    if missing or unexpected:
        raise UnsupportedArchitecture(f"weight mapping incomplete: missing {missing[:4]}, unexpected {unexpected[:4]}")
    with torch.no_grad():
        for name, tensor in own.items():
            tensor.copy_(weights[name])
    return model.float().eval()


def hf_from_megatron(model: torch.nn.Module, arch: GPTArchitecture):
    """The transformers counterpart of a loaded Megatron ``GPTModel`` (copies of its weights)."""
    state = {k: v.detach().float().cpu() for k, v in model.state_dict().items()
             if isinstance(v, torch.Tensor) and not k.endswith("_extra_state")}
    return (to_gpt2 if family(arch) == "gpt2" else to_llama)(state, arch)


def load_hf(checkpoint: str | pathlib.Path):
    """The transformers model of a Megatron checkpoint directory and its architecture."""
    model, arch = load_megatron(checkpoint)
    return hf_from_megatron(model, arch), arch


@torch.inference_mode()
def max_logit_difference(megatron: torch.nn.Module, hf, token_ids: torch.Tensor) -> float:
    """Largest |logit difference| over every position of ``token_ids`` [batch, seq]: Megatron's plain causal
    forward (no cache step set, so ``PagedAttention`` attends over the given sequence) against transformers'."""
    positions = torch.arange(token_ids.shape[1])[None].expand_as(token_ids)
    theirs = megatron(token_ids, positions, None).float()  # [batch, seq, padded vocab]
    ours = hf(input_ids=token_ids).logits.float()
    return (theirs - ours).abs().max().item()


def self_check(checkpoint: str | pathlib.Path, seq: int = 64, batch: int = 2, seed: int = 0) -> dict:
    """Both models on the same random token ids: the largest logit difference and the logits' own scale."""
    megatron, arch = load_megatron(checkpoint)
    hf = hf_from_megatron(megatron, arch)
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(arch.padded_vocab_size, (batch, min(seq, arch.max_position_embeddings)), generator=generator)
    with torch.inference_mode():
        scale = hf(input_ids=ids).logits.abs().max().item()
    return {"checkpoint": str(checkpoint), "hf_class": type(hf).__name__, "tokens": list(ids.shape),
            "max_abs_logit_diff": max_logit_difference(megatron, hf, ids), "max_abs_logit": round(scale, 3)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=pathlib.Path, default=DEMO_CHECKPOINT)
    parser.add_argument("--tolerance", type=float, default=1e-3)
    a = parser.parse_args()
    result = self_check(a.checkpoint)
    result["ok"] = result["max_abs_logit_diff"] < a.tolerance
    print(json.dumps(result), flush=True)
    torch.distributed.destroy_process_group()
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
