"""The certificate of an iterate: the reach count, the general a posteriori bound and the
sharp bound for square A, the Penrose residual, and the deferred certificate of a
fixed-count call (computed when its :class:`~formerlab.linalg.pinv.PinvInfo` is first read).
The iterations it certifies are those of :mod:`~formerlab.linalg.pinv.iteration`.

From Z₀ = αAᵀ every iterate is a polynomial in AᵀA times Aᵀ, so it shares A's singular
vectors: a singular value σ of A appears in Z_k as f_k(σ)/σ, where f₀ = ασ² and
1 − f_{k+1} = g(1 − f_k) with g(e) = eᵖ (¾e³ + ¼e⁴ for ``order=3``); all of this converges
to A⁺ whenever 0 < α < 2/σ_max² (Ben-Israel & Greville, ch. 7; Pan & Schreiber 1991).

**Target.** ``rcond`` (default :func:`~formerlab.linalg.pinv.default_rcond`: max(m, n)·ε of the compute dtype, the
cut-off of ``torch.linalg.pinv``) defines the target T = A⁺_rcond: the pseudoinverse of A
keeping the singular values σ >= rcond·σ_max and dropping the others.

**Certificate and bound.** A matrix is *converged* when all of these hold for the returned Z:

1. *reach*: every kept σ is past half-way, |1 − f_k(σ)| <= ½. Either k >= K, the reach
   count, which follows from the initial scale alone: with a certain lower bound σ_lo <=
   σ_max (power iteration) and upper bound σ_hi >= σ_max (norms of (AAᵀ)⁸), every kept σ
   starts with |1 − ασ²| <= e₀ = max(1 − α(rcond·σ_lo)², ασ_hi² − 1), and |1 − f_k| <=
   gᵏ(e₀) (g is increasing and |g(e)| <= g(|e|) on [−1, 1]); K is ``info.reach``. Or,
   observed, ‖I − AZ‖_F <= ½ (A of full row rank: every eigenvalue f of AZ is within ½
   of 1) — this certifies well-conditioned matrices long before K;
2. *gap*: ‖Z‖₂·rcond·σ_hi <= ½ (‖Z‖₂ bounded above the same way), so every dropped σ has
   f_k(σ) = σ·(f_k(σ)/σ) <= ½: none of them has been inverted;
3. *bound*: ``info.bound`` <= ``tol``, with

       ‖Z − T‖_F / ‖T‖_F  <=  bound = 2w / (‖Z‖_F − 2w) + ρ + u_out,   w = ‖Z − ZAZ‖_F.

   In exact arithmetic ‖Z − T‖_F <= 2w: Z − ZAZ has the singular values f(1 − f)/σ, the
   error has (1 − f)/σ on kept (f >= ½ by 1.) and f/σ on dropped values (1 − f >= ½ by
   2.), and ‖T‖_F >= ‖Z‖_F − ‖Z − T‖_F. ρ = 2√(k·(m + n))·u (u = unit roundoff of the
   compute dtype) is a first-order allowance for the rounding that w does not see (the
   blocks of Z − T between kept and dropped singular vectors, which accumulate about u
   per iteration without amplification) and for computing w; u_out is the rounding of the
   output dtype (plus, where entries fall into its subnormal range, their absolute error).
   Tests check the bound against float64 ``torch.linalg.pinv(A, rtol=rcond)`` on
   matrices with prescribed singular values (condition 1 … 10¹²), scales 10⁻³⁰ … 10³⁰,
   float16 … float64, rank-deficient and rectangular.

**Sharp bound (square A).** With E = I − AZ and ‖E‖₂ < 1, AZ and A are invertible and
A⁻¹ = Z(AZ)⁻¹ = Z(I − E)⁻¹, so exactly Z − A⁻¹ = −ZE(I − E)⁻¹ and

    ‖Z − A⁻¹‖_F  <=  ‖Z − ZAZ‖_F / (1 − ‖E‖₂)

whatever produced Z (no reach count, no initial scale: the spectrum of AZ alone). A⁻¹ is the
target when every singular value is kept: σ_min >= (1 − ‖E‖₂)/‖Z‖₂ >= rcond·σ_hi. Computed
in float64: e = ‖fl(I − AZ)‖_F + γ̃_n‖A‖_F‖Z‖_F >= ‖E‖₂ (required <= ½), d = (‖fl(Z −
ZAZ)‖_F/‖Z‖_F + ν)/(1 − e) and the bound d/(1 − d) (as ‖T‖_F >= ‖Z‖_F − ‖Z − T‖_F), with
the rounding allowance ν = ``SHARP_NOISE``·u₆₄·(√n + ‖A‖_F‖Z‖_F/n). Rounding makes the
computed residual of a float64 iterate noisy at about u‖A‖_F‖Z‖_F/n (relative): its errors
are not aligned with the top singular vectors of Z, so they are not amplified by ‖Z‖₂ as the
worst case γ̃_n‖A‖_F‖Z‖₂ of w above assumes — the factor ~n^1.5 that made the bound above
10³ × the error of ordinary float64 matrices. A backward-stable float64 pseudoinverse (such as
``torch.linalg.pinv``) is itself that far from A⁻¹: measured up to 14 units of u·(√n +
‖A‖_F‖Z‖_F/n) for sizes 3 … 128 and condition 1 … 10¹² (most of it at n <= 8), which ν covers
with a margin of 2.3, so the bound holds against such a reference too; it is a rounding model
(as γ̃ is), checked by property tests, not a worst-case proof. For a float32 iterate ν is
negligible (the residual is float64) and the bound is the exact-arithmetic one, 1.0 … 3.2 ×
the true error. Where both bounds apply the certificate takes the smaller. Measured
bound/true error (``python -m formerlab.bench.pinv_study 16 64 128``): float64, condition
1 … 10⁸, n = 16 … 128: 3.4 … 96 (medians 5 … 25); n = 4: up to ~1.3·10³ (the realised error
of a 4 × 4 matrix can be a lucky 10⁻¹⁷); float32, condition 1 … 10⁴: 1.0 … 3.2.

A singular value within a small factor above the cut-off fails 2., one below it (but not far
below) keeps w large: such matrices honestly do not converge — no iteration can separate
singular values on both sides of a cut-off it cannot see.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from formerlab.linalg.numerics import autocast_off, compute_dtype
from formerlab.linalg.pinv.info import PinvInfo
from formerlab.linalg.pinv.inits import (
    _fro,
    binary_exponent,
    initial_scale,
    scale_pow2,
    spectral_norm_estimate,
    spectral_norm_upper,
)
from formerlab.linalg.pinv.options import unit_roundoff

GAP = 0.5  # the gap certificate: every dropped singular value has f <= GAP
_NEVER = 2**62  # reach count of a matrix that cannot be certified
# the rounding allowance of the sharp bound, in units of u·(√n + ‖A‖_F‖Z‖_F/n) (module docs):
# measured, float64 torch.linalg.pinv is within 0.5 … 14 of these units of the exact A⁻¹
SHARP_NOISE = 32.0


def _next_log_error(L: Tensor, order: int) -> Tensor:
    """log|e| ↦ log g(|e|) for the error map g of ``order`` (accurate for e near 1)."""
    if order == 3:  # ¾e³ + ¼e⁴ = e³(1 − ¼(1 − e))
        return 3.0 * L + torch.log1p(0.25 * torch.expm1(L))
    return order * L


def reach_count(
    alpha: Tensor, sigma_lo: Tensor, sigma_hi: Tensor, rcond: float, order: int, limit: int
) -> Tensor:
    """K per matrix: the first k with |1 − f_k(σ)| <= ½ for every σ in [rcond·σ_max, σ_max].

    ``alpha``, ``sigma_lo`` <= σ_max <= ``sigma_hi`` per matrix; ``_NEVER`` where no k <=
    ``limit`` is certain (e.g. ασ_hi² >= 2, or a zero matrix).
    """
    a = alpha.flatten().double()
    delta = (a * (rcond * sigma_lo.double()).square()).clamp(max=1.0)
    beta = a * sigma_hi.double().square()
    over = torch.where(beta > 1, torch.log((beta - 1).clamp(min=1e-300)), -math.inf)
    L = torch.maximum(torch.log1p(-delta), over)
    K = torch.full_like(a, float(_NEVER))
    half = math.log(0.5)
    for k in range(limit + 1):
        K = torch.where((L <= half) & (K == _NEVER) & (beta < 2), float(k), K)
        L = _next_log_error(L, order)
    return K.long()


def _rounding_allowance(k: Tensor, m: int, n: int, dtype: torch.dtype) -> Tensor:
    return 2.0 * torch.sqrt(k.double().clamp(min=1) * (m + n)) * unit_roundoff(dtype)


def certify(
    a: Tensor, Z: Tensor, k: Tensor, reach: Tensor, sigma_hi: Tensor, rcond: float
) -> Tensor:
    """The bound of the module docs for iterates Z (b, n, m) of a (b, m, n) after k
    iterations; inf where the reach or gap condition fails. In float64, shape (b,)."""
    with torch.no_grad():
        m, n = a.shape[-2:]
        zero = _fro(a) == 0  # A = 0: Z = 0 is exact
        z_hi = spectral_norm_upper(Z.mT)
        gap_ok = z_hi * rcond * sigma_hi.double() <= GAP
        # w in float64, plus what its own rounding can hide: the iteration's fixed point
        # makes the *computed* residual vanish, so a float64 iterate's rounding shows up
        # only through fl(AZ) = AZ + E, |E| <~ γ̃_n|A||Z| (and likewise for Z·X), with the
        # probabilistic γ̃_n = 2√n·u of Higham & Mary (2019) instead of the worst case n·u
        Zd, ad = Z.double(), a.double()
        Xd = ad @ Zd
        zf = _fro(Zd)
        u = unit_roundoff(torch.float64)
        gamma_n, gamma_m = 2 * math.sqrt(n) * u, 2 * math.sqrt(m) * u
        hidden = gamma_n * _fro(ad) * z_hi * zf + gamma_m * zf * _fro(Xd) + u * zf
        w_raw = _fro(Zd - Zd @ Xd)  # ‖Z − ZAZ‖_F as computed
        w = w_raw + hidden
        rel = torch.where(zf > 2 * w, 2 * w / (zf - 2 * w), math.inf)
        # rounding in the blocks of Z − T between kept and dropped / null directions
        # is invisible to w and amplified up to κ while the small values grow; those
        # blocks are empty when A is square and ‖I − AZ‖_F <= ½ (no dropped values)
        eye = torch.eye(m, dtype=torch.float64, device=a.device)
        e_raw = _fro(eye - Xd)  # ‖I − AZ‖_F as computed
        settled = e_raw <= 0.5  # every eigenvalue f of AZ within ½ of 1
        full = (m == n) & settled
        kappa = z_hi * sigma_hi.double()
        unseen = 2 * math.sqrt(m + n) * unit_roundoff(a.dtype) * kappa
        bound = rel + _rounding_allowance(k, m, n, a.dtype) + torch.where(full, 0.0, unseen)
        ok = ((k >= reach) | settled) & gap_ok & torch.isfinite(bound)
        bound = torch.where(ok, bound, math.inf)
        if m == n:  # both are upper bounds: keep the smaller
            sharp = _sharp_bound(_fro(ad) * zf, n, w_raw / zf, e_raw, kappa, rcond)
            bound = torch.minimum(bound, sharp)
        bound = torch.where(zero & (zf == 0), 0.0, bound)
    return bound


def _sharp_bound(
    kappa_f: Tensor, n: int, w_rel: Tensor, e_raw: Tensor, kappa_hi: Tensor, rcond: float
) -> Tensor:
    """The a posteriori bound of a square (n × n) A from the spectrum of AZ (module docs),
    from float64 quantities computed by :func:`certify`: κ_F = ‖A‖_F‖Z‖_F, w_rel =
    ‖fl(Z − ZAZ)‖_F/‖Z‖_F, e_raw = ‖fl(I − AZ)‖_F and κ_hi = ‖Z‖₂·σ_hi (upper bounds); inf
    where ‖I − AZ‖₂ may exceed ½ or a singular value may be below the cut-off."""
    u = unit_roundoff(torch.float64)
    # ‖E‖₂ <= ‖fl(I − AZ)‖_F + γ̃_n‖|A||Z|‖_F (the rounding of fl(AZ), γ̃_n = 2√n·u)
    e_hi = e_raw + 2 * math.sqrt(n) * u * kappa_f
    # the rounding allowance SHARP_NOISE·u·(√n + ‖A‖_F‖Z‖_F/n) (module docs)
    allowance = SHARP_NOISE * u * (math.sqrt(n) + kappa_f / n)
    d = (w_rel + allowance) / (1 - e_hi)  # >= ‖Z − A⁻¹‖_F/‖Z‖_F
    # every singular value kept: σ_min(A) >= (1 − ‖E‖₂)/‖Z‖₂ >= rcond·σ_max
    ok = (e_hi <= GAP) & (1 - e_hi >= rcond * kappa_hi) & (d < 1)
    return torch.where(ok, d / (1 - d).clamp(min=1e-300), math.inf)


def _penrose(a: Tensor, Z: Tensor) -> Tensor:
    r = _fro(torch.baddbmm(a, a @ Z, a, beta=-1.0))
    a_norm = _fro(a)
    return torch.where(a_norm > 0, r / a_norm.clamp(min=torch.finfo(a.dtype).tiny), r)


def reach_and_upper_norm(
    ad: Tensor, init: str, rcond: float, order: int, limit: int
) -> tuple[Tensor, Tensor]:
    """The reach count K (up to ``limit``) and σ_hi >= σ_max of a normalised (b, m, n)
    batch: the two inputs of :func:`certify` that depend on A alone."""
    with torch.no_grad():
        sigma_hi = spectral_norm_upper(ad)
        alpha = initial_scale(ad, init)
        return reach_count(alpha, spectral_norm_estimate(ad), sigma_hi, rcond, order, limit), sigma_hi


def _settle(
    raw: dict, Z_64: Tensor, Z: Tensor, e: Tensor, unrep: Tensor, dtype: torch.dtype, tol: float
) -> None:
    """Complete raw's certificate: run a pending one, then add the output rounding to
    raw["bound"] (inf where the output overflows) and update raw["converged"]."""
    with torch.no_grad():
        certificate = raw.pop("certificate", None)
        if certificate is not None:
            raw["bound"], raw["reach"] = certificate()
            raw["converged"] = (raw["bound"] <= tol) & ~raw["diverged"]
        finfo = torch.finfo(dtype)
        # entries in the subnormal range carry an absolute error up to half its spacing
        spacing = finfo.tiny * finfo.eps
        mag = Z_64.abs()
        n_sub = ((mag < finfo.tiny) & (mag > 0)).flatten(-2).sum(-1).double()
        zf = _fro(Z).double()
        sub = scale_pow2(
            (n_sub.sqrt() * spacing / 2 / zf.clamp(min=1e-300))[:, None, None], e
        )[:, 0, 0]
        sub = torch.where(n_sub > 0, sub, 0.0)
        u_out = unit_roundoff(dtype)
        bound = raw["bound"] + u_out * (1 + raw["bound"]) + sub
        raw["bound"] = torch.where(unrep, math.inf, bound)
        raw["converged"] = raw["converged"] & (raw["bound"] <= tol)


def _make_info(
    a: Tensor, Z: Tensor, raw: dict, fallback: Tensor, unrep: Tensor, init: str, order: int,
    tol: float, rcond: float, batch: tuple[int, ...], settle: Callable[[], None] | None,
) -> PinvInfo:
    """The PinvInfo of a call; ``settle`` given: the certificate is still pending in raw."""
    a, Z = a.detach(), Z.detach()

    def certificate() -> tuple[Tensor, Tensor, Tensor, Tensor]:
        with autocast_off(a.device):  # read later, perhaps inside the caller's autocast
            if settle is not None:
                settle()
            return _penrose(a, Z), raw["converged"], raw["bound"], raw["reach"]

    known = certificate() if torch.compiler.is_compiling() else (None,) * 4
    penrose, converged, bound, reach = known
    return PinvInfo(
        raw["iterations"], raw["residual"], penrose, converged, raw["diverged"],
        raw["stagnated"], fallback, init, order, tol, {"diverged_at": raw["diverged_at"]},
        bound, reach, unrep, rcond,
        certificate=None if torch.compiler.is_compiling() else certificate,
    ).reshape(batch)


def penrose_residual(A: Tensor, Z: Tensor) -> Tensor:
    """‖AZA − A‖_F/‖A‖_F per matrix of a batch (0 where A = 0), in the compute dtype."""
    work = compute_dtype(A.dtype)
    a = A.to(work).reshape(-1, *A.shape[-2:])
    z = Z.to(work).reshape(-1, *Z.shape[-2:])
    e = binary_exponent(a)
    return _penrose(scale_pow2(a, -e), scale_pow2(z, e)).reshape(A.shape[:-2])
