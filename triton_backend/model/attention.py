"""Core attention over a slot KV cache, replacing Megatron's ``DotProductAttention`` in the layer spec.

Why our own module: the stock ``DotProductAttention`` calls ``torch.cuda`` (so it cannot run on CPU) and
Megatron's ``StaticInferenceContext`` keeps one sequence offset for the whole batch, while continuous
batching needs every row at its own length. Megatron's ``SelfAttention`` still computes Q, K, V and the
output projection with its tensor-parallel layers; only the softmax(QK^T)V part and the cache live here.
A cached step is packed (``kv_cache.StepContext``): decode tokens read their cache rows in place, whole
prompts attend causally within themselves.

Rotary position embeddings are applied here too (the model is built without its own rotary module): GPTModel
would rotate every row by positions 0..s-1, but each cached row continues at its own position.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule

from triton_backend.cache.kv_cache import StepContext


class Rotary:
    """RoPE with Megatron's frequencies and rotation, at arbitrary per-row positions."""

    def __init__(self, config, head_dim: int, rotary_percent: float, rotary_base: int):
        from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

        self.config = config
        self.inv_freq = RotaryEmbedding(head_dim, rotary_percent, rotary_base=rotary_base,
                                        use_cpu_initialization=True).inv_freq

    def __call__(self, t: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Rotate ``t`` [s, b, heads, d] whose tokens sit at ``positions`` [b, s]."""
        from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb

        inv_freq = self.inv_freq.to(t.device)  # pragma: no mutate
        freqs = positions.t()[..., None].float() * inv_freq  # [s, b, rot / 2]
        freqs = torch.cat([freqs, freqs], dim=-1)[:, :, None, :]  # [s, b, 1, rot]
        return apply_rotary_pos_emb(t, freqs, config=self.config)


class SlotCacheAttention(MegatronModule):
    """softmax(QK^T)V with grouped-query support; reads and writes the KV cache when a step is set."""

    def __init__(self, config, layer_number: int, attn_mask_type=None, attention_type=None, softmax_scale=None, **_):
        super().__init__(config=config)
        self.layer_index = layer_number - 1  # Megatron numbers layers from 1
        self.softmax_scale = softmax_scale
        self.step: StepContext | None = None
        self.rotary: Rotary | None = None  # set by build_model for rotary-position models

    def forward(self, query, key, value, attention_mask=None, attn_mask_type=None, **_):
        step = self.step
        if self.rotary is not None:
            if step is not None:
                positions = step.positions
            else:
                positions = torch.arange(query.shape[0], device=query.device)  # pragma: no mutate
                positions = positions[None].expand(query.shape[1], -1)
            query, key = self.rotary(query, positions), self.rotary(key, positions)
        if step is not None:
            return self._cached(step, query[:, 0], key[:, 0], value[:, 0])[:, None]
        # Training or a plain forward: causal over the given sequence. Megatron's layout is [s, b, heads, d];
        # SDPA wants [b, heads, s, d].
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        out = self._sdpa(q, k, v, causal=True)
        b, h, s, d = out.shape
        return out.permute(2, 0, 1, 3).reshape(s, b, h * d)

    def _cached(self, step: StepContext, q, k, v):
        """Attention for the packed tokens ``q``/``k``/``v`` ([N, heads, d]) of a step; returns [N, heads * d]."""
        cache, n, layer = step.cache, step.singles, self.layer_index
        keys, values = cache.keys[layer], cache.values[layer]
        positions = step.positions[0]
        keys[step.rows, :, positions] = k  # the indexed dims come first: the target view is [N, groups, d]
        values[step.rows, :, positions] = v
        out = []
        if n:  # one token per sequence, its cache rows 0..n-1 read in place up to the longest
            key_pos = torch.arange(step.span, device=q.device)  # pragma: no mutate
            mask = (key_pos[None, :] <= positions[:n, None])[:, None, None]  # [n, 1, 1, span]
            o = self._sdpa(q[:n, :, None], keys[:n, :, : step.span], values[:n, :, : step.span], mask=mask)
            out.append(o.flatten(1))
        if len(q) > n:  # whole prompts: causal attention within each, nothing cached before them
            qp, kp, vp = q[n:], k[n:], v[n:]
            if step.prompt_index is None:
                o = self._sdpa(*(t.transpose(0, 1)[None] for t in (qp, kp, vp)), causal=True)[0].transpose(0, 1)
            else:  # [prompts, longest, heads, d], right-padded
                o = self._sdpa(*(t[step.prompt_index].transpose(1, 2) for t in (qp, kp, vp)), causal=True)
                o = o.transpose(1, 2)[step.prompt_valid]
            out.append(o.flatten(1))
        return torch.cat(out) if len(out) > 1 else out[0]

    def _sdpa(self, q, k, v, mask=None, causal=False):
        # Grouped-query attention: each K/V group serves several query heads, which SDPA maps itself
        # (``enable_gqa``) instead of a copy of K/V per query head.
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=self.softmax_scale,
                                              enable_gqa=k.shape[1] != q.shape[1])
