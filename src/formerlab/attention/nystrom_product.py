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
* forward and backward run over blocks of :data:`BLOCK_ROWS` rows, so a block's
  (rows × m) scores are still in cache for the softmax (or its derivative) and the next
  GEMM. Rᵀ's softmax over N runs online (a running maximum per landmark, its blocks kept
  unnormalised with one factor per block and landmark); its derivative needs
  Σₙ Rᵀ ⊙ d(Rᵀ) per landmark, which is (RV ⊙ dRV) summed over D, so no block waits for
  the others;
* GEMM results go straight into the blocks of their outputs (``out=``); out is a view of
  (B, N, H, D) memory (merging the heads is a view) and, when q, k, v are views of one
  fused projection, dq, dk, dv are written as views of one buffer of that layout, which
  the projection's backward then takes without a copy (:mod:`formerlab.attention.packed_qkv`);
* the optional convolution skip (``conv_weight``) is fused: its output is added to each
  output block and its dv to each dv block while the block is in cache, instead of a sum
  tensor of its own and an add over the strided dv.

The block loops (``landmark_*_forward`` / ``landmark_*_backward``) take the score blocks
and their gradients through small callables, so
:mod:`~formerlab.attention.nystrom_projected` (scores straight from the projection's
input) runs the same loops.

Double backward (e.g. a Jacobian regulariser through a DEQ body) recomputes the forward
with plain autograd ops from the saved inputs, so higher derivatives stay exact. The
gradient is checked by ``gradcheck`` in float64 and against the general code path of
:class:`~formerlab.attention.nystrom.NystromAttention` (``tests/attention/test_nystrom_product.py``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from formerlab.attention.conv_skip import (
    channel_filters,
    depthwise_conv_seq,
    sequence_conv,
    sequence_conv_grads,
    to_channels,
    to_heads,
)
from formerlab.attention.landmark import landmark_factors
from formerlab.attention.packed_qkv import empty_grads, packed_buffer
from formerlab.attention.recompute import grads_by_recompute
from formerlab.linalg.numerics import autocast_off
from formerlab.linalg.segments import SegmentLayout, segment_layout, segment_means

Inverse = Callable[[Tensor], Tensor]
#: a row block's (B, H, rows, m) scores, given the rows
Scores = Callable[[slice], Tensor]
#: takes a row block's score gradient (B, H, rows, m) while it is in cache
ScoresGrad = Callable[[slice, Tensor], None]


def _softmax_backward_rows(grad: Tensor, prob: Tensor) -> Tensor:
    """prob ⊙ (grad − Σ_last grad ⊙ prob), the derivative of a softmax over the last dim
    (ATen's fused kernel)."""
    return torch._softmax_backward_data(grad, prob, -1, prob.dtype)


#: rows per block: each block's (rows × m) scores stay in cache between their GEMMs and
#: the softmax or its derivative (the F-side backward measured 16 % faster than whole
#: sequences at N = 8192 with 1024 rows, 1 thread, and 21 % at 2 threads; 512 and 2048
#: no better)
BLOCK_ROWS = 1024


def _blocks(n: int) -> list[slice]:
    return [slice(s, min(s + BLOCK_ROWS, n)) for s in range(0, n, BLOCK_ROWS)]


def landmark_queries_forward(probs: Scores, n: int, Y: Tensor, skip: Tensor | None):
    """F = softmax(q·k̃ₛᵀ) as a list of row blocks (B, H, rows, m), ``probs(rows)`` giving
    a block, and out = F·Y + skip, a (B, H, N, D) view of (B, N, H, D) memory (merging the
    heads is then a view). skip, optional, is a fresh tensor of that layout and is
    overwritten with the sum. The blocks are kept apart: writing them into one
    (B, H, N, m) tensor is a copy each."""
    b, h, _, d = Y.shape
    F = []
    # the skip's own memory (fresh, of the same layout) takes the sum: one buffer fewer
    out = Y.new_empty(b, n, h, d).transpose(1, 2) if skip is None else skip
    for rows in _blocks(n):
        F.append(probs(rows))
        if skip is None:
            torch.matmul(F[-1], Y, out=out[..., rows, :])  # straight into out's rows
        else:
            out[..., rows, :].add_(F[-1] @ Y)
    return F, out


def landmark_queries_backward(grad: Tensor, F, Y: Tensor, scores_grad: ScoresGrad) -> Tensor:
    """out = F·Y with F = softmax(scores), block by block over the rows: dY, and each
    block's d(scores) handed to ``scores_grad(rows, dS)`` while it is in cache."""
    dY = torch.zeros_like(Y)
    for rows, F_b in zip(_blocks(grad.shape[-2]), F):
        g = grad[..., rows, :]
        dY.add_(F_b.mT @ g)
        scores_grad(rows, _softmax_backward_rows(g @ Y.mT, F_b))
    return dY


def landmark_keys_forward(scores: Scores, v: Tensor, fresh: bool):
    """Rᵀ = softmax_N(k·q̃ᵀ) and RV = Rᵀᵀ·v, ``scores(rows)`` giving a block's k·q̃ᵀ (its
    own memory, overwritten, if ``fresh``; else a view, left as it is), block by block
    with a running maximum per landmark (the online softmax of FlashAttention, Dao et al.,
    2022): a block's exponentials E_b = exp(S_b − M_b), M_b the maximum so far, are formed
    while the block is in cache and kept unnormalised, so the (N × m) scores are written
    once instead of passing over them five times. Returns the blocks E_b, their column factors
    c_b = exp(M_b − M) / Σₙ exp(Sₙ − M) (Rᵀ's rows of block b are E_b ⊙ c_b) and RV."""
    E, shifts = [], []
    col_max = total = RV = None
    for rows in _blocks(v.shape[-2]):
        S = scores(rows)  # (B, H, rows, m)
        block_max = S.amax(dim=-2, keepdim=True)
        if col_max is not None:
            new_max = torch.maximum(col_max, block_max)
            rescale = (col_max - new_max).exp_()  # ≤ 1: earlier sums to the new maximum
            total.mul_(rescale)
            RV.mul_(rescale.mT)
            col_max = new_max
        else:
            col_max = block_max
        E_b = (S.sub_(col_max) if fresh else S - col_max).exp_()
        block_sum, block_RV = E_b.sum(dim=-2, keepdim=True), E_b.mT @ v[..., rows, :]
        total = block_sum if total is None else total.add_(block_sum)
        RV = block_RV if RV is None else RV.add_(block_RV)
        E.append(E_b)
        shifts.append(col_max)
    factors = [(shift - col_max).exp_().div_(total) for shift in shifts]
    return E, factors, RV.div_(total.mT)


def landmark_keys_backward(v, E, factors, RV, dRV, dv, dv_skip,
                           scores_grad: ScoresGrad | None = None,
                           scores_out: Callable[[slice], Tensor] | None = None) -> None:
    """RV = Rᵀᵀ·v with Rᵀ = softmax_N(k·q̃ᵀ) given as blocks E_b ⊙ c_b
    (:func:`landmark_keys_forward`), block by block over the rows: dv (with dv_skip, the
    convolution skip's, if given) written into the given tensor with that term added while
    the block is in cache, and each block's d(scores) handed to ``scores_grad(rows, dS)``
    and/or written into ``scores_out(rows)`` (either may be None).

    The softmax over N needs Σₙ Rᵀ ⊙ d(Rᵀ) per landmark over all rows; with d(Rᵀ) = v·dRVᵀ
    that is (RV ⊙ dRV) summed over D, known before the first block. The factor c_b goes
    into the small operands: Rᵀ_b·dRV = E_b·(c_bᵀ ⊙ dRV).
    """
    dot = (RV * dRV).sum(dim=-1).unsqueeze(-2)  # (B, H, 1, m)
    for rows, E_b, c_b in zip(_blocks(v.shape[-2]), E, factors):
        dRV_b = dRV * c_b.mT
        out = None if scores_out is None else scores_out(rows)
        dS = torch.matmul(v[..., rows, :], dRV_b.mT, out=out)
        dS.sub_(dot * c_b).mul_(E_b)  # d(scores of Rᵀ)
        dv_b = torch.matmul(E_b, dRV_b, out=dv[..., rows, :])
        if dv_skip is not None:
            dv_b.add_(dv_skip[..., rows, :])
        if scores_grad is not None:
            scores_grad(rows, dS)


def _add_spread_(dx: Tensor, d_land: Tensor, layout: SegmentLayout, rows: slice | None = None) -> Tensor:
    """In place: dx += (Sᵀ·d_land)[rows], each landmark's gradient spread over its segment
    (1/count per token); dx holds those rows (all by default). Unpadded layout: segments
    are the same for every sequence."""
    b, h, r, d = dx.shape
    n, m = layout.ids.shape[-1], layout.num_segments
    start = 0 if rows is None else rows.start
    if n % m == 0 and start % (n // m) == 0 and r % (n // m) == 0:  # whole segments
        first, size = start // (n // m), n // m
        part = d_land[..., first:first + r // size, :]
        if dx.stride(1) < dx.stride(2):  # (B, N, H, D) memory (packed): add in its order
            # (a contiguous right side lets the heads merge into one inner dimension:
            # 2.9 ms instead of 4.0 at N = 8192)
            tokens = dx.transpose(1, 2).view(b, r // size, size, h, d)
            tokens.add_(part.transpose(1, 2).contiguous()[:, :, None], alpha=m / n)
        else:
            dx.view(b, h, r // size, size, d).add_(part[..., None, :], alpha=m / n)
        return dx
    ids = layout.ids[0] if rows is None else layout.ids[0, rows]
    per_token = d_land / layout.counts[0].to(d_land.dtype)[:, None]
    return dx.add_(per_token.index_select(-2, ids))


def _landmarks(q: Tensor, k: Tensor, layout: SegmentLayout, scale: float) -> tuple[Tensor, Tensor]:
    return segment_means(q, layout=layout)[0] * scale, segment_means(k, layout=layout)[0]


def _reference(q, k, v, conv_weight, inverse: Inverse, layout: SegmentLayout, scale: float) -> Tensor:
    """The same product (and skip) through the general path's factors, with ordinary
    autograd (used for double backward)."""
    fac = landmark_factors(q, k, v, None, layout.num_segments, scale)
    out = fac.F @ (inverse(fac.W()) @ (fac.R @ fac.v))
    return out if conv_weight is None else out + depthwise_conv_seq(v, conv_weight)


def conv_skip_forward(v: Tensor, conv_weight: Tensor | None):
    """The convolution skip of v (B, H, N, D): its input (B, N, C) and per-channel filters
    (C, K), saved for the backward, and its output as a (B, H, N, D) view."""
    if conv_weight is None:
        return None, None, None
    x, w = to_channels(v), channel_filters(conv_weight, v.shape[-1], v.dtype)
    return x, w, to_heads(sequence_conv(x, w), v.shape[1])


def conv_skip_backward(grad: Tensor, x: Tensor, w: Tensor, heads: int, need_w: bool):
    """The convolution skip's dv, a (B, H, N, D) view, and the gradient of its (H, K)
    per-head filters (each head's channels summed)."""
    dx, dw = sequence_conv_grads(to_channels(grad), x, w, True, need_w)
    dw = None if dw is None else dw.view(heads, -1, dw.shape[-1]).sum(dim=1)
    return to_heads(dx, heads), dw


class NystromProduct(torch.autograd.Function):
    """See the module docs; ``apply(q, k, v, conv_weight, inverse, layout, scale, packed)``,
    where ``conv_weight`` (H, K) or None is the convolution skip's and ``packed`` gives the
    gradients the packed layout (:mod:`formerlab.attention.packed_qkv`)."""

    @staticmethod
    def forward(ctx, q, k, v, conv_weight, inverse: Inverse, layout: SegmentLayout, scale: float,
                packed: bool):
        # in the inputs' dtype (the compute dtype) under autocast too: the hand-written
        # backward runs without autocast and needs the dtypes the forward used
        with autocast_off(q.device):
            return NystromProduct._forward(ctx, q, k, v, conv_weight, inverse, layout, scale, packed)

    @staticmethod
    def _forward(ctx, q, k, v, conv_weight, inverse: Inverse, layout: SegmentLayout, scale: float,
                 packed: bool):
        ctx.inverse, ctx.layout, ctx.scale, ctx.packed = inverse, layout, scale, packed
        q_land, k_land = _landmarks(q, k, layout, scale)
        needs_grad = any(ctx.needs_input_grad[:3])
        with torch.enable_grad():  # the small graph W -> Z, differentiated in backward
            q_leaf = q_land.detach().requires_grad_(needs_grad)
            k_leaf = k_land.detach().requires_grad_(needs_grad)
            Z = inverse((q_leaf @ k_leaf.mT).softmax(dim=-1))
        k_land_s = k_land * scale
        # R transposed, in blocks
        E, factors, RV = landmark_keys_forward(lambda rows: k[..., rows, :] @ q_land.mT, v, True)
        Y = Z.detach() @ RV
        x_skip, w_skip, skip = conv_skip_forward(v, conv_weight)
        F, out = landmark_queries_forward(
            lambda rows: (q[..., rows, :] @ k_land_s.mT).softmax(dim=-1), q.shape[-2], Y, skip
        )
        ctx.num_blocks = len(F)
        ctx.save_for_backward(q, k, v, conv_weight, x_skip, w_skip, q_land, k_land_s, RV, Y,
                              *F, *E, *factors)
        ctx.small = (q_leaf, k_leaf, Z)  # m × m pieces with their graph
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, conv_weight, x_skip, w_skip, q_land, k_land_s, RV, Y, *blocks = ctx.saved_tensors
        F, E, factors = (blocks[i * ctx.num_blocks:(i + 1) * ctx.num_blocks] for i in range(3))
        if torch.is_grad_enabled():  # create_graph: differentiate plain ops instead
            return NystromProduct._backward_by_recompute(ctx, q, k, v, conv_weight, grad)
        q_leaf, k_leaf, Z = ctx.small
        grad = grad.to(q.dtype)  # (strided from the head merge: measured no slower)
        dv_skip = dw = None
        if conv_weight is not None:
            dv_skip, dw = conv_skip_backward(grad, x_skip, w_skip, q.shape[1], ctx.needs_input_grad[3])
        dq, dk, dv = empty_grads(q, ctx.packed)
        if dv.shape != v.shape:  # a value width E != D (never packed: packed views share D)
            dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
        dk_land, dq_land = torch.zeros_like(k_land_s), torch.zeros_like(q_land)

        def queries_scores_grad(rows: slice, dS: Tensor) -> None:  # F's scores q·k̃ₛᵀ
            torch.matmul(dS, k_land_s, out=dq[..., rows, :])
            dk_land.add_(dS.mT @ q[..., rows, :])

        def keys_scores_grad(rows: slice, dS: Tensor) -> None:  # Rᵀ's scores k·q̃ᵀ
            _add_spread_(torch.matmul(dS, q_land, out=dk[..., rows, :]), dk_land, ctx.layout, rows)
            dq_land.add_(dS.mT @ k[..., rows, :])

        dY = landmark_queries_backward(grad, F, Y, queries_scores_grad)
        dk_land.mul_(ctx.scale)
        dZ = dY @ RV.mT
        dRV = Z.detach().mT @ dY
        dq_w = dk_w = None
        if Z.requires_grad:  # W's part first: dk̃ is then complete for the R side's blocks
            # retained: a caller may run this backward again (retain_graph=True)
            dq_w, dk_w = torch.autograd.grad(
                Z, (q_leaf, k_leaf), dZ, retain_graph=True, allow_unused=True
            )
        if dk_w is not None:
            dk_land.add_(dk_w)
        landmark_keys_backward(v, E, factors, RV, dRV, dv, dv_skip, scores_grad=keys_scores_grad)
        if dq_w is not None:
            dq_land.add_(dq_w)
        _add_spread_(dq, dq_land.mul_(ctx.scale), ctx.layout)
        return dq, dk, dv, dw, None, None, None, None

    @staticmethod
    def _backward_by_recompute(ctx, q, k, v, conv_weight, grad):
        def reference(q, k, v, conv_weight=None):
            return _reference(q, k, v, conv_weight, ctx.inverse, ctx.layout, ctx.scale)

        inputs = (q, k, v) if conv_weight is None else (q, k, v, conv_weight)
        grads = grads_by_recompute(reference, inputs, ctx.needs_input_grad[:len(inputs)], grad)
        return (*grads[:3], grads[3] if len(grads) > 3 else None, None, None, None, None)


def nystrom_product(
    q: Tensor, k: Tensor, v: Tensor, num_landmarks: int, inverse: Inverse, scale: float,
    conv_weight: Tensor | None = None,
) -> Tensor:
    """Unpadded Nyström attention F · inv(W) · R · v (module docs), one dtype throughout,
    plus the convolution skip conv(v) if ``conv_weight`` is given (fused: its sum and its dv
    are added block by block while the blocks are in cache).

    Args:
        q, k, v: (B, H, N, D) queries (unscaled), keys and values, N > num_landmarks.
        num_landmarks: m, the number of segment means (need not divide N).
        inverse: differentiable W (B, H, m, m) -> Z (B, H, m, m).
        scale: the logit scale s.
        conv_weight: (H, K) per-head filters of the depthwise convolution of v along the
            sequence, K odd (:func:`~formerlab.attention.conv_skip.depthwise_conv_seq`).
    """
    b, h, n, _ = q.shape
    if n <= num_landmarks:
        raise ValueError(
            f"nystrom_product needs N > num_landmarks; got N={n}, num_landmarks={num_landmarks}"
        )
    if conv_weight is not None and (
        conv_weight.dim() != 2 or conv_weight.shape[0] != h or conv_weight.shape[1] % 2 == 0
    ):
        raise ValueError(
            f"conv_weight has shape {tuple(conv_weight.shape)}; expected ({h}, K) with K odd"
        )
    layout = segment_layout(n, num_landmarks, None, b, q.device)
    packed = packed_buffer(q, k, v) is not None  # the gradients get that layout too
    # each of q, k, v feeds two GEMMs; a strided one (a view of the projections) cost
    # ~2.5 ms more per GEMM at N = 8192 than the 1.8 ms of one copy
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    return NystromProduct.apply(q, k, v, conv_weight, inverse, layout, scale, packed)


__all__ = ["NystromProduct", "nystrom_product"]
