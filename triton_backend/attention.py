"""Core attention over a slot KV cache, replacing Megatron's ``DotProductAttention`` in the layer spec.

Why our own module: the stock ``DotProductAttention`` calls ``torch.cuda`` (so it cannot run on CPU) and
Megatron's ``StaticInferenceContext`` keeps one sequence offset for the whole batch, while continuous
batching needs every row at its own length. Megatron's ``SelfAttention`` still computes Q, K, V and the
output projection with its tensor-parallel layers; only the softmax(QK^T)V part and the cache live here.

Rotary position embeddings are applied here too (the model is built without its own rotary module): GPTModel
would rotate every row by positions 0..s-1, but each cached row continues at its own position.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule


@dataclasses.dataclass
class StepContext:
    """Where the rows of one forward pass live in the cache.

    ``slots[b]`` is the cache row of batch row ``b``; ``positions[b, s]`` the absolute position of query
    token ``s`` of that row (right-padded rows repeat harmless positions past their end).
    """

    cache: KVCache
    slots: torch.Tensor  # [b] int64
    positions: torch.Tensor  # [b, s] int64


class KVCache:
    """Keys and values of every layer for ``max_slots`` sequences of up to ``max_len`` tokens."""

    def __init__(self, num_layers: int, max_slots: int, max_len: int, groups: int, head_dim: int, dtype, device):
        shape = (max_slots, groups, max_len, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.max_slots, self.max_len = max_slots, max_len

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    def store_and_read(self, layer: int, step: StepContext, key: torch.Tensor, value: torch.Tensor):
        """Write this step's ``key``/``value`` ([b, g, s, d]) and return the keys/values the queries see."""
        rows = step.slots[:, None]
        # Advanced indexing puts the indexed dims first: the target view is [b, s, g, d].
        self.keys[layer][rows, :, step.positions] = key.transpose(1, 2)
        self.values[layer][rows, :, step.positions] = value.transpose(1, 2)
        span = int(step.positions.max()) + 1
        return self.keys[layer][step.slots, :, :span], self.values[layer][step.slots, :, :span]


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

        freqs = positions.t()[..., None].float() * self.inv_freq.to(t.device)  # [s, b, rot / 2]
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
        if self.rotary is not None:
            if self.step is not None:
                positions = self.step.positions
            else:
                positions = torch.arange(query.shape[0], device=query.device)[None].expand(query.shape[1], -1)
            query, key = self.rotary(query, positions), self.rotary(key, positions)
        # Megatron's layout is [s, b, heads, d]; SDPA wants [b, heads, s, d].
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        if self.step is None:  # training or a plain forward: causal over the given sequence
            mask, causal = None, True
        else:
            k, v = self.step.cache.store_and_read(self.layer_index, self.step, k, v)
            key_pos = torch.arange(k.shape[2], device=k.device)
            mask = (key_pos[None, None, :] <= self.step.positions[:, :, None])[:, None]  # [b, 1, s, span]
            causal = False
        if k.shape[1] != q.shape[1]:  # grouped-query attention: each K/V group serves several query heads
            repeat = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=self.softmax_scale)
        b, h, s, d = out.shape
        return out.permute(2, 0, 1, 3).reshape(s, b, h * d)
