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

from formerlab.attention.base import (
    AttentionKernel,
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

    The last ``open_len`` (< s) tokens of the stream, which hold every row's open segment
    (the tokens since its last finished segment): their queries ``q_open`` (B, H, s, D),
    keys ``k_open`` and values with a ones column ``v_open`` (B, H, s, E + 1), in the first
    ``open_len`` slots (the landmark query q̃ of a segment is the mean of its queries).
    Every finished segment a of a row is kept as its landmark key k̃_a (``land_k``,
    B, H, capacity, D) and its landmark sum in log-scaled form X_a = e^{c_a}·x̃_a
    (``land_c`` (B, H, capacity), ``land_x`` (B, H, capacity, E + 1)), grown in
    preallocated chunks; a segment without a real token has c_a = -inf (no weight).
    Memory O(s + t/s) per head.

    Rows. Until a step is given an ``attention_mask``, every token is real and every row
    is segmented from position 0: all rows hold ``open_len`` open tokens and ``landmarks``
    landmarks. After one, ``open_real`` (B, 1, s) marks which kept tokens are real and
    ``first`` holds each row's first real position (None while a row has none): a row's
    segments start at its first real token, as in the parallel call, so its phase
    (``first`` mod s) may differ from other rows' and rows may be a landmark apart;
    ``open_len`` and ``landmarks`` are then the largest over the rows.

    A value: ``step`` returns a new state and never changes this one. The kept-token and
    landmark buffers are append-only and shared with the states stepped from this one
    until they diverge (``open_tail`` / ``land_tail``, see
    :func:`formerlab.attention.streaming.claim`); dropping finished tokens from the kept
    ones starts new buffers.
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
    open_real: Tensor | None = None
    first: tuple[int | None, ...] | None = None


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


def row_phases(first: tuple[int | None, ...] | None, batch: int, s: int, before: int) -> list[int]:
    """Each row's segment phase for the positions before ``before``: its first real
    position mod s if that lies before ``before``, else 0 (a row without a real token yet
    has only empty segments, whichever the phase)."""
    if first is None:
        return [0] * batch
    return [f % s if f is not None and f < before else 0 for f in first]


def _first_real(
    state: NystromState, attention_mask: Tensor | None, batch: int
) -> tuple[int | None, ...] | None:
    """``first`` after a step with ``attention_mask`` (None while no mask was ever given).
    Reads the mask on the host: the segment layout is host bookkeeping."""
    if attention_mask is None and state.first is None:
        return None
    first = [0 if state.length else None] * batch if state.first is None else list(state.first)
    if attention_mask is None:
        any_real, index = [True] * batch, [0] * batch
    else:
        any_real = attention_mask.any(dim=1).tolist()
        index = attention_mask.to(torch.uint8).argmax(dim=1).tolist()  # the first maximum
    for row in range(batch):
        if first[row] is None and any_real[row]:
            first[row] = state.length + index[row]
    return tuple(first)


def _mark(counts: list[int]) -> int | tuple[int, ...]:
    """The tail mark of per-row landmark counts: an int when every row has as many (the
    unpadded case, so such states share buffers with states that never saw a mask)."""
    return counts[0] if len(set(counts)) == 1 else tuple(counts)


def _segment_of(
    columns: Tensor, phases: list[int], base: list[int], s: int
) -> Tensor:
    """(B or 1, L): segment index of every column for every row, relative to ``base``."""
    if len(set(phases)) == 1 and len(set(base)) == 1:
        return torch.div(columns - phases[0], s, rounding_mode="floor")[None] - base[0]
    dev = columns.device
    phase = torch.tensor(phases, device=dev)[:, None]
    return torch.div(columns[None] - phase, s, rounding_mode="floor") - torch.tensor(
        base, device=dev
    )[:, None]


def _new_landmarks(
    member: Tensor, qw: Tensor, kw: Tensor, vw: Tensor, scale: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Landmarks of the candidate segments ``member`` (B, R, L) of the working tokens, as
    ``_block_system`` builds them: k̃ (B, H, R, D), c (B, H, R) (-inf for a segment without
    a real token) and x̃ (B, H, R, E + 1)."""
    count = member.sum(-1)  # (B, R)
    weight = member.to(qw.dtype)[:, None]  # (B, 1, R, L)
    denom = count.clamp_min(1).to(qw.dtype)[:, None, :, None]
    q_land, k_land = weight @ qw / denom, weight @ kw / denom
    delta = scale * q_land @ kw.transpose(-1, -2)
    delta = delta - scale * (q_land * k_land).sum(-1, keepdim=True)  # (B, H, R, L)
    delta = delta.masked_fill(~member[:, None], float("-inf"))
    c = _shift(delta)
    x = torch.exp(delta - c) @ vw
    c = c.squeeze(-1).masked_fill((count == 0)[:, None], float("-inf"))
    return k_land, c, x


def _working_tokens(
    state: NystromState, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, keep: int
) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...], Tail]:
    """The kept tokens followed by the piece q, k, v (B, H, p, ·): ``(work, kept, tail)``.

    ``work``: queries, keys, values with a ones column (B, H, L, ·) and, for a masked
    state, the real-token flags (B, 1, L). ``kept``: the new state's kept-token buffers,
    holding the last ``keep`` working tokens, and their tail. When nothing is dropped
    (``keep`` = L, the common case) the piece is appended in place and ``work`` are views
    of those buffers; otherwise ``work`` is a copy and ``kept`` new buffers.
    """
    w, p = state.open_len, q.shape[2]
    masked = mask is not None or state.open_real is not None
    buffers = (state.q_open, state.k_open, state.v_open)
    if masked:
        buffers += (_real_window(state),)
    fill = True if mask is None else mask[:, None]
    if keep == w + p:
        buffers, tail = claim(buffers, state.open_tail, w, keep)
        buffers[0][:, :, w:keep] = q
        buffers[1][:, :, w:keep] = k
        buffers[2][:, :, w:keep, :-1] = v
        buffers[2][:, :, w:keep, -1] = 1.0
        if masked:
            buffers[3][:, :, w:keep] = fill
        return tuple(b[:, :, :keep] for b in buffers), buffers, tail
    v1 = torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)
    piece = [q, k, v1]
    if masked:
        piece.append(torch.ones_like(buffers[3][:, :, :p]) if mask is None else fill)
    work = tuple(torch.cat([b[:, :, :w], x], dim=2) for b, x in zip(buffers, piece))
    kept = tuple(b.new_zeros(b.shape) for b in buffers)
    for buffer, tokens in zip(kept, work):
        buffer[:, :, :keep] = tokens[:, :, w + p - keep :]
    return work, kept, Tail(keep)


def _real_window(state: NystromState) -> Tensor:
    """(B, 1, s) real-token flags of the kept tokens (all real for a state without)."""
    if state.open_real is not None:
        return state.open_real
    b, _, s, _ = state.k_open.shape
    real = torch.zeros(b, 1, s, dtype=torch.bool, device=state.k_open.device)
    real[:, :, : state.open_len] = True
    return real


def _step_piece(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, state: NystromState,
    first: tuple[int | None, ...] | None, scale: float,
) -> tuple[Tensor, NystromState]:
    """At most s new tokens (B, H, p, ·) against ``state``: outputs and the new state.

    The working tokens are the kept ones followed by the piece (at most 2s − 1, so at most
    three segments of any row). Each new query attends exactly to the real tokens of its
    own segment up to itself, and through its landmark to every finished segment of its
    row: those stored in the state, and those finished inside the working tokens.
    """
    s = state.k_open.shape[2]
    bsz, _, p, _ = q.shape
    c, w = state.length, state.open_len
    dev, inf = q.device, float("-inf")
    old = [(c - f) // s for f in row_phases(first, bsz, s, c)]  # landmarks stored per row
    phases = row_phases(first, bsz, s, c + p)
    new = [(c + p - f) // s for f in phases]
    keep = max((c + p - f) % s for f in phases)
    base = [(c - w - f) // s for f in phases]  # segment of the first working token
    spans = max((c + p - 1 - f) // s - g for f, g in zip(phases, base)) + 1

    work, kept, open_tail = _working_tokens(state, q, k, v, mask, keep)
    qw, kw, vw = work[:3]
    real = work[3][:, 0] if len(work) == 4 else None  # (B, L)
    length = w + p
    # local part: the query's own segment, keys up to itself, real keys only
    causal = torch.arange(length, device=dev)[None, :] <= torch.arange(w, length, device=dev)[:, None]
    seg = None  # one segment per row (decoding, unpadded): no per-row segment indices
    seen = causal[None]
    if spans > 1:
        seg = _segment_of(torch.arange(c - w, c + p, device=dev), phases, base, s)  # (B|1, L)
        seen = (seg[:, w:, None] == seg[:, None, :]) & causal
    if real is not None:
        seen = seen & real[:, None, :]
    local = (scale * q @ kw.transpose(-1, -2)).masked_fill(~seen[:, None], inf)

    # far part: the row's stored landmarks, then those finished in the working tokens
    logits, sums = [], []
    if state.landmarks:
        a = state.landmarks
        far = scale * q @ state.land_k[:, :, :a].transpose(-1, -2) + state.land_c[:, :, None, :a]
        if min(old) < a:  # rows a landmark behind: mask the slot they have not filled
            stored = torch.arange(a, device=dev)[None, :] < torch.tensor(old, device=dev)[:, None]
            far = far.masked_fill(~stored[:, None, None, :], inf)
        logits.append(far)
        sums.append(state.land_x[:, :, :a])
    fresh = [(row, j) for row in range(bsz) for j in range(old[row], new[row])]
    if fresh:
        slot = torch.arange(spans, device=dev)
        if seg is None:
            member = torch.ones(1, 1, length, dtype=torch.bool, device=dev)
        else:
            member = seg[:, None, :] == slot[None, :, None]  # (B|1, R, L)
        member = member.expand(bsz, -1, -1) if real is None else member & real[:, None, :]
        k_land, c_land, x_land = _new_landmarks(member, qw, kw, vw, scale)
    if fresh and seg is not None:  # queries after a segment finished here see its landmark
        unstored = (slot[None, :] + torch.tensor(base, device=dev)[:, None]) >= torch.tensor(
            old, device=dev
        )[:, None]  # (B, R)
        sees = (slot[None, None, :] < seg[:, w:, None]) & unstored[:, None, :]  # (B, p, R)
        far = scale * q @ k_land.transpose(-1, -2) + c_land[:, :, None, :]
        logits.append(far.masked_fill(~sees[:, None], inf))
        sums.append(x_land)
    far = x_far = None
    if logits:
        far = logits[0] if len(logits) == 1 else torch.cat(logits, dim=-1)
        x_far = sums[0] if len(sums) == 1 else torch.cat(sums, dim=-2)
    out = zero_padded_queries(_combine(local, vw, far, x_far), mask)

    land = (state.land_k, state.land_c, state.land_x)
    land_tail = state.land_tail
    if fresh:
        land, land_tail = claim(
            land, state.land_tail, max(old), max(new), mark=_mark(old), new_mark=_mark(new)
        )
        rows = torch.tensor([row for row, _ in fresh], device=dev)
        slots = torch.tensor([j for _, j in fresh], device=dev)
        rel = torch.tensor([j - base[row] for row, j in fresh], device=dev)
        for buffer, value in zip(land, (k_land, c_land, x_land)):
            buffer[rows, :, slots] = value[rows, :, rel]
    state = dataclasses.replace(
        state, q_open=kept[0], k_open=kept[1], v_open=kept[2], open_len=keep,
        open_tail=open_tail, open_real=kept[3] if len(kept) == 4 else None,
        land_k=land[0], land_c=land[1], land_x=land[2], landmarks=max(new),
        land_tail=land_tail, length=c + p, first=first,
    )
    return out, state


def nystrom_step(
    q: Tensor, k: Tensor, v: Tensor, state: NystromState, scale: float,
    attention_mask: Tensor | None = None,
) -> tuple[Tensor, NystromState]:
    """Outputs of T new tokens (compute dtype) and the new state; ``state`` is unchanged.

    The tokens are taken in pieces of at most s; each piece attends exactly to its row's
    open segment up to itself and to every finished segment of its row through its
    landmark, as in the parallel call (segments of a row start at its first real token).
    ``attention_mask`` (B, T), True = real: padded tokens join no segment's landmark and
    no query's keys, and get output 0.
    """
    s = state.k_open.shape[2]
    first = _first_real(state, attention_mask, q.shape[0])
    outs, i, t = [], 0, q.shape[2]
    while i < t:
        take = min(t - i, s)
        mask = None if attention_mask is None else attention_mask[:, i : i + take]
        cut = slice(i, i + take)
        out, state = _step_piece(
            q[:, :, cut], k[:, :, cut], v[:, :, cut], mask, state, first, scale
        )
        outs.append(out)
        i += take
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
    # bidirectional calls may derive the segment size from N (num_landmarks): causal only
    packed_modes = ("causal",)

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

    def step(
        self, q: Tensor, k: Tensor, v: Tensor, state: NystromState,
        attention_mask: Tensor | None = None,
    ):
        """``(out, new_state)`` for T new tokens (B, H, T, D), equal to the parallel causal
        call; ``state`` itself is left unchanged (it can be stepped again).
        ``attention_mask`` (B, T), True = real: as the parallel call with the same mask
        (each row segmented from its first real token; padding adds nothing)."""
        check_step(self.name, q, k, v, state, NystromState, _state_dims, attention_mask)
        work = state.k_open.dtype
        scale = 1.0 / math.sqrt(q.shape[-1]) if self.scale is None else self.scale
        out, state = nystrom_step(
            q.to(work), k.to(work), v.to(work), state, scale, attention_mask
        )
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
