"""The architecture fields newer Megatron models record, held to transformers on the same weights: Llama with
Llama-3.1's RoPE scaling (``rope_type: llama3``), Qwen3 for qk-norm, Mistral for a sliding window, GPT-2 for the
classic family. The engine
(paged cache, fast path, as rank 0 serves) gives transformers' greedy tokens, with log-probs within 1e-3."""

import dataclasses

import pytest
import torch

from preprocessing.params import SamplingParams
from tools.hf_reference import hf_from_megatron, max_logit_difference
from triton_backend.engine.engine import Engine
from triton_backend.model.gpt import CachedGPT

from .models import ARCH, ROTARY_ARCH, VOCAB, context_model

CASES = {
    "gpt2": ARCH,
    "llama": ROTARY_ARCH,
    "llama3.1_rope_scaling": dataclasses.replace(ROTARY_ARCH, use_rope_scaling=True),
    "qwen3_qk_norm": dataclasses.replace(ROTARY_ARCH, qk_layernorm=True, use_rope_scaling=True),
    "mistral_sliding_window": dataclasses.replace(ROTARY_ARCH, window_size=(6, 0)),
    # Mixture of experts, through Megatron's own MoE layer: Mixtral's softmax top-2 of 4 experts; Qwen2-MoE's
    # softmax over all experts with a gated shared expert, and a dense first layer (moe_layer_freq).
    "mixtral": dataclasses.replace(ROTARY_ARCH, num_experts=4, moe_router_topk=2, moe_ffn_hidden_size=48),
    "qwen2_moe": dataclasses.replace(ROTARY_ARCH, num_layers=3, num_experts=4, moe_router_topk=2,
                                     moe_ffn_hidden_size=48, moe_router_pre_softmax=True,
                                     moe_shared_expert_intermediate_size=32, moe_shared_expert_gate=True,
                                     moe_layer_freq=(0, 1, 1)),
    # DeepSeek-V3's routing (GLM-4.5 keeps it with standard attention): sigmoid scores, an expert bias for the
    # choice only, 4 groups of which the best 2 (by their two best experts), top-4 scaled by 2.5, a shared expert.
    "glm4_moe_deepseek_routing": dataclasses.replace(
        ROTARY_ARCH, num_layers=3, num_experts=8, moe_router_topk=4, moe_ffn_hidden_size=48,
        moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True, moe_router_num_groups=4,
        moe_router_group_topk=2, moe_router_topk_scaling_factor=2.5, moe_shared_expert_intermediate_size=48,
        moe_layer_freq=(0, 1, 1)),
}
PROMPTS = [[5, 17, 33, 4, 90, 61, 12], [6, 17, 33, 4, 90, 61, 12, 8, 77, 3, 40, 9, 100, 64, 1, 22, 35, 48, 50]]


@pytest.fixture(scope="module", params=sorted(CASES))
def pair(request):
    arch = CASES[request.param]
    model = context_model(arch)
    with torch.no_grad():  # norms away from 1, so that a norm applied in the wrong place shows
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight"):
                p.normal_(1.0, 0.3, generator=torch.Generator().manual_seed(1))
        for name, b in model.named_buffers():  # an expert bias that changes which experts are chosen
            if name.endswith("router.expert_bias"):
                b.normal_(0.0, 0.2, generator=torch.Generator().manual_seed(2))
    return arch, model, hf_from_megatron(model, arch)


def test_logits_equal_transformers(pair):
    arch, model, hf = pair
    ids = torch.randint(VOCAB, (2, arch.max_position_embeddings), generator=torch.Generator().manual_seed(0))
    assert max_logit_difference(model, hf, ids) < 1e-4


@pytest.mark.parametrize("prefill_tokens", [256, 5])  # whole prompts, or chunks of 5 beside the decodes
def test_the_engine_generates_transformers_greedy_tokens_and_log_probs(pair, prefill_tokens):
    arch, model, hf = pair
    engine = Engine(CachedGPT(model, arch, max_slots=4, block_size=4), VOCAB, -1,
                    prefill_tokens=prefill_tokens).start()
    try:
        runs = [engine.submit(p, SamplingParams(max_tokens=16, temperature=0.0, end_id=-1, return_log_probs=True))
                for p in PROMPTS]
        for g in runs:
            assert g.wait(60) and g.error is None, g.error
    finally:
        engine.stop()
    for prompt, g in zip(PROMPTS, runs):
        ids, logprobs = list(prompt), []
        with torch.no_grad():
            for _ in range(16):
                logits = hf(input_ids=torch.tensor([ids])).logits[0, -1, :VOCAB].float()
                ids.append(int(logits.argmax()))
                logprobs.append(float(torch.log_softmax(logits, dim=0)[ids[-1]]))
        assert g.tokens == ids[len(prompt):]
        assert max(abs(a - b) for a, b in zip(g.logprobs, logprobs)) < 1e-3
