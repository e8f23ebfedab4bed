"""Exact softmax attention: the ground truth every approximation is measured against."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from formerlab.attention.base import (
    AttentionKernel,
    allowed_keys,
    check_kernel_options,
    compute_dtype,
    zero_padded_queries,
)
from formerlab.attention.registry import register
from formerlab.attention.streaming import (
    GROW_CHUNK,
    Tail,
    check_step,
    claim,
    state_dims,
    tail_field,
)


def softmax_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attention_mask: Tensor | None = None,
    causal: bool = False,
    need_weights: bool = False,
    scale: float | None = None,
) -> tuple[Tensor, Tensor | None]:
    """softmax(q kᵀ · scale) v on (B, H, N, D); returns ``(out, weights or None)``.

    Without ``need_weights`` this is one fused ``F.scaled_dot_product_attention`` call
    (memory O(N) with a fused backend); with it the (B, H, N, N) matrix is formed in
    float32 (float64 for float64 inputs). Padded queries are not zeroed here; the kernel
    module does that.
    """
    n = q.shape[-2]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    mask = allowed_keys(attention_mask, causal, n, q.device)
    if not need_weights:
        if mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
        return out, None
    work = compute_dtype(q.dtype)
    scores = torch.einsum("bhid,bhjd->bhij", q.to(work), k.to(work)) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = scores.softmax(dim=-1)
    out = torch.einsum("bhij,bhjd->bhid", weights, v.to(work)).to(q.dtype)
    return out, weights.to(q.dtype)


@dataclass
class KVCache:
    """Streaming state of ``softmax``: the keys and values seen so far.

    ``keys`` (B, H, capacity, D) and ``values`` (B, H, capacity, E) in the compute dtype;
    the first ``length`` positions are this state's. ``real`` (B, 1, capacity), bool:
    which of them are real tokens, once a step has been given an ``attention_mask``
    (None: all are); padded keys get no weight. Capacity grows in preallocated chunks
    (geometrically), so a token costs amortised O(1) copies, not a ``torch.cat`` of the
    whole cache. A value: ``step`` returns a new cache and never changes this one; caches
    stepped from one state share the buffers until they diverge, then copy
    (:func:`formerlab.attention.streaming.claim`).
    """

    keys: Tensor
    values: Tensor
    length: int = 0
    tail: Tail = tail_field()
    real: Tensor | None = None


def _cache_dims(state: KVCache) -> tuple[int, int, int, int]:
    return (*state.keys.shape[:2], state.keys.shape[-1], state.values.shape[-1])


@register(
    "softmax",
    causal=True,
    complexity="O(N²·D) time, O(N) memory (fused SDPA)",
    description="exact softmax attention via F.scaled_dot_product_attention",
)
class SoftmaxAttention(AttentionKernel):
    """Exact scaled dot-product attention (through ``F.scaled_dot_product_attention``).

    Streams with a :class:`KVCache` (``init_state`` / ``step``): each step attends its
    new queries to every cached key, O(t·D) per token at position t.
    """

    name = "softmax"
    supports_causal = True
    supports_streaming = True
    packed_modes = ("causal", "bidirectional")

    def __init__(self, scale: float | None = None) -> None:
        check_kernel_options("softmax", nullable=("scale",), scale=scale)
        super().__init__()
        self.scale = scale

    def attend(self, q, k, v, attention_mask, causal, need_weights):
        return softmax_attention(q, k, v, attention_mask, causal, need_weights, self.scale)

    def init_state(self, batch, heads, head_dim, *, dtype=torch.float32, device=None,
                   value_dim=None) -> KVCache:
        """An empty :class:`KVCache` (capacity one chunk) for inputs of ``dtype``."""
        b, h, d, e, work = state_dims(batch, heads, head_dim, value_dim, dtype)
        keys = torch.zeros(b, h, GROW_CHUNK, d, dtype=work, device=device)
        return KVCache(keys, torch.zeros(b, h, GROW_CHUNK, e, dtype=work, device=device))

    def step(
        self, q: Tensor, k: Tensor, v: Tensor, state: KVCache,
        attention_mask: Tensor | None = None,
    ) -> tuple[Tensor, KVCache]:
        """A new cache with k, v (B, H, T, ·) appended (``state`` is left as it was); new
        queries see every real key up to their own. ``attention_mask`` (B, T), True = real:
        padded keys are kept but never seen, padded queries give 0 (the parallel call with
        the same mask, :mod:`formerlab.attention.streaming`)."""
        check_step(self.name, q, k, v, state, KVCache, _cache_dims, attention_mask)
        work = state.keys.dtype
        t, start = q.shape[2], state.length
        total = start + t
        buffers = (state.keys, state.values)
        masked = attention_mask is not None or state.real is not None
        if masked:
            buffers += (_real_buffer(state),)
        buffers, tail = claim(buffers, state.tail, start, total)
        keys, values = buffers[0], buffers[1]
        keys[:, :, start:total] = k.to(work)
        values[:, :, start:total] = v.to(work)
        # query i (position start + i) sees keys j <= start + i
        pos = torch.arange(total, device=q.device)
        mask = pos[None, :] <= (start + torch.arange(t, device=q.device))[:, None]
        real = None
        if masked:
            real = buffers[2]
            real[:, 0, start:total] = True if attention_mask is None else attention_mask
            mask = mask & real[:, :, None, :total]  # (B, 1, T, total)
            # a padded query of a row without any real key yet would see nothing (a NaN
            # softmax): it sees every key instead, and its output is zeroed below
            mask = mask | ~mask.any(dim=-1, keepdim=True)
        scale = 1.0 / math.sqrt(q.shape[-1]) if self.scale is None else self.scale
        out = F.scaled_dot_product_attention(
            q.to(work), keys[:, :, :total], values[:, :, :total], attn_mask=mask, scale=scale
        )
        out = zero_padded_queries(out, attention_mask)
        return out.to(q.dtype), KVCache(keys, values, total, tail, real)


def _real_buffer(state: KVCache) -> Tensor:
    """The cache's (B, 1, capacity) real-token flags; for a cache that never saw a mask, a
    new buffer marking its ``length`` positions real (it joins the cache's buffers)."""
    if state.real is not None:
        return state.real
    b, _, capacity, _ = state.keys.shape
    real = torch.zeros(b, 1, capacity, dtype=torch.bool, device=state.keys.device)
    real[:, :, : state.length] = True
    return real
