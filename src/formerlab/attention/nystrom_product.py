"""Nyström attention without padding as one autograd function with a hand-written backward.

For per-head queries, keys and values q, k, v (B, H, N, D), m segment-mean landmarks
q̃ = s·S q and k̃ = S k (S the (m × N) segment-mean matrix, s the logit scale) and an
inverse Z = inv(W) of W = softmax(q̃ k̃ᵀ), it computes

    F = softmax(q (s·k̃)ᵀ)        (N × m, rows over the landmarks)
    Rᵀ = softmax_N(k q̃ᵀ)          (N × m: R kept transposed, columns over the keys)
    out = F · (Z · (Rᵀ)ᵀ v)       (N × D)

``inv`` is any differentiable map (the kernel's pseudoinverse with its diagnostics, or a
regularised inverse); it runs on the small (m × m) problem with ordinary autograd, inside
this function. Why one function (measured with ``formerlab bench nystrom``, N = 8192):

* R kept transposed makes every one of the 12 large products of forward and backward an
  (N × m)·(m × D) or (m × N)·(N × D) GEMM, the shapes BLAS runs fastest here;
* no autograd bookkeeping for the O(N·m·D) part: the softmax derivatives run in place, and
  the landmark gradients are added to dq and dk in place (Sᵀ is a broadcast), instead of
  materialising Sᵀ·dq̃ and summing the pieces;
* F's forward and both sides' backward run over blocks of :data:`BLOCK_ROWS` rows, so a
  block's (rows × m) scores are still in cache for the softmax (or its derivative) and the
  next GEMM; the softmax over N in the backward needs Σₙ Rᵀ ⊙ d(Rᵀ) per landmark, which is
  (RV ⊙ dRV) summed over D, so no block waits for the others.

Double backward (e.g. a Jacobian regulariser through a DEQ body) recomputes the forward
with plain autograd ops from the saved inputs, so higher derivatives stay exact. The
gradient is checked by ``gradcheck`` in float64 and against the general code path of
:class:`~formerlab.attention.nystrom.NystromAttention` (``tests/attention/test_nystrom_product.py``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from formerlab.attention.landmark import landmark_factors
from formerlab.attention.recompute import grads_by_recompute
from formerlab.linalg.segments import SegmentLayout, segment_layout, segment_means

Inverse = Callable[[Tensor], Tensor]


def _softmax_backward_rows(grad: Tensor, prob: Tensor) -> Tensor:
    """prob ⊙ (grad − Σ_last grad ⊙ prob), the derivative of a softmax over the last dim
    (ATen's fused kernel)."""
    return torch._softmax_backward_data(grad, prob, -1, prob.dtype)


def _softmax_over_keys_(scores: Tensor) -> Tensor:
    """Softmax over dim −2, in place on fresh scores: 4.4 against 5.5 ms for ATen's
    strided kernel at (4, 8192, 64), 1 thread."""
    scores.sub_(scores.amax(dim=-2, keepdim=True)).exp_()
    return scores.div_(scores.sum(dim=-2, keepdim=True))


#: rows per block: each block's (rows × m) scores stay in cache between their GEMMs and
#: the softmax or its derivative (the F-side backward measured 16 % faster than whole
#: sequences at N = 8192 with 1024 rows, 1 thread, and 21 % at 2 threads; 512 and 2048
#: no better)
BLOCK_ROWS = 1024


def _blocks(n: int) -> list[slice]:
    return [slice(s, min(s + BLOCK_ROWS, n)) for s in range(0, n, BLOCK_ROWS)]


def _landmark_queries_forward(q, k_land_s, Y):
    """F = softmax(q·k̃ₛᵀ) (B, H, N, m) and out = F·Y, block by block over the rows."""
    F = q.new_empty(*q.shape[:-1], k_land_s.shape[-2])
    out = q.new_empty(*q.shape[:-1], Y.shape[-1])
    for rows in _blocks(q.shape[-2]):
        F_b = (q[..., rows, :] @ k_land_s.mT).softmax(dim=-1)
        F[..., rows, :] = F_b
        out[..., rows, :] = F_b @ Y
    return F, out


def _landmark_queries_backward(grad, q, F, Y, k_land_s):
    """out = F·Y with F = softmax(q·k̃ₛᵀ), block by block over the rows: dq, d(k̃ₛ) and
    dY."""
    dq = torch.empty_like(q)
    dk_land = torch.zeros_like(k_land_s)
    dY = torch.zeros_like(Y)
    for rows in _blocks(q.shape[-2]):
        g, F_b = grad[..., rows, :], F[..., rows, :]
        dY.add_(F_b.mT @ g)
        dS = _softmax_backward_rows(g @ Y.mT, F_b)  # d(scores of F) for these rows
        dq[..., rows, :] = dS @ k_land_s
        dk_land.add_(dS.mT @ q[..., rows, :])
    return dq, dk_land, dY


def _landmark_keys_backward(k, v, Rt, RV, dRV, q_land):
    """RV = Rᵀᵀ·v with Rᵀ = softmax_N(k·q̃ᵀ), block by block over the rows: dk, dv, dq̃.

    The softmax over N needs Σₙ Rᵀ ⊙ d(Rᵀ) per landmark over all rows; with d(Rᵀ) = v·dRVᵀ
    that is (RV ⊙ dRV) summed over D, known before the first block.
    """
    dot = (RV * dRV).sum(dim=-1).unsqueeze(-2)  # (B, H, 1, m)
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    dq_land = torch.zeros_like(q_land)
    for rows in _blocks(k.shape[-2]):
        Rt_b = Rt[..., rows, :]
        dS = (v[..., rows, :] @ dRV.mT).sub_(dot).mul_(Rt_b)  # d(scores of Rᵀ)
        dv[..., rows, :] = Rt_b @ dRV
        dk[..., rows, :] = dS @ q_land
        dq_land.add_(dS.mT @ k[..., rows, :])
    return dk, dv, dq_land


def _add_spread_(dx: Tensor, d_land: Tensor, layout: SegmentLayout) -> Tensor:
    """In place: dx += Sᵀ·d_land, each landmark's gradient spread over its segment
    (1/count per token). Unpadded layout: segments are the same for every sequence."""
    b, h, n, d = dx.shape
    m = layout.num_segments
    if n % m == 0:
        dx.view(b, h, m, n // m, d).add_(d_land.unsqueeze(-2), alpha=m / n)
        return dx
    per_token = d_land / layout.counts[0].to(d_land.dtype)[:, None]
    return dx.add_(per_token.index_select(-2, layout.ids[0]))


def _landmarks(q: Tensor, k: Tensor, layout: SegmentLayout, scale: float) -> tuple[Tensor, Tensor]:
    return segment_means(q, layout=layout)[0] * scale, segment_means(k, layout=layout)[0]


def _reference(q, k, v, inverse: Inverse, layout: SegmentLayout, scale: float) -> Tensor:
    """The same product through the general path's factors, with plain autograd ops
    (used for double backward)."""
    fac = landmark_factors(q, k, v, None, layout.num_segments, scale)
    return fac.F @ (inverse(fac.W()) @ (fac.R @ fac.v))


class NystromProduct(torch.autograd.Function):
    """See the module docs; ``apply(q, k, v, inverse, layout, scale)``."""

    @staticmethod
    def forward(ctx, q, k, v, inverse: Inverse, layout: SegmentLayout, scale: float):
        # in the inputs' dtype (the compute dtype) under autocast too: the hand-written
        # backward runs without autocast and needs the dtypes the forward used
        with torch.autocast(device_type=q.device.type, enabled=False):
            return NystromProduct._forward(ctx, q, k, v, inverse, layout, scale)

    @staticmethod
    def _forward(ctx, q, k, v, inverse: Inverse, layout: SegmentLayout, scale: float):
        ctx.inverse, ctx.layout, ctx.scale = inverse, layout, scale
        q_land, k_land = _landmarks(q, k, layout, scale)
        needs_grad = any(ctx.needs_input_grad[:3])
        with torch.enable_grad():  # the small graph W -> Z, differentiated in backward
            q_leaf = q_land.detach().requires_grad_(needs_grad)
            k_leaf = k_land.detach().requires_grad_(needs_grad)
            Z = inverse((q_leaf @ k_leaf.mT).softmax(dim=-1))
        k_land_s = k_land * scale
        Rt = _softmax_over_keys_(k @ q_land.mT)  # (B, H, N, m): R transposed
        RV = Rt.mT @ v  # (B, H, m, D)
        Y = Z.detach() @ RV
        F, out = _landmark_queries_forward(q, k_land_s, Y)
        ctx.save_for_backward(q, k, v, q_land, k_land_s, F, Rt, RV, Y)
        ctx.small = (q_leaf, k_leaf, Z)  # m × m pieces with their graph
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, q_land, k_land_s, F, Rt, RV, Y = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: differentiate plain ops instead
            def reference(q, k, v):
                return _reference(q, k, v, ctx.inverse, ctx.layout, ctx.scale)

            grads = grads_by_recompute(reference, (q, k, v), ctx.needs_input_grad[:3], grad)
            return (*grads, None, None, None)
        q_leaf, k_leaf, Z = ctx.small
        grad = grad.to(F.dtype)  # (strided from the head merge: measured no slower)
        dq, dk_land, dY = _landmark_queries_backward(grad, q, F, Y, k_land_s)
        dk_land.mul_(ctx.scale)
        dZ = dY @ RV.mT
        dRV = Z.detach().mT @ dY
        dk, dv, dq_land = _landmark_keys_backward(k, v, Rt, RV, dRV, q_land)
        if Z.requires_grad:
            # retained: a caller may run this backward again (retain_graph=True)
            dq_w, dk_w = torch.autograd.grad(
                Z, (q_leaf, k_leaf), dZ, retain_graph=True, allow_unused=True
            )
            dq_land = dq_land if dq_w is None else dq_land.add_(dq_w)
            dk_land = dk_land if dk_w is None else dk_land.add_(dk_w)
        _add_spread_(dq, dq_land.mul_(ctx.scale), ctx.layout)
        _add_spread_(dk, dk_land, ctx.layout)
        return dq, dk, dv, None, None, None


def nystrom_product(
    q: Tensor, k: Tensor, v: Tensor, num_landmarks: int, inverse: Inverse, scale: float
) -> Tensor:
    """Unpadded Nyström attention F · inv(W) · R · v (module docs), one dtype throughout.

    Args:
        q, k, v: (B, H, N, D) queries (unscaled), keys and values, N > num_landmarks.
        num_landmarks: m, the number of segment means (need not divide N).
        inverse: differentiable W (B, H, m, m) -> Z (B, H, m, m).
        scale: the logit scale s.
    """
    b, _, n, _ = q.shape
    if n <= num_landmarks:
        raise ValueError(
            f"nystrom_product needs N > num_landmarks; got N={n}, num_landmarks={num_landmarks}"
        )
    layout = segment_layout(n, num_landmarks, None, b, q.device)
    # each of q, k, v feeds two GEMMs; a strided one (a view of the projections) cost
    # ~2.5 ms more per GEMM at N = 8192 than the 1.8 ms of one copy
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    return NystromProduct.apply(q, k, v, inverse, layout, scale)


__all__ = ["NystromProduct", "nystrom_product"]
