"""Causal (decoder-safe) Nyström attention with segment landmarks.

Nyströmformer (Xiong et al., 2021) approximates the softmax kernel matrix through
landmarks, exp(QKᵀ) ≈ exp(QK̃ᵀ) · exp(Q̃K̃ᵀ)⁺ · exp(Q̃Kᵀ), with segment means Q̃, K̃.
As published it cannot be used in a decoder: every landmark is a mean over a segment
that contains future tokens, and every factor mixes all positions.

Design. Split the sequence into m segments of s tokens; landmark a is the mean of q and
of k over (the real tokens of) segment a. With the exp-kernel κ(x, y) = exp(scale·x·y),
a query i in segment σ(i)

* attends **exactly** to the keys of its own segment up to itself (local causal part);
* reaches the keys of segments < σ(i) through a Nyström factorisation that uses only
  landmarks a < σ(i):   far(i) = Σ_{a < σ(i)} κ(q_i, k̃_a) · X_a,
  where X_a ∈ R^{D+1} is "what landmark a stands for" (values, and a count for the
  denominator). Two landmark systems define X (option ``landmark_system``):

``"triangular"`` (the design proposed in the issue): X = L⁻¹ R [V, 1] with the m×m
landmark kernel made lower-triangular, L_ab = κ(q̃_a, k̃_b) for b <= a, and the right
factor made segment-causal, R_aj = κ(q̃_a, k_j) for σ(j) <= a. The inverse of a leading
block of a lower-triangular matrix is the leading block of its inverse, so X_a (a < σ(i))
— the first rows of one exact triangular solve (``torch.linalg.solve_triangular``, no
iterative pseudoinverse) — depends only on landmarks <= a and keys of segments <= a.

``"block"`` (default): the Nyström formula C W⁻¹ R applied to each past segment with its
own landmark, i.e. L reduced to its diagonal and R to its block diagonal:
X_a = Σ_{j ∈ a} κ(q̃_a, k_j) / κ(q̃_a, k̃_a) · [v_j, 1]. No solve is needed, every term is
positive (the denominator cannot turn negative), and errors cannot propagate between
landmarks. Why it is the default: the triangular inverse chains m landmarks, and its
entries grow like the ratio of off-diagonal to diagonal kernel values raised to the
chain length. Measured on N=512, D=16..64 (float64, mean/max abs error against exact
causal softmax): on random Gaussian q, k, v with s = 2 or 4 the triangular system gave
2.2–8.8 / 468–42 000 (blow-up), block 0.07 / 1.4 (below local-only attention, 0.6); on
smooth (random-walk) q, k both work, triangular 0.015–0.035 and block 0.020–0.035. The
triangular system remains available and leak-tested.

Why both are causal: output i uses landmarks a < σ(i) (segments entirely before i), X_a
built from segments <= a, and its own segment's keys j <= i. Nothing at a position > i
enters output i, in value or gradient.

Exactness: with s = 1 the landmarks are the tokens; for ``"triangular"`` R = L =
tril(exp(QKᵀ)) so L⁻¹R = I, for ``"block"`` X_a = [v_a, 1]; both give exactly the causal
softmax numerator/denominator. With s >= N only the exact local part remains. Both are
exact whenever the tokens of each segment are identical.

Numerics. Local and far parts are combined as un-normalised exp-kernel sums (numerator
and denominator, the latter from a ones column appended to V), in float32 (float64 for
float64 inputs):

* the local and the landmark part of a query are each shifted by the max of their own
  logits and then rescaled to the larger of the two shifts (factors <= 1, no overflow; a
  dropped landmark part cannot push the local part into underflow). Per-query shifts
  cancel in numerator/denominator, so they are detached (zero derivative), and the
  denominator is bounded away from 0 for every query that sees a key;
* ``"block"``: X_a is kept as e^{c_a}·X̃_a with c_a = max_j scale·q̃_a·(k_j - k̃_a) >= 0 folded
  into the landmark logit, so every exponential is <= 1;
* ``"triangular"``: each row a of [L | R] is shifted by one constant r_a (it cancels in
  L⁻¹R), the row max but at most 40 above the diagonal logit, so no entry overflows and
  the diagonal stays >= e⁻⁴⁰ (and no entry exceeds e⁶⁰). If the solve breaks down
  (non-finite, or a landmark's effective count X_a[-1] off its segment size by more than
  e²⁰), that landmark and all later ones are removed by a second solve with unit rows
  (finite values and gradients). Its Nyström denominator is not guaranteed positive: if the
  far denominator of a query is <= 0 or not finite, that query falls back to its exact
  local part (``last_info["fallback_fraction"]``, also reported by ``diagnostics()``).

Cost per head, with m = ⌈N/s⌉: ``"block"`` time O(N·(s + m)·D), memory O(N·(s + m))
(N·s for the local blocks, N·m for the left factor; no m×m matrix at all); ``"triangular"`` adds the m×N right
factor and an m×m solve: time O(N·(s + 2m)·D + m²·D), memory O(N·(s + 2m)). For fixed s
or fixed m the cost is quadratic in N; s = ⌈√N⌉ would balance the two terms (O(N^1.5·D)
time), but a segment size derived from N is not prefix consistent (outputs at early
positions would change with the length of the sequence), so the default is a fixed
s = 32 (measured, see ``DEFAULT_SEGMENT_SIZE`` and the README), anchored at position 0.
Streaming (``step``) costs O((s + t/s)·D) per token at position t.

Bidirectional use (``causal=False``, block system only): a query attends exactly to its
whole segment and through the landmarks to every other segment — the same construction
without the causal masks (exact for s = 1 and for s >= N).

Key padding: padded keys get no weight and are left out of the landmark means; a segment
with no real token has no landmark. Segments are anchored at each row's first real token
(the leading padding is rotated to the end of the row and the output rotated back), so a
left-padded row gives its real positions exactly what the unpadded sequence gives them,
as right padding does; padding inside a row is honoured the same way (left out of the
means), with segments still counted from the first real token.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from formerlab.attention.base import AttentionKernel, check_kernel_options, compute_dtype
from formerlab.attention.registry import register
from formerlab.attention.streaming import (
    GROW_CHUNK,
    Tail,
    check_step,
    claim,
    state_dims,
    tail_field,
)
from formerlab.errors import check_choice

LANDMARK_SYSTEMS = ("block", "triangular")
# max log-gap between a landmark row's largest logit and its diagonal (keeps L invertible)
_DIAG_GAP = 40.0
# largest exponent allowed in the triangular system's factors
_MAX_EXP = 60.0
# a solved landmark's effective count must lie within count·[1/_SOLVE_RANGE, _SOLVE_RANGE]
_SOLVE_RANGE = math.exp(20.0)
# default tokens per segment, fixed (prefix consistency), chosen by measurement (README):
# the error against exact causal softmax is flat in s = 8…64 at N = 128…2048 and on a par
# with the old ⌈√N⌉, so the cost decides: O(s + t/s) per token is balanced at t ≈ 1k
DEFAULT_SEGMENT_SIZE = 32


def resolve_segment_size(
    n: int, segment_size: int | None, num_landmarks: int | None, causal: bool = True
) -> int:
    """The segment size for a sequence of length ``n`` (see :class:`CausalNystromAttention`).

    Causal: ``segment_size`` or ``DEFAULT_SEGMENT_SIZE``, never derived from ``n`` (segments
    are anchored at position 0, so a prefix is segmented as in the whole sequence);
    ``num_landmarks`` is refused. Bidirectional: ``num_landmarks`` gives ⌈n/m⌉.
    """
    if num_landmarks is not None:
        if causal:
            raise ValueError(
                f"num_landmarks={num_landmarks!r} is not allowed with causal=True: it sets the "
                "segment size to ⌈N/num_landmarks⌉, so outputs at a position would change with "
                "how many tokens follow (not prefix consistent); give segment_size= instead "
                f"(default {DEFAULT_SEGMENT_SIZE}); num_landmarks is for causal=False only"
            )
        return max(1, math.ceil(n / num_landmarks))
    return DEFAULT_SEGMENT_SIZE if segment_size is None else segment_size


def _shift(*logits: Tensor) -> Tensor:
    """Detached max over the last dim of all ``logits`` (broadcast together); 0 where all
    entries are masked (-inf). Shifts cancel exactly, so they carry no gradient."""
    m = logits[0].detach().amax(dim=-1, keepdim=True)
    for x in logits[1:]:
        m = torch.maximum(m, x.detach().amax(dim=-1, keepdim=True))
    return torch.where(torch.isfinite(m), m, torch.zeros_like(m))


def _triangular_system(
    q_land: Tensor,
    k_land: Tensor,
    k: Tensor,
    v1: Tensor,
    real: Tensor,
    count: Tensor,
    seg: Tensor,
    scale: float,
) -> tuple[Tensor, Tensor]:
    """X = L⁻¹ R [V, 1] with L lower-triangular (m, m) and R segment-causal (m, N').

    Returns ``(X, bad)``: ``bad`` (b, h, m, 1) marks landmarks whose solve broke down —
    not finite, an effective count X_a[-1] outside [count_a·e⁻²⁰, count_a·e²⁰], or values
    beyond count_a·max|v|·e²⁰ — and every later one (the solve chains them). Their X is set to
    0 by solving a system with unit rows there, so values *and* gradients stay finite.
    """
    has = count.squeeze(-1) > 0
    b, h, m, _ = q_land.shape
    work = q_land.dtype
    lmat = scale * q_land @ k_land.transpose(-1, -2)
    rmat = scale * q_land @ k.transpose(-1, -2)
    pair = has.unsqueeze(-1) & has.unsqueeze(-2)  # (b, 1, m, m)
    lower = torch.ones(m, m, dtype=torch.bool, device=q_land.device).tril()
    lmat = lmat.masked_fill(~(lower & pair), float("-inf"))
    seen = seg[None, :] <= torch.arange(m, device=q_land.device)[:, None]  # (m, N')
    rmat = rmat.masked_fill(~(seen & real[:, None, None, :] & has.unsqueeze(-1)), float("-inf"))
    # one shift per row of [L | R] cancels in L⁻¹R: the row max, but at most _DIAG_GAP
    # above the diagonal (diagonal >= e^-40) and at least _MAX_EXP below the max (no
    # entry above e^60, so sums of them stay finite in float32)
    diag = torch.diagonal(lmat, dim1=-2, dim2=-1).detach().unsqueeze(-1)
    rowmax = _shift(lmat, rmat)
    r = torch.where(torch.isfinite(diag), torch.minimum(rowmax, diag + _DIAG_GAP), rowmax)
    r = torch.maximum(r, rowmax - _MAX_EXP)
    lexp = torch.exp(lmat - r)
    # a segment without landmark: unit row, zero right-hand side -> X_a = 0 (removed)
    unit = torch.eye(m, dtype=work, device=q_land.device)
    lexp = torch.where(has.unsqueeze(-1), lexp, unit)
    rhs = torch.exp(rmat - r) @ v1
    with torch.no_grad():
        probe = torch.linalg.solve_triangular(lexp, rhs, upper=False)
        # a healthy landmark stands for about count_a tokens (exactly, for identical ones)
        size = count.to(work)
        vmax = v1.abs().amax(dim=(-2, -1), keepdim=True)
        ok = torch.isfinite(probe).all(-1, keepdim=True)
        ok &= (probe[..., -1:] >= size * _SOLVE_RANGE**-1) & (
            probe[..., -1:] <= size * _SOLVE_RANGE
        )
        ok &= probe.abs().amax(-1, keepdim=True) <= size * vmax * _SOLVE_RANGE
        bad = (~ok & has.unsqueeze(-1)).cumsum(-2) > 0
    if bool(bad.any()):
        lexp = torch.where(bad, unit, lexp)
        rhs = rhs.masked_fill(bad, 0.0)
    return torch.linalg.solve_triangular(lexp, rhs, upper=False), bad


def _block_system(
    q_land: Tensor, k_land: Tensor, ks: Tensor, vs: Tensor, real_s: Tensor, scale: float
) -> tuple[Tensor, Tensor]:
    """Per-segment rank-1 Nyström: X_a = Σ_{j∈a} κ(q̃_a, k_j)/κ(q̃_a, k̃_a) [v_j, 1].

    Returned in log-scaled form ``(X̃, c)`` with X = e^c X̃: the exponents
    δ_j = scale·q̃_a·(k_j - k̃_a) average to zero over the segment, so c_a = max_j δ_j >= 0
    and X̃ has entries of at most the segment's size — nothing can overflow.
    """
    delta = scale * (ks @ q_land.unsqueeze(-1)).squeeze(-1)  # (b, h, m, s)
    delta = delta - scale * (q_land * k_land).sum(-1, keepdim=True)
    delta = delta.masked_fill(~real_s, float("-inf"))
    c = _shift(delta)  # (b, h, m, 1)
    x = (torch.exp(delta - c).unsqueeze(-2) @ vs).squeeze(-2)  # (b, h, m, dv + 1)
    return x, c.transpose(-1, -2)


def causal_nystrom_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    segment_size: int,
    attention_mask: Tensor | None = None,
    scale: float | None = None,
    landmark_system: str = "block",
    causal: bool = True,
) -> tuple[Tensor, dict[str, float]]:
    """Causal segment-Nyström attention on (B, H, N, D); returns ``(out, info)``.

    ``causal=False`` (``"block"`` only): the bidirectional variant — the whole own segment
    exactly, every other segment through its landmark.

    ``landmark_system``: ``"block"`` (per-segment rank-1 Nyström, the default) or
    ``"triangular"`` (lower-triangular landmark kernel + triangular solve). See the module
    doc for both, their causality and their numerics. ``info`` holds ``segment_size``,
    ``num_landmarks`` and ``fallback_fraction`` (share of real queries with landmarks whose
    Nyström part was dropped; always 0 for ``"block"``). Padded queries are not zeroed here
    (the kernel module does that). Output in the working dtype (float32/float64).
    """
    check_choice("landmark_system", landmark_system, LANDMARK_SYSTEMS)
    if not causal and landmark_system != "block":
        raise ValueError(
            f"causal=False needs landmark_system='block'; got {landmark_system!r} (the "
            "triangular system is causal by construction)"
        )
    work = compute_dtype(q.dtype)
    b, h, n, d = q.shape
    s = min(segment_size, n)
    m = math.ceil(n / s)
    pad = m * s - n
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    q, k, v = q.to(work), k.to(work), v.to(work)
    real = (
        torch.ones(b, n, dtype=torch.bool, device=q.device)
        if attention_mask is None
        else attention_mask
    )
    # segments start at each row's first real token: rotate the leading padding to the end
    lead = None if attention_mask is None else leading_padding(attention_mask)
    if lead is not None:
        q, k, v, real = (rotate_left(t, lead) for t in (q, k, v, real))
    if pad:
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
        real = F.pad(real, (0, pad), value=False)
    npad = m * s
    dv = v.shape[-1]
    v1 = torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)  # ones column -> denominator
    qs, ks, vs = (t.reshape(b, h, m, s, -1) for t in (q, k, v1))
    real_s = real.reshape(b, 1, m, s)
    seg = torch.arange(npad, device=q.device) // s  # segment of each position

    # landmarks: means over the real tokens of each segment
    count = real_s.sum(-1, keepdim=True)  # (b, 1, m, 1)
    has = count.squeeze(-1) > 0  # (b, 1, m): segment has a landmark
    weight = real_s.unsqueeze(-1).to(work)
    q_land = (qs * weight).sum(-2) / count.clamp_min(1)
    k_land = (ks * weight).sum(-2) / count.clamp_min(1)

    # local part: exact causal softmax logits inside each segment (b, h, m, s, s)
    local = scale * qs @ ks.transpose(-1, -2)
    tri = torch.ones(s, s, dtype=torch.bool, device=q.device)
    tri = tri.tril() if causal else tri
    local = local.masked_fill(~(tri & real_s.unsqueeze(-2)), float("-inf"))

    # what each landmark stands for: X (m, dv + 1), as e^offset · x
    if landmark_system == "block":
        x, offset = _block_system(q_land, k_land, ks, vs, real_s, scale)
        bad = torch.zeros_like(x[..., :1], dtype=torch.bool)
    elif s == 1:
        # one token per segment: R = L, so L⁻¹R = I exactly; solving would only add
        # rounding amplified by cond(L)
        x, offset = v1 * real.reshape(b, 1, npad, 1).to(work), None
        bad = torch.zeros_like(x[..., :1], dtype=torch.bool)
    else:
        x, bad = _triangular_system(q_land, k_land, k, v1, real, count, seg, scale)
        offset = None

    # left factor: query i -> landmarks a < σ(i) (b, h, N', m)
    left = scale * q @ k_land.transpose(-1, -2)
    if offset is not None:
        left = left + offset
    # the landmarks each query uses: earlier segments (causal) or all other segments
    landmark_ids = torch.arange(m, device=q.device)[None, :]
    earlier = seg[:, None] > landmark_ids if causal else seg[:, None] != landmark_ids  # (N', m)
    left = left.masked_fill(~(earlier & has.unsqueeze(-2)), float("-inf"))

    # each part with its own per-query shift (shifts cancel in num/den)
    u_loc = _shift(local.reshape(b, h, npad, s))
    u_far = _shift(left)
    local_sums = torch.exp(local - u_loc.reshape(b, h, m, s, 1)) @ vs
    local_sums = local_sums.reshape(b, h, npad, dv + 1)
    far = torch.exp(left - u_far) @ x  # (b, h, N', dv + 1)

    # drop the far part of a query if it is not a positive finite sum, or if a landmark
    # it uses could not be solved (only the triangular system can produce either)
    broken = bad.to(work).transpose(-1, -2) @ earlier.to(work).T  # (b, h, 1, N')
    use_far = (far[..., -1:] > 0) & torch.isfinite(far).all(-1, keepdim=True)
    use_far = use_far & (broken.transpose(-1, -2) == 0)
    # common shift of the parts that are kept: both rescalings are <= 1 (no overflow),
    # and a dropped far part cannot push the local part into underflow
    u = torch.where(use_far, torch.maximum(u_loc, u_far), u_loc)
    far_scale = torch.where(use_far, torch.exp(u_far - u), torch.zeros_like(u))
    far = torch.where(use_far, far, torch.zeros_like(far))
    sums = local_sums * torch.exp(u_loc - u) + far * far_scale
    den = sums[..., -1:]
    # den >= 1 for a query that sees a key (the part attaining u has a term e^0 times a
    # count >= 1; >= e^-20 for the triangular system, by its solve check); 0 only for
    # queries that see none (padding): output 0, and no 0/0 gradient
    out = sums[..., :dv] / torch.where(den > 0, den, torch.ones_like(den))

    total = dropped = 0  # the diagnostic needs host syncs: eager only (no graph break)
    if not torch.compiler.is_compiling():
        candidates = real.reshape(b, 1, npad, 1) & (seg > 0).reshape(1, 1, npad, 1)
        total = int(candidates.sum()) * h
        dropped = int((candidates & ~use_far & has.any(-1)[..., None, None]).sum())
    info = {
        "segment_size": float(s),
        "num_landmarks": float(m),
        "fallback_fraction": dropped / total if total else 0.0,
    }
    out = out[:, :, :n]
    return (out if lead is None else rotate_left(out, -lead)), info


def leading_padding(attention_mask: Tensor) -> Tensor:
    """(B,) the number of padded positions before each row's first real token (0 for a
    row without any)."""
    return attention_mask.to(torch.uint8).argmax(dim=1)  # argmax: the first maximum


def rotate_left(x: Tensor, by: Tensor) -> Tensor:
    """x (B, N) or (B, H, N, ·) with row b rotated left by ``by[b]`` positions along N."""
    n = x.shape[1] if x.dim() == 2 else x.shape[2]
    index = (torch.arange(n, device=x.device) + by[:, None]) % n  # (B, N)
    if x.dim() == 2:
        return x.gather(1, index)
    index = index[:, None, :, None].expand(x.shape[0], x.shape[1], n, x.shape[3])
    return x.gather(2, index)


@dataclass
class NystromState:
    """Streaming state of ``causal_nystrom`` (block landmark system).

    The open segment (``open_len`` < s tokens so far): its queries ``q_open`` (B, H, s, D)
    (the landmark query q̃ is their mean), keys ``k_open`` and values with a ones column
    ``v_open`` (B, H, s, E + 1). Every finished segment a (``landmarks`` of them) is kept
    as its landmark key k̃_a (``land_k``, B, H, capacity, D) and its landmark sum in
    log-scaled form X_a = e^{c_a}·x̃_a (``land_c`` (B, H, capacity), ``land_x``
    (B, H, capacity, E + 1)), grown in preallocated chunks. Memory O(s + t/s) per head.

    A value: ``step`` returns a new state and never changes this one. The open-segment
    and landmark buffers are append-only and shared with the states stepped from this one
    until they diverge (``open_tail`` / ``land_tail``, see
    :func:`formerlab.attention.streaming.claim`); a closed segment starts new open buffers.
    """

    q_open: Tensor
    k_open: Tensor
    v_open: Tensor
    land_k: Tensor
    land_c: Tensor
    land_x: Tensor
    open_len: int = 0
    landmarks: int = 0
    length: int = 0
    open_tail: Tail = tail_field()
    land_tail: Tail = tail_field()


def _state_dims(state: NystromState) -> tuple[int, int, int, int]:
    return (*state.k_open.shape[:2], state.k_open.shape[-1], state.v_open.shape[-1] - 1)


def _combine(local: Tensor, v_local: Tensor, far: Tensor | None, x_far: Tensor | None) -> Tensor:
    """Normalised output from local logits (…, T, J) over ``v_local`` (…, J, E + 1) and
    landmark logits (…, T, L) over ``x_far`` (…, L, E + 1): the parallel call's
    per-query shifts and far-part guard, for a streaming step."""
    dv = v_local.shape[-1] - 1
    u_loc = _shift(local)
    sums = torch.exp(local - u_loc) @ v_local
    if far is not None:
        u_far = _shift(far)
        far_sums = torch.exp(far - u_far) @ x_far
        use_far = (far_sums[..., -1:] > 0) & torch.isfinite(far_sums).all(-1, keepdim=True)
        u = torch.where(use_far, torch.maximum(u_loc, u_far), u_loc)
        far_scale = torch.where(use_far, torch.exp(u_far - u), torch.zeros_like(u))
        far_sums = torch.where(use_far, far_sums, torch.zeros_like(far_sums))
        sums = sums * torch.exp(u_loc - u) + far_sums * far_scale
    den = sums[..., -1:]
    return sums[..., :dv] / torch.where(den > 0, den, torch.ones_like(den))


def _close_segment(state: NystromState, scale: float) -> NystromState:
    """The state with its full open segment turned into a landmark (as ``_block_system``
    does) and empty open buffers; ``state`` itself is not changed."""
    s = state.k_open.shape[2]
    q_land = state.q_open.sum(-2) / s
    k_land = state.k_open.sum(-2) / s
    delta = scale * (state.k_open @ q_land.unsqueeze(-1)).squeeze(-1)
    delta = delta - scale * (q_land * k_land).sum(-1, keepdim=True)  # (B, H, s)
    c = _shift(delta)
    x = (torch.exp(delta - c).unsqueeze(-2) @ state.v_open).squeeze(-2)
    a = state.landmarks
    buffers = (state.land_k, state.land_c, state.land_x)
    (land_k, land_c, land_x), land_tail = claim(buffers, state.land_tail, a, a + 1)
    land_k[:, :, a] = k_land
    land_c[:, :, a] = c.squeeze(-1)
    land_x[:, :, a] = x
    # the closed segment's buffers stay with the states that still have it open
    q_open, k_open, v_open = (t.new_zeros(t.shape) for t in (state.q_open, state.k_open, state.v_open))
    return dataclasses.replace(
        state, q_open=q_open, k_open=k_open, v_open=v_open, open_len=0, open_tail=Tail(),
        land_k=land_k, land_c=land_c, land_x=land_x, landmarks=a + 1, land_tail=land_tail,
    )


def _append_open(state: NystromState, q: Tensor, k: Tensor, v: Tensor) -> NystromState:
    """The state with q, k, v (B, H, T, ·) appended to its open segment (T <= room left)."""
    o = state.open_len
    end = o + q.shape[2]
    buffers = (state.q_open, state.k_open, state.v_open)
    (q_open, k_open, v_open), tail = claim(buffers, state.open_tail, o, end)
    q_open[:, :, o:end] = q
    k_open[:, :, o:end] = k
    v_open[:, :, o:end, :-1] = v
    v_open[:, :, o:end, -1] = 1.0
    return dataclasses.replace(
        state, q_open=q_open, k_open=k_open, v_open=v_open, open_len=end, open_tail=tail
    )


def nystrom_step(
    q: Tensor, k: Tensor, v: Tensor, state: NystromState, scale: float
) -> tuple[Tensor, NystromState]:
    """Outputs of T new tokens (compute dtype) and the new state; ``state`` is unchanged.

    The tokens are taken in pieces that fit the open segment; each piece attends exactly
    to the open segment up to itself and to every finished segment through its landmark,
    as in the parallel call; a segment that fills up becomes a landmark.
    """
    s = state.k_open.shape[2]
    outs, i, t = [], 0, q.shape[2]
    while i < t:
        o = state.open_len
        take = min(t - i, s - o)
        end = o + take
        qp = q[:, :, i : i + take]
        state = _append_open(state, qp, k[:, :, i : i + take], v[:, :, i : i + take])
        local = scale * qp @ state.k_open[:, :, :end].transpose(-1, -2)
        seen = torch.arange(end, device=q.device)[None, :] <= torch.arange(
            o, end, device=q.device
        )[:, None]
        local = local.masked_fill(~seen, float("-inf"))
        far = x_far = None
        if state.landmarks:
            a = state.landmarks
            far = scale * qp @ state.land_k[:, :, :a].transpose(-1, -2)
            far = far + state.land_c[:, :, None, :a]
            x_far = state.land_x[:, :, :a]
        outs.append(_combine(local, state.v_open[:, :, :end], far, x_far))
        if end == s:
            state = _close_segment(state, scale)
        i += take
    state = dataclasses.replace(state, length=state.length + t)
    return (outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)), state


@register(
    "causal_nystrom",
    causal=True,
    complexity="O(N·(s+N/s)·D) time, O(N·(s+N/s)) memory; fixed s (default 32); "
    "streaming O(s+t/s) per token",
    description="decoder-safe Nyström: exact local segment + past segments via landmarks",
)
class CausalNystromAttention(AttentionKernel):
    """Decoder-safe Nyström attention (see the module doc); ``causal=True`` only.

    ``segment_size``: tokens per landmark segment (1 = exact causal softmax; default
    ``DEFAULT_SEGMENT_SIZE`` = 32, fixed and anchored at position 0, so the outputs at
    positions < n do not depend on how many tokens follow — prefix consistency).
    ``num_landmarks``: the number of segments m (segment size ⌈N/m⌉), for ``causal=False``
    only; with ``causal=True`` it raises ``ValueError`` (a segment size derived from N is
    not prefix consistent). ``landmark_system``: ``"block"`` (default) or
    ``"triangular"``. ``scale``: logit scale (default 1/√D).

    Streams (``init_state`` / ``step``, block system) with a :class:`NystromState`: the
    open segment's queries, keys and values plus one landmark key and landmark sum per
    finished segment, memory O(s + t/s) per head at position t.
    """

    name = "causal_nystrom"
    supports_causal = True
    supports_streaming = True

    def __init__(
        self,
        segment_size: int | None = None,
        num_landmarks: int | None = None,
        landmark_system: str = "block",
        scale: float | None = None,
    ) -> None:
        check_kernel_options(
            "causal_nystrom", nullable=("segment_size", "num_landmarks", "scale"),
            segment_size=segment_size, num_landmarks=num_landmarks, scale=scale,
        )
        super().__init__()
        self.landmark_system = check_choice("landmark_system", landmark_system, LANDMARK_SYSTEMS)
        if segment_size is not None and num_landmarks is not None:
            raise ValueError(
                f"give segment_size={segment_size!r} or num_landmarks={num_landmarks!r}, not both"
            )
        self.segment_size, self.num_landmarks, self.scale = segment_size, num_landmarks, scale

    def attend(self, q, k, v, attention_mask, causal, need_weights):
        if not causal and self.landmark_system != "block":
            raise ValueError(
                "causal_nystrom with landmark_system='triangular' is causal by construction "
                "(causal=True only); use landmark_system='block', 'nystrom' or 'softmax' "
                "for bidirectional attention"
            )
        s = resolve_segment_size(q.shape[-2], self.segment_size, self.num_landmarks, causal)
        run = {
            "attention_mask": attention_mask,
            "scale": self.scale,
            "landmark_system": self.landmark_system,
            "causal": causal,
        }
        out, info = causal_nystrom_attention(q, k, v, s, **run)
        self.last_info = info
        weights = None
        if need_weights:
            # the output is linear in v: feeding the identity returns the implied weights
            b, h, n, _ = q.shape
            eye = torch.eye(n, dtype=q.dtype, device=q.device).expand(b, h, n, n)
            weights, _ = causal_nystrom_attention(q, k, eye, s, **run)
            weights = weights.to(q.dtype)
        return out, weights

    def init_state(self, batch, heads, head_dim, *, dtype=torch.float32, device=None,
                   value_dim=None) -> NystromState:
        """An empty :class:`NystromState` (block system; ``segment_size`` or the default)."""
        if self.landmark_system != "block":
            raise ValueError(
                f"landmark_system={self.landmark_system!r} cannot stream: its landmark "
                "solve needs every earlier key; use landmark_system='block'"
            )
        resolve_segment_size(0, self.segment_size, self.num_landmarks, causal=True)
        b, h, d, e, work = state_dims(batch, heads, head_dim, value_dim, dtype)
        s = resolve_segment_size(0, self.segment_size, None)
        zeros = lambda *shape: torch.zeros(*shape, dtype=work, device=device)  # noqa: E731
        return NystromState(
            zeros(b, h, s, d), zeros(b, h, s, d), zeros(b, h, s, e + 1),
            zeros(b, h, GROW_CHUNK, d), zeros(b, h, GROW_CHUNK), zeros(b, h, GROW_CHUNK, e + 1),
        )

    def step(self, q: Tensor, k: Tensor, v: Tensor, state: NystromState):
        """``(out, new_state)`` for T new tokens (B, H, T, D), equal to the parallel causal
        call; ``state`` itself is left unchanged (it can be stepped again)."""
        check_step(self.name, q, k, v, state, NystromState, _state_dims)
        work = state.k_open.dtype
        scale = 1.0 / math.sqrt(q.shape[-1]) if self.scale is None else self.scale
        out, state = nystrom_step(q.to(work), k.to(work), v.to(work), state, scale)
        return out.to(q.dtype), state

    def diagnostics(self) -> dict[str, float]:
        """Share of queries that fell back to local attention in the last call."""
        if not self.last_info:
            return {}
        return {"fallback_fraction": self.last_info["fallback_fraction"]}

    def extra_repr(self) -> str:
        return (
            f"segment_size={self.segment_size}, num_landmarks={self.num_landmarks}, "
            f"landmark_system={self.landmark_system!r}"
        )
