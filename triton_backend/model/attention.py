"""Core attention over the paged KV cache, replacing Megatron's ``DotProductAttention`` in the layer spec.

Why our own module: the stock ``DotProductAttention`` calls ``torch.cuda`` (so it cannot run on CPU) and
Megatron's ``StaticInferenceContext`` keeps one sequence offset for the whole batch, while continuous
batching needs every row at its own length. Megatron's ``SelfAttention`` still computes Q, K, V and the
output projection with its tensor-parallel layers; only the softmax(QK^T)V part and the cache live here.
A cached step is packed (``kv_cache.StepContext``): decode tokens read their blocks in place, prompt chunks
attend causally to their own sequence.

Decode tokens on CPU (float32) run a small C kernel of our own (``decode_kernel.py`` says why) that reads each
row's blocks in place; elsewhere, and as the kernel's reference, the torch path below reads the pool's blocks as
one view and gathers only the queries. On CUDA every token reads its blocks in place through torch's
FlexAttention (``flex_paged.py``, which says why it and not vLLM's, FlashInfer's or flash-attention's paged
kernels), over a group-major pool; the CPU tests run that same path eagerly.

Rotary position embeddings are applied here too (the model is built without its own rotary module): GPTModel
would rotate every row by positions 0..s-1, but each cached row continues at its own position.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule

from triton_backend.cache.kv_cache import PromptChunk, StepContext

from . import decode_kernel, flex_paged, rotary_kernel


class Rotary:
    """RoPE with Megatron's frequencies and rotation, at arbitrary per-row positions.

    A cached step computes its positions' angles once (``angles``) for every layer and for both q and k, and rotates
    with the arithmetic of Megatron's unfused ``_apply_rotary_pos_emb_bshd`` (the same operations, so the same
    bits); Megatron's own function runs where its config asks for another form (interleaved, fused, MLA). On the
    ``long`` preset's capacity run the per-layer recomputation was 8 % of a step.
    """

    def __init__(self, config, head_dim: int, rotary_percent: float, rotary_base: int,
                 rope_scaling_factor: float | None = None):
        from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

        self.config = config
        # Megatron's frequencies, Llama-3.1's scaling included (``rope_scaling_factor``, as Megatron applies it)
        scaling = {"rope_scaling": True, "rope_scaling_factor": rope_scaling_factor} if rope_scaling_factor else {}
        self.inv_freq = RotaryEmbedding(head_dim, rotary_percent, rotary_base=rotary_base,
                                        use_cpu_initialization=True, **scaling).inv_freq
        self.interleaved = bool(config.rotary_interleaved)
        self.plain = not (config.rotary_interleaved or config.apply_rope_fusion
                          or getattr(config, "multi_latent_attention", False))

    def freqs(self, positions: torch.Tensor) -> torch.Tensor:
        """Megatron's angles for ``positions`` [b, s]: [s, b, 1, rot]."""
        if self.inv_freq.device != positions.device:  # once: a copy at every step would wait for the device
            self.inv_freq = self.inv_freq.to(positions.device)  # pragma: no mutate
        inv_freq = self.inv_freq
        freqs = positions.t()[..., None].float() * inv_freq  # [s, b, rot / 2]
        if self.interleaved:  # each angle twice in a row, for channel pairs (0, 1), (2, 3), ... as Megatron lays it
            return torch.stack([freqs, freqs], dim=-1).flatten(-2)[:, :, None, :]
        return torch.cat([freqs, freqs], dim=-1)[:, :, None, :]

    def angles(self, positions: torch.Tensor):
        """What ``rotate`` needs for ``positions`` [b, s], computed once for a step's layers: (cos, sin) for the
        plain form, else Megatron's angles."""
        freqs = self.freqs(positions)
        return (torch.cos(freqs), torch.sin(freqs)) if self.plain else freqs

    def rotate(self, t: torch.Tensor, angles) -> torch.Tensor:
        """Rotate ``t`` [s, b, heads, d] by ``angles`` (from ``angles``)."""
        if not self.plain:
            from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb

            return apply_rotary_pos_emb(t, angles, config=self.config)
        cos, sin = (a.to(t.dtype) for a in angles)
        rot = cos.shape[-1]
        x, rest = t[..., :rot], t[..., rot:]
        first, second = x.chunk(2, dim=-1)
        x = x * cos + torch.cat((-second, first), dim=-1) * sin
        return torch.cat((x, rest), dim=-1) if rest.shape[-1] else x

    def __call__(self, t: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Rotate ``t`` [s, b, heads, d] whose tokens sit at ``positions`` [b, s]."""
        return self.rotate(t, self.angles(positions))

    def rotate_packed(self, x: torch.Tensor, angles) -> torch.Tensor:
        """Rotate a step's packed rows ``x`` [N, heads, d] by ``angles`` (of positions [1, N]): on CPU in C
        (``rotary_kernel.py``, the same bits), else as ``rotate``."""
        if self.plain and rotary_kernel.applies(x, angles[0]):
            return rotary_kernel.rotate(x, *angles)
        return self.rotate(x[:, None], angles)[:, 0]


class PagedAttention(MegatronModule):
    """softmax(QK^T)V with grouped-query support; reads and writes the KV cache when a step is set."""

    def __init__(self, config, layer_number: int, attn_mask_type=None, attention_type=None, softmax_scale=None, **_):
        super().__init__(config=config)
        self.layer_index = layer_number - 1  # Megatron numbers layers from 1
        self.softmax_scale = softmax_scale
        self.step: StepContext | None = None
        self.rotary: Rotary | None = None  # set by build_model for rotary-position models
        self.window: int | None = None  # sliding-window attention (set by build_model): earlier keys a token sees

    def forward(self, query, key, value, attention_mask=None, attn_mask_type=None, **_):
        if self.step is not None:
            return self.attend(self.step, query[:, 0], key[:, 0], value[:, 0])[:, None]
        # Training or a plain forward: causal over the given sequence. Megatron's layout is [s, b, heads, d];
        # SDPA wants [b, heads, s, d].
        if self.rotary is not None:
            positions = torch.arange(query.shape[0], device=query.device)  # pragma: no mutate
            positions = positions[None].expand(query.shape[1], -1)
            query, key = self.rotary(query, positions), self.rotary(key, positions)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        if self.window is None:
            out = self._sdpa(q, k, v, causal=True)
        else:
            places = torch.arange(q.shape[2], device=q.device)  # pragma: no mutate
            out = self._sdpa(q, k, v, mask=self._visible(places, places))
        b, h, s, d = out.shape
        return out.permute(2, 0, 1, 3).reshape(s, b, h * d)

    def attend(self, step: StepContext, q, k, v):
        """A cached step's attention for packed ``q`` [N, heads, d] and ``k``/``v`` [N, groups, d] (rotated here
        for rotary models); returns [N, heads * d]. ``functional.FunctionalGPT`` calls it directly."""
        if self.rotary is not None and step.rotary is None:  # the first layer's call: the step's angles
            step.rotary = self.rotary.angles(step.positions)
        q, k = self.rotate(q, k, step.positions, step.rotary)
        return self._cached(step, q, k, v)

    def rotate(self, q, k, positions, angles=None):
        """Packed ``q`` and ``k`` ([N, heads, d]) rotated to their ``positions`` ([1, N]) (``angles``: those
        positions' ``Rotary.angles``, when already made); as they are for models without rotary embeddings."""
        if self.rotary is None:
            return q, k
        angles = self.rotary.angles(positions) if angles is None else angles
        return self.rotary.rotate_packed(q, angles), self.rotary.rotate_packed(k, angles)

    def store(self, cache, blocks, offsets, k, v):
        """Write packed ``k``/``v`` ([N, groups, d]) to their ``blocks`` and ``offsets`` in this layer's part of
        ``cache``; returns that part's keys and values."""
        keys, values = cache.keys[self.layer_index], cache.values[self.layer_index]
        keys[blocks, :, offsets] = k  # indexed dims first: the target view is [N, groups, d]
        values[blocks, :, offsets] = v
        return keys, values

    def _cached(self, step: StepContext, q, k, v):
        """Attention for the packed tokens ``q``/``k``/``v`` ([N, heads, d]) of a step; returns [N, heads * d]."""
        if step.host_writes is not None and decode_kernel.stores(step.cache.keys[self.layer_index], k, v):
            keys, values = step.cache.keys[self.layer_index], step.cache.values[self.layer_index]
            decode_kernel.store(keys, values, k, v, *step.host_writes)
        else:
            keys, values = self.store(step.cache, step.write_blocks, step.write_offsets, k, v)
        if step.cache.group_major:
            return self._flex(step, q)
        if step.decode_index is not None and not step.prompts:
            return self._decode(step, q, keys, values)
        out = q.new_empty(q.shape[0], q.shape[1] * q.shape[2])
        if step.decode_index is not None:
            out[step.decode_index] = self._decode(step, q[step.decode_index], keys, values)
        for chunk in step.prompts:
            out[chunk.start:chunk.start + chunk.length] = self._prompt(chunk, q, k, v, keys, values)
        return out

    def _flex(self, step: StepContext, q):
        """The step's attention through FlexAttention over the group-major pool (``flex_paged``): the decode rows
        in one call, each prompt chunk in one, every token reading its blocks in place."""
        keys, values = step.cache.flat(self.layer_index)
        if step.decode_index is not None and not step.prompts:
            return flex_paged.decode(q, keys, values, step.flex, self.softmax_scale)
        out = q.new_empty(q.shape[0], q.shape[1] * q.shape[2])
        if step.decode_index is not None:
            out[step.decode_index] = flex_paged.decode(q[step.decode_index], keys, values, step.flex,
                                                       self.softmax_scale)
        for chunk in step.prompts:
            part = slice(chunk.start, chunk.start + chunk.length)
            out[part] = flex_paged.chunk(q[part], keys, values, chunk.flex, self.softmax_scale)
        return out

    def _prompt(self, chunk: PromptChunk, q, k, v, keys, values):
        """A prompt chunk: causal within itself, after every cached key of its sequence before it."""
        part = slice(chunk.start, chunk.start + chunk.length)
        qs = q[part].transpose(0, 1)[None]  # [1, heads, L, d]
        if chunk.blocks is None:  # from position 0: its own keys are all it reads
            ks, vs = (t[part].transpose(0, 1)[None] for t in (k, v))
            if self.window is None:
                return self._sdpa(qs, ks, vs, causal=True)[0].transpose(0, 1).flatten(1)
            places = torch.arange(chunk.length, device=q.device)  # pragma: no mutate
            return self._sdpa(qs, ks, vs, mask=self._visible(places, places))[0].transpose(0, 1).flatten(1)
        end = chunk.first + chunk.length
        ks, vs = (t[chunk.blocks].transpose(0, 1).flatten(1, 2)[None, :, :end] for t in (keys, values))
        key_pos = torch.arange(end, device=q.device)  # pragma: no mutate
        mask = self._visible(chunk.first + torch.arange(chunk.length, device=q.device), key_pos)
        return self._sdpa(qs, ks, vs, mask=mask)[0].transpose(0, 1).flatten(1)

    def _visible(self, query_pos: torch.Tensor, key_pos: torch.Tensor) -> torch.Tensor:
        """[queries, keys]: which keys each query sees (causal, and within the window when there is one)."""
        mask = key_pos[None, :] <= query_pos[:, None]
        if self.window is not None:
            mask &= key_pos[None, :] >= query_pos[:, None] - self.window
        return mask

    def _decode(self, step: StepContext, q, keys, values):
        """One token per sequence: softmax over the (row, block) pairs of ``step`` ([n, heads, d] -> [n, heads*d]).

        Scores are computed per pair ([groups, heads per group, block]) and the softmax is taken per row across
        its pairs (a running max and sum, as flash attention does across tiles), so no row's keys are ever
        copied into a contiguous sequence. Scores and sums are float32 whatever the cache's dtype.
        """
        n, h, d = q.shape
        g = keys.shape[1]
        scale = self.softmax_scale if self.softmax_scale is not None else d ** -0.5
        if step.pair_rows is None:  # planned for the CPU kernel, which reads each row's table itself
            return decode_kernel.decode(q, keys, values, step.tables, step.table_starts, step.lengths, scale)
        qg = q.view(n, g, h // g, d)
        if n == 1 and step.extra_blocks is None:
            return self._decode_one(step, qg[0], keys[: step.span], values[: step.span], scale).to(q.dtype)
        parts = []  # (pair keys, pair values, decode rows), pairs in ``step.pair_rows`` order
        if step.span:
            parts.append((keys[: step.span], values[: step.span], step.pair_rows[: step.span]))
        if step.extra_blocks is not None:
            parts.append((keys[step.extra_blocks], values[step.extra_blocks], step.pair_rows[step.span:]))
        scores = [torch.matmul(qg[rows], kp.transpose(-1, -2)) for kp, _, rows in parts]
        scores = (torch.cat(scores) if len(scores) > 1 else scores[0]).float()
        scores = torch.addcmul(step.bias, scores, scores.new_tensor(scale))  # [P, g, r, bs], -inf where unseen
        rows = step.pair_rows
        best = scores.amax(-1)  # [P, g, r]
        row_max = best.new_full((n, *best.shape[1:]), float("-inf"))
        row_max.scatter_reduce_(0, rows[:, None, None].expand_as(best), best, "amax")
        weights = torch.exp(scores - row_max[rows][..., None])
        total = best.new_zeros(row_max.shape).index_add_(0, rows, weights.sum(-1))
        out = best.new_zeros((n, g, h // g, d))
        start = 0
        for _, vp, part_rows in parts:
            w = weights[start:start + len(part_rows)].to(vp.dtype)
            out.index_add_(0, part_rows, torch.matmul(w, vp).float())
            start += len(part_rows)
        return (out / total[..., None]).to(q.dtype).reshape(n, h * d)

    @staticmethod
    def _decode_one(step: StepContext, q, keys, values, scale: float):
        """``_decode`` for a step of one decode row (batch 1), whose pairs are the pool's first ``span`` blocks: one
        softmax over all of them, so none of the per-row scatter and index work (a third of the layer's time at
        batch 1 on the demo model). ``q`` [groups, heads per group, d]; returns [1, heads * d]."""
        scores = torch.matmul(q, keys.transpose(-1, -2)).float()  # [span, g, r, bs]
        scores = torch.addcmul(step.bias, scores, scores.new_tensor(scale))
        span, g, r, bs = scores.shape
        weights = torch.softmax(scores.permute(1, 2, 0, 3).reshape(g, r, span * bs), dim=-1)
        weights = weights.view(g, r, span, bs).permute(2, 0, 1, 3).to(values.dtype)
        return torch.matmul(weights, values).sum(0, dtype=torch.float32).reshape(1, -1)

    def _sdpa(self, q, k, v, mask=None, causal=False):
        # Grouped-query attention: each K/V group serves several query heads, which SDPA maps itself
        # (``enable_gqa``) instead of a copy of K/V per query head.
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=self.softmax_scale,
                                              enable_gqa=k.shape[1] != q.shape[1])
