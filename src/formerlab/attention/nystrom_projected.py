"""Unpadded Nyström attention straight from the qkv projection's input.

With per-head projections q = x·W_qᵀ + b_q, k = x·W_kᵀ + b_k, v = x·W_vᵀ + b_v of the
input x (B, N, C), the segment-mean landmarks are linear in x: q̃ = s·(x̄·W_qᵀ + b_q) and
k̃ = x̄·W_kᵀ + b_k, where x̄ = S·x are the segment means of the input (m × C). Both
(N × m) score matrices of Nyström attention are then products of x with small matrices:

    q·(s·k̃)ᵀ = x·(s·W_qᵀ·k̃ᵀ) + s·b_q·k̃ᵀ,        k·q̃ᵀ = x·(W_kᵀ·q̃ᵀ) + b_k·q̃ᵀ

so one GEMM x·[s·W_qᵀk̃ᵀ | W_kᵀq̃ᵀ | W_vᵀ] (per sequence, C × (2·H·m + H·D)) gives both
scores and v, and q and k are never formed. For m = D that GEMM has the size of the qkv
projection it replaces, and six of the twelve (N × m)·(m × D) products of
:mod:`~formerlab.attention.nystrom_product` are gone: the two score products, dq and dk,
and the two landmark gradients through q and k (their work is now inside the GEMM's own
backward and a few (C × m) products). It is the same function of x and the weights, in
another association order, so the results agree to rounding.

Speed (``formerlab bench nystrom``, N = 8192, C = 256, H = 4, m = D = 64) is in the
README's Threads section.
"""

from __future__ import annotations

import torch
from torch import Tensor

from formerlab.attention.conv_skip import depthwise_conv_seq
from formerlab.attention.nystrom_product import (
    Inverse,
    conv_skip_backward,
    conv_skip_forward,
    landmark_keys_backward,
    landmark_keys_forward,
    landmark_queries_backward,
    landmark_queries_forward,
)
from formerlab.attention.recompute import grads_by_recompute
from formerlab.linalg.numerics import autocast_off
from formerlab.linalg.segments import segment_layout, segment_means


def split_scores(P: Tensor, heads: int, num_landmarks: int) -> tuple[Tensor, Tensor, Tensor]:
    """(B, N, 2·H·m + H·D) -> the per-head views of F's scores, Rᵀ's scores (B, H, N, m)
    and v (B, H, N, D)."""
    hm = heads * num_landmarks
    parts = P[..., :hm], P[..., hm:2 * hm], P[..., 2 * hm:]
    return tuple(t.unflatten(-1, (heads, -1)).transpose(1, 2) for t in parts)


def _reference(P: Tensor, Z: Tensor, conv_weight: Tensor | None, heads: int, m: int) -> Tensor:
    """The same product with plain autograd ops (used for double backward)."""
    SF, SR, v = split_scores(P, heads, m)
    out = SF.softmax(dim=-1) @ (Z @ (SR.softmax(dim=-2).mT @ v))
    return out if conv_weight is None else out + depthwise_conv_seq(v, conv_weight)


class NystromScoresProduct(torch.autograd.Function):
    """out = softmax(SF)·(Z·(softmax_N(SR)ᵀ·v)) + conv(v) for the scores and values packed
    in P (:func:`split_scores`): ``apply(P, Z, conv_weight, heads, num_landmarks)``. The
    backward writes d(SF), d(SR) and dv into one buffer of P's layout, which the
    projection's backward takes as it is, and returns dZ for the inverse's own graph."""

    @staticmethod
    def forward(ctx, P, Z, conv_weight, heads: int, num_landmarks: int):
        with autocast_off(P.device):
            ctx.heads, ctx.m = heads, num_landmarks
            SF, SR, v_view = split_scores(P, heads, num_landmarks)
            # v feeds two GEMMs per block: contiguous (one copy) is cheaper than strided
            v = v_view.contiguous()
            E, factors, RV = landmark_keys_forward(lambda rows: SR[..., rows, :], v, False)
            Y = Z.detach() @ RV
            x_skip, w_skip, skip = conv_skip_forward(v, conv_weight)
            F, out = landmark_queries_forward(
                lambda rows: SF[..., rows, :].softmax(dim=-1), v.shape[-2], Y, skip
            )
            ctx.num_blocks = len(F)
            ctx.save_for_backward(P, Z, conv_weight, v, x_skip, w_skip, RV, Y, *F, *E, *factors)
            return out

    @staticmethod
    def backward(ctx, grad):
        P, Z, conv_weight, v, x_skip, w_skip, RV, Y, *blocks = ctx.saved_tensors
        F, E, factors = (blocks[i * ctx.num_blocks:(i + 1) * ctx.num_blocks] for i in range(3))
        needs = ctx.needs_input_grad[:3]
        if torch.is_grad_enabled():  # create_graph: differentiate plain ops instead
            def reference(P, Z, conv_weight=None):
                return _reference(P, Z, conv_weight, ctx.heads, ctx.m)

            inputs = (P, Z) if conv_weight is None else (P, Z, conv_weight)
            grads = grads_by_recompute(reference, inputs, needs[:len(inputs)], grad)
            return (*grads, *([None] * (5 - len(grads))))
        grad = grad.to(v.dtype)
        dv_skip = dw = None
        if conv_weight is not None:
            dv_skip, dw = conv_skip_backward(grad, x_skip, w_skip, ctx.heads, needs[2])
        dP = torch.empty_like(P)
        dSF, dSR, dv = split_scores(dP, ctx.heads, ctx.m)

        def queries_scores_grad(rows: slice, dS: Tensor) -> None:
            dSF[..., rows, :].copy_(dS)

        dY = landmark_queries_backward(grad, F, Y, queries_scores_grad)
        dZ = dY @ RV.mT
        dRV = Z.mT @ dY
        landmark_keys_backward(
            v, E, factors, RV, dRV, dv, dv_skip, scores_out=lambda rows: dSR[..., rows, :]
        )
        return dP, dZ, dw, None, None


def _landmarks(
    x_land: Tensor, weight: Tensor, bias: Tensor | None, heads: int, scale: float
) -> tuple[Tensor, Tensor]:
    """q̃ = s·(x̄·W_qᵀ + b_q), k̃ = x̄·W_kᵀ + b_k, each (B, H, m, D)."""
    w_q, w_k = weight.unflatten(0, (3, heads, -1))[:2]  # (H, D, C) each
    q_land = torch.einsum("bjc,hdc->bhjd", x_land, w_q)
    k_land = torch.einsum("bjc,hdc->bhjd", x_land, w_k)
    if bias is not None:
        b_q, b_k = bias.unflatten(0, (3, heads, -1))[:2, :, None, :]
        q_land, k_land = q_land + b_q, k_land + b_k
    return q_land * scale, k_land


def _scores_weight(
    q_land: Tensor, k_land_s: Tensor, weight: Tensor, bias: Tensor | None, heads: int
) -> tuple[Tensor, Tensor | None]:
    """The (B, C, 2·H·m + H·D) matrix with x·it = [F's scores | Rᵀ's scores | v] and its
    (B, 1, ·) bias row (None without a projection bias)."""
    b = q_land.shape[0]
    w_q, w_k, w_v = weight.unflatten(0, (3, heads, -1))  # (H, D, C) each
    to_F = torch.einsum("hdc,bhjd->bchj", w_q, k_land_s).flatten(2)  # (B, C, H·m)
    to_R = torch.einsum("hdc,bhjd->bchj", w_k, q_land).flatten(2)
    to_v = w_v.flatten(0, 1).mT.expand(b, -1, -1)
    full = torch.cat((to_F, to_R, to_v), dim=-1)
    if bias is None:
        return full, None
    b_q, b_k, b_v = bias.unflatten(0, (3, heads, -1))  # (H, D) each
    row = torch.cat((
        torch.einsum("hd,bhjd->bhj", b_q, k_land_s).flatten(1),
        torch.einsum("hd,bhjd->bhj", b_k, q_land).flatten(1),
        b_v.flatten().expand(b, -1),
    ), dim=-1)
    return full, row[:, None, :]


def nystrom_projected(
    x: Tensor, weight: Tensor, bias: Tensor | None, heads: int, num_landmarks: int,
    inverse: Inverse, scale: float, conv_weight: Tensor | None = None,
) -> Tensor:
    """Nyström attention of the projections of x, F·inv(W)·R·v (+ conv(v)), computed from x
    and the projection's weights without forming q and k (module docs).

    Args:
        x: (B, N, C) input, N > num_landmarks, no padding.
        weight: (3·H·D, C) qkv projection weight, rows [W_q; W_k; W_v], heads outer.
        bias: (3·H·D,) its bias, or None.
        heads: H.
        num_landmarks: m, the number of segment means (need not divide N).
        inverse: differentiable W (B, H, m, m) -> Z (B, H, m, m).
        scale: the logit scale s.
        conv_weight: (H, K) per-head filters of the convolution skip on v, or None.

    Returns:
        out (B, H, N, D), a view of (B, N, H, D) memory (merging the heads is a view).
    """
    b, n, c = x.shape
    if n <= num_landmarks:
        raise ValueError(
            f"nystrom_projected needs N > num_landmarks; got N={n}, num_landmarks={num_landmarks}"
        )
    if weight.dim() != 2 or weight.shape[1] != c or weight.shape[0] % (3 * heads):
        raise ValueError(
            f"weight has shape {tuple(weight.shape)}; expected (3·heads·D, {c}) with heads={heads}"
        )
    layout = segment_layout(n, num_landmarks, None, b, x.device)
    x_land = segment_means(x, layout=layout)[0]  # (B, m, C)
    q_land, k_land = _landmarks(x_land, weight, bias, heads, scale)
    Z = inverse((q_land @ k_land.mT).softmax(dim=-1))
    full, row = _scores_weight(q_land, k_land * scale, weight, bias, heads)
    P = torch.matmul(x, full) if row is None else torch.baddbmm(row, x, full)
    return NystromScoresProduct.apply(P, Z, conv_weight, heads, num_landmarks)


__all__ = ["NystromScoresProduct", "nystrom_projected", "split_scores"]
