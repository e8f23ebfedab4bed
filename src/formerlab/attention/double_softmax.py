"""Double-softmax ("efficient") attention: softmax_features(Q) · (softmax_positions(K)ᵀ V).

Shen et al., 2021, "Efficient Attention: Attention with Linear Complexities" (WACV),
eq. (2): normalise each query over its features and each key feature over the
positions; then ``Kᵀ V`` is a D×D "global context" computed once, O(N·D²) time and
O(N·D + D²) memory. Every row of the implied attention matrix ``ρ(Q) ρ(K)ᵀ`` sums to 1.

The softmax over positions mixes all keys into every output, so there is no causal
form: ``causal=True`` raises and names the causal kernels (``linear``, ``performer``,
``causal_nystrom``, ``softmax``).
"""

from __future__ import annotations

from torch import Tensor

from formerlab.attention.base import AttentionKernel, compute_dtype
from formerlab.attention.registry import register


def double_softmax_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attention_mask: Tensor | None = None,
    need_weights: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """softmax(q, features) · (softmax(k, positions)ᵀ · v) on (B, H, N, D) -> (out, weights?).

    Padded keys are excluded from the softmax over positions. A sequence with no real key
    at all gets a uniform key softmax instead of NaN (its queries are zeroed by the kernel
    module anyway). Computed in float32 (float64 for float64 inputs).
    """
    work = compute_dtype(q.dtype)
    q, k, v = q.to(work), k.to(work), v.to(work)
    rho_q = q.softmax(dim=-1)
    logits = k
    if attention_mask is not None:
        keep = attention_mask[:, None, :, None]
        keep = keep | ~keep.any(dim=-2, keepdim=True)  # all-padded sequence: no NaN
        logits = k.masked_fill(~keep, float("-inf"))
    rho_k = logits.softmax(dim=-2)
    out = rho_q @ (rho_k.transpose(-1, -2) @ v)
    weights = rho_q @ rho_k.transpose(-1, -2) if need_weights else None
    return out, weights


@register(
    "double_softmax",
    causal=False,
    complexity="O(N·D²) time, O(N·D + D²) memory",
    description="softmax(Q over features)·(softmax(K over positions)ᵀV) (Shen et al., 2021)",
)
class DoubleSoftmaxAttention(AttentionKernel):
    """Efficient attention of Shen et al. (2021); non-causal only (see module doc)."""

    name = "double_softmax"
    supports_causal = False

    def attend(self, q, k, v, attention_mask, causal, need_weights):
        out, weights = double_softmax_attention(q, k, v, attention_mask, need_weights)
        return out, None if weights is None else weights.to(q.dtype)
