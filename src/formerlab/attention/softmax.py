"""Exact softmax attention: the ground truth every approximation is measured against."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from formerlab.attention.base import (
    AttentionKernel,
    allowed_keys,
    check_kernel_options,
    compute_dtype,
)
from formerlab.attention.registry import register


def softmax_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    key_padding_mask: Tensor | None = None,
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
    mask = allowed_keys(key_padding_mask, causal, n, q.device)
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


class SoftmaxAttention(AttentionKernel):
    """Exact scaled dot-product attention (through ``F.scaled_dot_product_attention``)."""

    name = "softmax"
    supports_causal = True

    def __init__(self, scale: float | None = None) -> None:
        check_kernel_options("softmax", nullable=("scale",), scale=scale)
        super().__init__()
        self.scale = scale

    def attend(self, q, k, v, key_padding_mask, causal, need_weights):
        return softmax_attention(q, k, v, key_padding_mask, causal, need_weights, self.scale)


@register(
    "softmax",
    causal=True,
    complexity="O(N²·D) time, O(N) memory (fused SDPA)",
    description="exact softmax attention via F.scaled_dot_product_attention",
)
def _build_softmax(scale: float | None = None) -> SoftmaxAttention:
    return SoftmaxAttention(scale=scale)
