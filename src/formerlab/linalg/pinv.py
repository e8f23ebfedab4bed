"""Iterative Moore–Penrose pseudoinverse for batches of matrices, with a certified error bound.

Iterations (E = I − AZ is the error of the current iterate Z):

* ``order=2`` — Newton–Schulz (Ben-Israel 1965): Z ← Z(2I − AZ); E ← E².
* ``order=3`` — Razavi et al. (2014), used by Nyströmformer (Xiong et al. 2021, eq. 13):
  Z ← ¼ Z(13I − AZ(15I − AZ(7I − AZ))); E ← ¾E³ + ¼E⁴; 4 matmuls per iteration.
* ``order=p`` (p >= 4) — hyperpower (Ben-Israel & Greville, *Generalized Inverses*, ch. 7):
  Z ← Z Σᵢ₌₀..ₚ₋₁ (I − AZ)ⁱ (Horner form); E ← Eᵖ; p matmuls per iteration.

From Z₀ = αAᵀ every iterate is a polynomial in AᵀA times Aᵀ, so it shares A's singular
vectors: a singular value σ of A appears in Z_k as f_k(σ)/σ, where f₀ = ασ² and
1 − f_{k+1} = g(1 − f_k) with g(e) = eᵖ (¾e³ + ¼e⁴ for ``order=3``); all of this converges
to A⁺ whenever 0 < α < 2/σ_max² (Ben-Israel & Greville, ch. 7; Pan & Schreiber 1991).

**Target.** ``rcond`` (default :func:`default_rcond`: max(m, n)·ε of the compute dtype, the
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

**Scale.** A is divided by 2^e (e the binary exponent of max|A|, ``torch.frexp``) before the
iteration — exact, so every norm is O(1) in any dtype — and Z is multiplied by 2^−e after
(in float64). A result that overflows the output dtype is a failure (``on_fail``), never an
inf with a success flag.

Initial scale α, computed **per matrix** (``init``):

* ``"razavi"``: α = 1/(‖A‖₁‖A‖∞) (σ_max² <= ‖A‖₁‖A‖∞);
* ``"frobenius"``: α = 1/‖A‖_F²;
* ``"spectral"``: α = 1/(1.05·σ̂²), σ̂ from 8 power iterations on AᵀA (σ̂ <= σ_max, so
  AZ₀ has eigenvalues <= 1/1.05·σ_max²/σ̂², below 2 unless σ̂ is off by 27 %);
* ``"global"``: α = 1/(maxᵦ‖Aᵦ‖₁ · maxᵦ‖Aᵦ‖∞), one scale for the whole batch as in the
  public Nyströmformer implementations. It warns; kept only to reproduce their failure: in a
  batch whose matrices differ in scale, the small ones start with eigenvalues of AZ₀ orders
  of magnitude below 1 and get nowhere in a fixed number of iterations (the power-of-two
  normalisation is per matrix, so it is undone for this init);
* ``"auto"``: :data:`AUTO_INIT` — the measured choice (see ``formerlab pinv-study`` and
  the README): the fewest matmuls of the safe inits on row-softmax and random matrices.

Stopping (``iters=None``): iterate until converged (above). The relative step
``‖Z_k − Z_{k−1}‖_F / ‖Z_k‖_F`` is reported as ``residual``; in floating point it stops
falling at a level set by rounding (about u·κ). Once k >= K and the step has not halved in
3 iterations, the matrix has *stagnated*: it stops and returns its best iterate (smallest
certified bound, else smallest step if that fell below 1e-2, else the last one) with
``converged=False`` instead of looping to
``max_iter``. Divergence (non-finite values, or ‖AZ‖_F > 2√m, impossible for a valid
iterate) is detected at the iteration where it happens; the last valid iterate is kept.
With ``iters`` given, exactly that many iterations run (early stop once converged if ``tol``
is given too) and ``converged`` is the same certificate for the last iterate: a truncated
iteration is not a failure, but it is not called converged unless it is. As nothing is
decided by it, that certificate is computed when ``info`` first reads it (see
:class:`PinvInfo`), from detached copies of the call's matrices.

Backward. ``"unroll"`` differentiates through the iterations; ``"implicit"`` (only when
iterating to tolerance) runs them without autograd and uses the derivative of the
pseudoinverse at the result (Golub & Pereyra 1973, Thm. 4.3): dA⁺ = −A⁺dA A⁺ +
A⁺A⁺ᵀdAᵀ(I − AA⁺) + (I − A⁺A)dAᵀA⁺ᵀA⁺, memory independent of the iteration count (exact for
a locally constant rank with the dropped singular values 0). With a fixed ``iters`` the
returned Z is a truncated iterate, not A⁺, and this formula would be the derivative of a
different function, so that combination raises a ``ValueError``.
"""

from __future__ import annotations

import contextlib
import functools
import math
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor

from formerlab.errors import check_choice, check_positive_float, check_positive_int
from formerlab.linalg.numerics import autocast_off, compute_dtype, relative_step

INITS = ("auto", "razavi", "frobenius", "spectral", "global")
ON_FAIL = ("raise", "warn", "exact")
BACKWARDS = ("unroll", "implicit")
REG_METHODS = ("tikhonov", "tsvd")
AUTO_INIT = "razavi"
SPECTRAL_MARGIN = 1.05
SPECTRAL_POWER_STEPS = 8
PATIENCE = 3
GAP = 0.5  # the gap certificate: every dropped singular value has f <= GAP
_NEVER = 2**62  # reach count of a matrix that cannot be certified
_CANDIDATE_STEP = 0.5  # the certificate is computed only once the step is below this
_ASYMPTOTIC = 1e-2  # a relative step below this means the iteration is past its slow start
# the rounding allowance of the sharp bound, in units of u·(√n + ‖A‖_F‖Z‖_F/n) (module docs):
# measured, float64 torch.linalg.pinv is within 0.5 … 14 of these units of the exact A⁻¹
SHARP_NOISE = 32.0


def default_tol(dtype: torch.dtype) -> float:
    """Default tolerance on the certified bound: float64 1e-8, float32 1e-5, and for
    float16 / bfloat16 8× their unit roundoff (the output rounding alone is one unit).

    float64: for a rectangular or rank-deficient A the rounding allowance of the bound is
    ~√n·u·κ, 1e-10 … 1e-9 for matrices of condition ~10⁵ whose actual error is ~1e-12, so a
    tighter default would refuse them (a square A gets the sharp bound, within ~100× of its
    error: module docs)."""
    work = compute_dtype(dtype)
    if work == torch.float64:
        return 1e-8
    if dtype in (torch.float16, torch.bfloat16):
        return 8 * unit_roundoff(dtype)
    return 1e-5


def default_rcond(dtype: torch.dtype, m: int, n: int) -> float:
    """Default cut-off max(m, n)·ε of the compute dtype (``torch.linalg.pinv``'s rule)."""
    return max(m, n) * torch.finfo(compute_dtype(dtype)).eps


def unit_roundoff(dtype: torch.dtype) -> float:
    """u = ε/2, the relative rounding error of round-to-nearest in ``dtype``."""
    return torch.finfo(dtype).eps / 2


def matmuls_per_iteration(order: int) -> int:
    """Matrix products one iteration of ``order`` costs (AZ included)."""
    return 4 if order == 3 else order


def growth_factor(order: int) -> float:
    """Factor by which a small eigenvalue of AZ grows per iteration (3.25 for Razavi, p)."""
    return 3.25 if order == 3 else float(order)


class PinvError(RuntimeError):
    """Raised by ``pinv(..., on_fail="raise")``; ``.info`` holds the diagnostics."""

    def __init__(self, message: str, info: PinvInfo) -> None:
        super().__init__(message)
        self.info = info


class PinvInfo:
    """Diagnostics of one ``pinv`` call; tensors have the batch shape of A.

    Attributes:
        iterations: iterations that produced the returned Z (long).
        residual: relative step ‖Z_k − Z_{k−1}‖_F/‖Z_k‖_F into the returned iterate
            (1.0 for Z₀; 0 for a zero matrix).
        penrose: ‖AZA − A‖_F/‖A‖_F of the returned Z.
        converged: the certificate holds and ``bound`` <= tol (module docs).
        diverged: non-finite values or ‖AZ‖_F > 2√m appeared; Z is the last valid iterate.
        stagnated: stopped because the step stopped falling before convergence.
        fallback: replaced by ``torch.linalg.pinv`` (``on_fail="exact"``).
        bound: certified bound on ‖Z − A⁺_rcond‖_F/‖A⁺_rcond‖_F where reach and gap hold,
            inf elsewhere (module docs).
        reach: the reach count K (a huge number where it cannot be certified).
        unrepresentable: the result overflows the output dtype.
        init, order, tol, rcond: the resolved settings.
        extra: ``"diverged_at"``: the iteration at which divergence was detected (-1 if not).

    ``certificate``, instead of penrose, converged, bound and reach: a function returning
    them, run on first access. A fixed iteration count does not need them to decide
    anything, and they cost more than the iterations themselves (~5 of ~10 ms for 4
    landmark matrices of 64 × 64), while a training loop reads them once per log interval.
    """

    def __init__(
        self, iterations: Tensor, residual: Tensor, penrose: Tensor | None,
        converged: Tensor | None, diverged: Tensor, stagnated: Tensor, fallback: Tensor,
        init: str, order: int, tol: float, extra: dict | None = None,
        bound: Tensor | None = None, reach: Tensor | None = None,
        unrepresentable: Tensor | None = None, rcond: float | None = None, *,
        certificate: Callable[[], tuple[Tensor, Tensor, Tensor, Tensor]] | None = None,
    ) -> None:
        self.iterations, self.residual = iterations, residual
        self.diverged, self.stagnated, self.fallback = diverged, stagnated, fallback
        self.init, self.order, self.tol, self.rcond = init, order, tol, rcond
        self.extra = {} if extra is None else extra
        self.unrepresentable = unrepresentable
        self._certificate = certificate
        self._penrose, self._converged, self._bound, self._reach = penrose, converged, bound, reach

    def _settled(self) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
        if self._certificate is not None:
            with torch.no_grad():
                values = self._certificate()
            self._penrose, self._converged, self._bound, self._reach = values
            self._certificate = None
        return self._penrose, self._converged, self._bound, self._reach

    penrose = property(lambda self: self._settled()[0])
    converged = property(lambda self: self._settled()[1])
    bound = property(lambda self: self._settled()[2])
    reach = property(lambda self: self._settled()[3])

    @property
    def matmuls(self) -> Tensor:
        """Matrix products spent on iterations per matrix."""
        return self.iterations * matmuls_per_iteration(self.order)

    def summary(self) -> dict[str, float]:
        """Scalar summary for logging: mean/max iterations and residuals, fractions."""
        if self.residual.numel() == 0:
            return {}
        res = self.residual.detach().double()
        its = self.iterations.double()
        out = {
            "pinv_iterations": its.mean().item(),
            "pinv_iterations_max": its.max().item(),
            "pinv_residual": res.mean().item(),
            "pinv_residual_max": res.max().item(),
            "pinv_penrose": self.penrose.double().mean().item(),
            "pinv_converged": self.converged.double().mean().item(),
            "pinv_diverged": self.diverged.double().mean().item(),
        }
        if self.bound is not None:
            out["pinv_bound_max"] = self.bound.double().max().item()
        return out

    def reshape(self, shape: tuple[int, ...]) -> PinvInfo:
        """The same diagnostics with the batch dims reshaped to ``shape`` (a pending
        certificate stays pending)."""

        def r(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.reshape(shape)

        extra = {k: r(v) if isinstance(v, Tensor) else v for k, v in self.extra.items()}
        if self._certificate is not None:
            certificate, cert = (lambda: tuple(r(t) for t in self._settled())), (None,) * 4
        else:
            certificate, cert = None, tuple(r(t) for t in self._settled())
        penrose, converged, bound, reach = cert
        return PinvInfo(
            r(self.iterations), r(self.residual), penrose, converged, r(self.diverged),
            r(self.stagnated), r(self.fallback), self.init, self.order, self.tol, extra,
            bound, reach, r(self.unrepresentable), self.rcond, certificate=certificate,
        )

    def __getstate__(self) -> dict:
        """Pickling (``torch.save`` of a whole module keeps its last info) settles a
        pending certificate: the function itself is not picklable."""
        self._settled()
        return self.__dict__.copy()

    def __repr__(self) -> str:
        shown = "pending" if self._certificate is not None else f"bound={self._bound}"
        return (
            f"PinvInfo(iterations={self.iterations}, residual={self.residual}, "
            f"diverged={self.diverged}, {shown}, init={self.init!r}, order={self.order}, "
            f"tol={self.tol}, rcond={self.rcond})"
        )


# --------------------------------------------------------------------------- helpers


def in_given_dtypes(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Run ``fn(A, ...)`` with autocast off on A's device: the iteration, its certificate and
    the regularised solves stay in the compute dtype under ``torch.autocast`` too (autocast
    would run their products in bfloat16, where the tolerances mean nothing)."""

    @functools.wraps(fn)
    def run(A: Any, *args: Any, **kwargs: Any) -> Any:
        guard = autocast_off(A.device) if isinstance(A, Tensor) else contextlib.nullcontext()
        with guard:
            return fn(A, *args, **kwargs)

    return run


def check_matrix(A: Tensor, arg: str = "A") -> None:
    """``A`` must be a finite floating tensor of shape (..., m, n)."""
    if not isinstance(A, Tensor) or A.dim() < 2:
        shape = tuple(A.shape) if isinstance(A, Tensor) else type(A).__name__
        raise ValueError(f"{arg} must be a tensor of shape (..., m, n); got {shape}")
    if not A.is_floating_point():
        raise ValueError(f"{arg} must be floating point; got dtype {A.dtype}")
    finite = torch.isfinite(A)
    if not torch.compiler.is_compiling() and not bool(finite.all()):  # no graph break
        bad = int((~finite).flatten(-2).any(-1).sum())
        raise ValueError(f"{arg} has non-finite entries in {bad} matrices; expected finite values")


def check_order(order: int) -> int:
    """``order`` must be an integer >= 2."""
    return check_positive_int("order", order, minimum=2)


def check_rcond(rcond: float) -> float:
    """``rcond`` must be a float in (0, 1)."""
    value = check_positive_float("rcond", rcond)
    if value >= 1.0:
        raise ValueError(f"rcond={rcond!r} is not allowed; expected a float in (0, 1)")
    return value


def _safe_reciprocal(x: Tensor) -> Tensor:
    return torch.where(x > 0, 1.0 / x.clamp(min=torch.finfo(x.dtype).tiny), torch.zeros_like(x))


def _fro(x: Tensor) -> Tensor:
    return x.flatten(-2).norm(dim=-1)


def binary_exponent(A: Tensor) -> Tensor:
    """e per matrix of a (b, m, n) batch with max|A| = μ·2^e, μ in [0.5, 1) (0 for A = 0)."""
    _, e = torch.frexp(A.detach().abs().amax(dim=(-2, -1)))
    return e.long()


def scale_pow2(x: Tensor, e: Tensor) -> Tensor:
    """x·2^e per matrix of a (b, r, c) batch, exactly (two factors, so none overflows)."""
    half = torch.div(e, 2, rounding_mode="floor")
    two = torch.tensor(2.0, dtype=x.dtype, device=x.device)
    f1 = torch.pow(two, half.to(x.dtype))[:, None, None]
    f2 = torch.pow(two, (e - half).to(x.dtype))[:, None, None]
    return x * f1 * f2


def power_start(n: int, dtype: torch.dtype, device: torch.device | str | None = None) -> Tensor:
    """The fixed start vector (n,) of :func:`spectral_norm_estimate`: pseudo-random entries
    in [−0.5, 0.5) from a hash of the index, not a ``torch.Generator`` (which would break a
    ``torch.compile`` graph), so every call and every compiled graph sees the same vector."""
    i = torch.arange(1, n + 1, dtype=torch.float64, device=device)
    return (torch.frac(torch.sin(i * 12.9898) * 43758.5453) - 0.5).to(dtype)


def spectral_norm_estimate(A: Tensor, steps: int = SPECTRAL_POWER_STEPS) -> Tensor:
    """σ̂ <= σ_max(A) for each matrix of a (b, m, n) batch, by power iteration on AᵀA.

    The start vector is a fixed pseudo-random vector (deterministic results); the result
    is the larger of the Rayleigh quotient and the certain lower bound ‖A‖_F/√min(m, n).
    """
    b, m, n = A.shape
    v = power_start(n, A.dtype, A.device)
    v = (v / v.norm()).expand(b, n).unsqueeze(-1)
    for _ in range(steps):
        w = A.mT @ (A @ v)
        v = w * _safe_reciprocal(w.norm(dim=-2, keepdim=True))
    rayleigh = (A @ v).square().sum(dim=(-2, -1))
    lower = A.square().sum(dim=(-2, -1)) / min(m, n)
    return torch.maximum(rayleigh, lower).sqrt()


def spectral_norm_upper(A: Tensor, squarings: int = 3) -> Tensor:
    """A certain upper bound of σ_max(A) per matrix of a (b, m, n) batch, in float64.

    σ_max² = λ_max(M), M = AAᵀ (or AᵀA, the smaller), and λ_max <= ‖M^q‖_∞^(1/q) for every
    q; q = 2^squarings by repeated squaring (each square normalised, so nothing overflows),
    which is tight to a factor r^(1/q) (r = size of M). Capped by ‖A‖_F and widened for the
    rounding of the products.
    """
    M = A @ A.mT if A.shape[-2] <= A.shape[-1] else A.mT @ A
    r = M.shape[-1]
    c = M.abs().sum(-1).amax(-1)
    log_bound = torch.log(c.double())
    weight = 1.0
    for _ in range(squarings):
        M = M * _safe_reciprocal(c)[:, None, None]
        M = M @ M
        c = M.abs().sum(-1).amax(-1)
        weight /= 2
        log_bound = log_bound + weight * torch.log(c.double())
    lam = torch.exp(log_bound).nan_to_num(nan=0.0)
    lam = torch.minimum(lam, A.double().square().sum(dim=(-2, -1)))
    margin = 1 + 16 * (r + 1) * torch.finfo(A.dtype).eps
    return (lam * margin).sqrt()


def initial_scale(A: Tensor, init: str) -> Tensor:
    """α of the start Z₀ = αAᵀ for each matrix of a (b, m, n) batch, shape (b, 1, 1)."""
    absA = A.abs()
    if init == "razavi":
        bound = absA.sum(-2).amax(-1) * absA.sum(-1).amax(-1)
    elif init == "frobenius":
        bound = A.square().sum(dim=(-2, -1))
    elif init == "spectral":
        bound = SPECTRAL_MARGIN * spectral_norm_estimate(A).square()
    elif init == "global":
        # one scale for the whole batch (public Nyströmformer code): reproduces its failure
        bound = (absA.sum(-2).amax() * absA.sum(-1).amax()).expand(A.shape[0])
    else:
        raise ValueError(f"init={init!r} is not allowed; expected one of {list(INITS)}")
    return _safe_reciprocal(bound)[:, None, None]


def _step(Z: Tensor, X: Tensor, order: int, eye: Tensor) -> Tensor:
    """One iteration from Z with X = AZ (batched, 3-d)."""
    if order == 3:  # Razavi et al. (2014), the ¼ folded into the last factor
        t = 7.0 * eye - X
        t = torch.baddbmm(15.0 * eye, X, t, alpha=-1.0)
        t = torch.baddbmm(3.25 * eye, X, t, alpha=-0.25)
        return Z @ t
    e = eye - X  # hyperpower: Z · (I + E(I + E(… ))) with p terms
    s = eye + e
    for _ in range(order - 2):
        s = torch.baddbmm(eye, e, s)
    return Z @ s


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


# --------------------------------------------------------------------------- iteration


def pinv_iterates(A: Tensor, *, order: int = 3, init: str = "auto") -> Iterator[Tensor]:
    """Yield Z₀, Z₁, Z₂, … of the iteration for a (..., m, n) batch, without stopping.

    In the compute dtype (float32, or float64 for float64 input); A is normalised by a
    power of two inside, as in :func:`pinv`. Used for studies of the error per iteration
    (semi-convergence) and for sampled-row validation; the caller decides when to stop.
    Differentiable (unrolled).
    """
    check_matrix(A)
    check_order(order)
    init = AUTO_INIT if check_choice("init", init, INITS) == "auto" else init
    if init == "global":
        _warn_global()
    work = compute_dtype(A.dtype)
    m, n = A.shape[-2:]
    if m > n:
        for Z in pinv_iterates(A.mT, order=order, init=init):
            yield Z.mT
        return
    with autocast_off(A.device):  # not across the yields: the caller keeps its autocast
        a = A.to(work).reshape(-1, m, n)
        e = _exponent(a, init)
        a = scale_pow2(a, -e)
        eye = torch.eye(m, dtype=work, device=A.device)
        Z = initial_scale(a, init) * a.mT
    while True:
        yield scale_pow2(Z, -e).reshape(*A.shape[:-2], n, m)
        with autocast_off(A.device):
            Z = _step(Z, a @ Z, order, eye)


def _exponent(a: Tensor, init: str) -> Tensor:
    """The per-matrix power-of-two exponent (one for the batch with the global init)."""
    e = binary_exponent(a)
    return e.amax().expand_as(e).clone() if init == "global" and e.numel() else e


def _warn_global(stacklevel: int = 3) -> None:
    warnings.warn(
        'pinv init="global" uses one scale for the whole batch; matrices of smaller scale '
        'then barely move in a fixed number of iterations. Use init="razavi" or "auto".',
        stacklevel=stacklevel,
    )


def _iterate(
    a: Tensor, order: int, init: str, iters: int | None, tol: float, early_stop: bool,
    max_iter: int, rcond: float,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Run the iteration on a normalised (b, m, n) batch with m <= n.

    ``iters`` given: exactly that many steps (early stop once converged if ``early_stop``);
    else iterate until converged, stagnated, diverged or ``max_iter``.
    """
    b, m, n = a.shape
    dev = a.device
    eye = torch.eye(m, dtype=a.dtype, device=dev)
    steps = limit = max_iter if iters is None else iters
    ad = a.detach()
    check_each = iters is None or early_stop
    if check_each:  # the certificate decides when each matrix stops
        reach, sigma_hi = reach_and_upper_norm(ad, init, rcond, order, limit)
    Z = initial_scale(a, init) * a.mT
    X = a @ Z
    false = torch.zeros(b, dtype=torch.bool, device=dev)
    active, diverged, stagnated = ~false, false.clone(), false.clone()
    iterations = torch.zeros(b, dtype=torch.long, device=dev)
    diverged_at = torch.full((b,), -1, dtype=torch.long, device=dev)
    res = torch.where(_fro(ad) > 0, 1.0, 0.0).to(a.dtype)  # nothing known about Z₀
    inf = torch.full((b,), math.inf, dtype=torch.float64, device=dev)
    # a fixed count certifies its last iterate only (after the loop): skip Z₀'s bound
    bound = certify(ad, Z.detach(), iterations, reach, sigma_hi, rcond) if check_each else inf
    converged = bound <= tol
    best_Z, best_res, best_k, best_bound = Z, res.clone(), iterations.clone(), bound.clone()
    ref, since = res.clone(), iterations.clone()  # step at the last halving; iterations since
    x_limit = 2.0 * math.sqrt(m) * (1 + 1e-3)
    unguarded = None
    if not check_each and steps > 0 and not torch.compiler.is_compiling():
        unguarded = _unguarded(a, Z, X, order, eye, steps, x_limit)
    if unguarded is not None:  # every matrix ran all steps; the guarded loop has no work
        Z, res = unguarded
        iterations.fill_(steps)
        steps = 0
    for _ in range(steps):
        if check_each:
            active = active & ~converged
        # a compiled fixed-count run skips this data-dependent exit (no graph break): once
        # every matrix has stopped, the remaining steps change nothing
        if (check_each or not torch.compiler.is_compiling()) and not bool(active.any()):
            break
        Z_new = _step(Z, X, order, eye)
        X_new = a @ Z_new
        rd = relative_step(Z_new.detach(), Z.detach())
        bad = ~torch.isfinite(rd) | ~torch.isfinite(_fro(Z_new.detach()))
        bad |= ~(_fro(X_new.detach()) <= x_limit)
        diverged_at = torch.where(active & bad, iterations + 1, diverged_at)
        diverged |= active & bad
        take = active & ~bad
        t3 = take[:, None, None]
        Z = torch.where(t3, Z_new, Z)
        X = torch.where(t3, X_new, X)
        res = torch.where(take, rd, res)
        iterations += take.long()
        active = take
        candidate = take & (rd <= _CANDIDATE_STEP)
        if check_each and bool(candidate.any()):
            new_bound = certify(ad, Z.detach(), iterations, reach, sigma_hi, rcond)
            bound = torch.where(take, new_bound, bound)
            converged = converged | (take & (bound <= tol))
        elif check_each:
            bound = torch.where(take, inf, bound)
        if iters is None:
            # best iterate: smallest certified bound, else smallest step
            better = take & ((bound < best_bound) | (~torch.isfinite(best_bound) & (rd < best_res)))
            best_Z = torch.where(better[:, None, None], Z, best_Z)
            best_res = torch.where(better, rd, best_res)
            best_k = torch.where(better, iterations, best_k)
            best_bound = torch.where(better, bound, best_bound)
            past = iterations >= reach
            halved = rd <= 0.5 * ref
            ref = torch.where(~past | halved, rd, ref)
            since = torch.where(past & ~halved, since + 1, torch.zeros_like(since))
            stuck = take & ~converged & (since >= PATIENCE)
            stagnated |= stuck
            active = active & ~stuck
    if not check_each:  # fixed iteration count: the last iterate's certificate, on demand
        Z_last, k_last = Z.detach(), iterations.clone()

        def certificate() -> tuple[Tensor, Tensor]:
            reach, sigma_hi = reach_and_upper_norm(ad, init, rcond, order, limit)
            return certify(ad, Z_last, k_last, reach, sigma_hi, rcond), reach

        info = dict(
            iterations=iterations, residual=res.detach(), diverged=diverged,
            stagnated=stagnated, diverged_at=diverged_at, certificate=certificate,
        )
        return Z, info
    if iters is None:
        # the smallest step says something only once the iteration is past its slow start
        meaningful = torch.isfinite(best_bound) | (best_res < _ASYMPTOTIC)
        use_best = ~converged & meaningful
        u3 = use_best[:, None, None]
        Z = torch.where(u3, best_Z, Z)
        res = torch.where(use_best, best_res, res)
        iterations = torch.where(use_best, best_k, iterations)
        bound = torch.where(use_best, best_bound, bound)
    converged = (bound <= tol) & ~diverged
    info = dict(
        iterations=iterations, residual=res.detach(), converged=converged,
        diverged=diverged, stagnated=stagnated & ~converged, diverged_at=diverged_at,
        bound=bound, reach=reach,
    )
    return Z, info


def reach_and_upper_norm(
    ad: Tensor, init: str, rcond: float, order: int, limit: int
) -> tuple[Tensor, Tensor]:
    """The reach count K (up to ``limit``) and σ_hi >= σ_max of a normalised (b, m, n)
    batch: the two inputs of :func:`certify` that depend on A alone."""
    with torch.no_grad():
        sigma_hi = spectral_norm_upper(ad)
        alpha = initial_scale(ad, init)
        return reach_count(alpha, spectral_norm_estimate(ad), sigma_hi, rcond, order, limit), sigma_hi


def _unguarded(
    a: Tensor, Z: Tensor, X: Tensor, order: int, eye: Tensor, steps: int, x_limit: float
) -> tuple[Tensor, Tensor] | None:
    """``steps`` iterations without the per-step guards of the loop in :func:`_iterate`,
    checked all at once afterwards: (Z, last relative step), or None if any iterate of any
    matrix would have been rejected there (then the guarded loop reruns from Z₀).

    Same result as the guarded loop whenever it returns one (tested bit for bit), with
    fewer operations in the forward and no ``torch.where`` in the backward.
    """
    Zs, norms_x = [Z.detach()], []
    for _ in range(steps):
        Z = _step(Z, X, order, eye)
        X = a @ Z
        Zs.append(Z.detach())
        norms_x.append(_fro(X.detach()))
    with torch.no_grad():
        new, old = torch.stack(Zs[1:]), torch.stack(Zs[:-1])
        steps_rel = relative_step(new, old)  # (steps, b)
        good = torch.isfinite(steps_rel).all() & torch.isfinite(_fro(new)).all()
        good &= (torch.stack(norms_x) <= x_limit).all()
    return (Z, steps_rel[-1].to(Z.dtype)) if bool(good) else None


class _ImplicitPinv(torch.autograd.Function):
    """Identity on Z = A⁺ forward; backward by the analytic derivative of A⁺."""

    @staticmethod
    def forward(ctx, A: Tensor, Z: Tensor) -> Tensor:
        ctx.save_for_backward(A, Z)
        return Z.clone()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, G: Tensor) -> tuple[Tensor, None]:
        A, Z = ctx.saved_tensors
        Zt = Z.mT
        eye_m = torch.eye(A.shape[-2], dtype=A.dtype, device=A.device)
        eye_n = torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)
        # adjoint of dA ↦ −Z dA Z + Z Zᵀ dAᵀ (I − AZ) + (I − ZA) dAᵀ Zᵀ Z (Golub & Pereyra)
        grad = -Zt @ G @ Zt
        grad = grad + (eye_m - A @ Z) @ G.mT @ (Z @ Zt)
        grad = grad + (Zt @ Z) @ G.mT @ (eye_n - Z @ A)
        return grad, None


# --------------------------------------------------------------------------- public API


@in_given_dtypes
def pinv(
    A: Tensor,
    *,
    order: int = 3,
    init: str = "auto",
    iters: int | None = None,
    tol: float | None = None,
    rcond: float | None = None,
    max_iter: int = 100,
    backward: str = "unroll",
    on_fail: str = "raise",
    return_info: bool = False,
) -> Tensor | tuple[Tensor, PinvInfo]:
    """Moore–Penrose pseudoinverse of every matrix of a (..., m, n) batch by iteration.

    The target is A⁺_rcond, the pseudoinverse keeping the singular values >= rcond·σ_max;
    ``converged`` certifies ‖Z − A⁺_rcond‖_F/‖A⁺_rcond‖_F <= ``info.bound`` <= tol (module
    docs for the bound and its conditions).

    Args:
        A: (..., m, n) floating tensor, finite.
        order: 2 (Newton–Schulz), 3 (Razavi et al. 2014, Nyströmformer's) or p >= 4
            (hyperpower of order p).
        init: ``"auto"``, ``"razavi"``, ``"frobenius"``, ``"spectral"`` or ``"global"``
            (warns; reproduces a known failure) — see the module docs.
        iters: a fixed number of iterations. Reaching it is not a failure (a truncated
            iteration regularises, see ``formerlab approx``); with ``tol`` also given,
            matrices stop early once converged.
        tol: tolerance on the certified bound; default :func:`default_tol` of A's dtype.
        rcond: relative cut-off of the target in (0, 1); default :func:`default_rcond`.
        max_iter: cap on iterations when iterating to tolerance.
        backward: ``"unroll"`` (autograd through the iterations) or ``"implicit"``
            (analytic derivative of A⁺ at the result; memory independent of iterations;
            only with ``iters=None``, else a ``ValueError``).
        on_fail: for matrices that diverged, overflow the output dtype or, iterating to
            tolerance, did not converge: ``"raise"`` a :class:`PinvError`, ``"warn"`` and
            return the best valid iterate, or ``"exact"``: replace them by
            ``torch.linalg.pinv(A, rtol=rcond)`` computed in float64.
        return_info: also return a :class:`PinvInfo` (per-matrix iterations, bound,
            converged flag, …).

    Returns:
        Z of shape (..., n, m) in A's dtype (computed in float32, float64 for float64
        input), and the :class:`PinvInfo` if requested.
    """
    check_matrix(A)
    check_order(order)
    check_choice("init", init, INITS)
    check_choice("backward", backward, BACKWARDS)
    check_choice("on_fail", on_fail, ON_FAIL)
    if iters is not None:
        check_positive_int("iters", iters, minimum=0)
        if backward == "implicit":
            raise ValueError(
                f"backward='implicit' is not allowed with iters={iters}: a fixed iteration "
                "count returns a truncated iterate, not A⁺, and the implicit derivative is "
                "that of A⁺; use backward='unroll' (the exact derivative of the iterate) or "
                "iters=None (iterate to tolerance)"
            )
    check_positive_int("max_iter", max_iter)
    explicit_tol = tol is not None
    tol = check_positive_float("tol", tol) if explicit_tol else default_tol(A.dtype)
    m0, n0 = A.shape[-2:]
    rcond = default_rcond(A.dtype, m0, n0) if rcond is None else check_rcond(rcond)
    resolved = AUTO_INIT if init == "auto" else init
    if resolved == "global":
        _warn_global(4)  # the caller of pinv, past in_given_dtypes
    if A.numel() == 0:  # m = 0, n = 0 or an empty batch: A⁺ is the (…, n, m) zero matrix
        Z_out, info = _empty_result(A, resolved, order, tol, rcond)
        return (Z_out, info) if return_info else Z_out

    transpose = A.shape[-2] > A.shape[-1]
    if transpose:  # pinv(A) = pinv(Aᵀ)ᵀ; iterate on the smaller Gram side
        A = A.mT
    m, n = A.shape[-2:]
    work = compute_dtype(A.dtype)
    batch = A.shape[:-2]
    a_raw = A.to(work).reshape(-1, m, n)
    e = _exponent(a_raw, resolved)
    a = scale_pow2(a_raw, -e)  # exact: max|a| in [0.5, 1)
    early_stop = iters is None or explicit_tol
    if backward == "implicit":
        with torch.no_grad():
            Z, raw = _iterate(a.detach(), order, resolved, iters, tol, early_stop, max_iter, rcond)
    else:
        Z, raw = _iterate(a, order, resolved, iters, tol, early_stop, max_iter, rcond)
    if backward == "implicit":
        Z = _ImplicitPinv.apply(a, Z.detach())

    Z_64 = scale_pow2(Z.double(), -e)  # undo the scale: pinv(2^e·a) = 2^−e·a⁺
    Z_out = Z_64.to(A.dtype)
    unrep = ~torch.isfinite(Z_out.detach()).flatten(-2).all(-1)

    Z_64d, Z_d = Z_64.detach(), Z.detach()  # a pending certificate must hold no graph

    def settle() -> None:  # raw's bound and converged, with the output rounding
        _settle(raw, Z_64d, Z_d, e, unrep, A.dtype, tol)

    # a fixed count decides nothing by its certificate: it is computed when first read
    deferred = "certificate" in raw and not torch.compiler.is_compiling()
    if not deferred:
        settle()
    failed = raw["diverged"] | unrep | (~raw["converged"] if iters is None else False)
    fallback = torch.zeros_like(failed)
    if not torch.compiler.is_compiling() and bool(failed.any()):  # eager-only check
        if deferred:  # the handling below reports and edits the certificate
            settle()
            deferred = False
        what = _failure_text(raw, failed, unrep, max_iter, tol, order, resolved, work)
        if on_fail == "raise":
            info = _make_info(a, Z, raw, fallback, unrep, resolved, order, tol, rcond, batch, None)
            raise PinvError(
                f"pinv: {what}. Use on_fail='exact' (torch.linalg.pinv for those), a larger "
                "tol or rcond, float64, or a regularised inverse (pinv_reg).",
                info,
            )
        if on_fail == "warn":
            # stacklevel 3: the caller of pinv, past in_given_dtypes
            warnings.warn(f"pinv: {what}; returning the best valid iterates", stacklevel=3)
            Z_out = _saturate(Z_out, unrep)
        else:  # exact fallback for the failed matrices only, with the same cut-off
            idx = failed.nonzero().squeeze(-1)
            sub = A.reshape(-1, m, n)[idx]
            sub = sub if backward == "unroll" else sub.detach()
            exact = torch.linalg.pinv(sub.double(), rtol=rcond).to(A.dtype)
            ok = torch.isfinite(exact).flatten(-2).all(-1)
            Z_out = Z_out.index_put((idx,), _saturate(exact, ~ok))
            fallback = failed
            raw["converged"] = raw["converged"] | fallback.index_put((idx,), ok)
            exact_bound = torch.where(ok, 0.0, math.inf).to(raw["bound"].dtype)
            raw["bound"] = raw["bound"].index_put((idx,), exact_bound)
            unrep = unrep.index_put((idx,), ~ok)
    info = _make_info(
        a, Z, raw, fallback, unrep, resolved, order, tol, rcond, batch, settle if deferred else None
    )
    Z_out = Z_out.reshape(*batch, n, m)
    if transpose:
        Z_out = Z_out.mT
    return (Z_out, info) if return_info else Z_out


def _empty_result(
    A: Tensor, init: str, order: int, tol: float, rcond: float
) -> tuple[Tensor, PinvInfo]:
    """pinv of a matrix with no entries: the zero matrix of shape (..., n, m) (as
    ``torch.linalg.pinv``), exact, in the autograd graph of A (its gradient is zero), with
    diagnostics that say converged in 0 iterations, bound 0."""
    batch = A.shape[:-2]
    dev = A.device

    def full(value: Any, dtype: torch.dtype) -> Tensor:
        return torch.full(batch, value, dtype=dtype, device=dev)

    no = full(False, torch.bool)
    info = PinvInfo(
        full(0, torch.long), full(0.0, compute_dtype(A.dtype)), full(0.0, compute_dtype(A.dtype)),
        full(True, torch.bool), no, no.clone(), no.clone(), init, order, tol,
        {"diverged_at": full(-1, torch.long)}, full(0.0, torch.float64), full(0, torch.long),
        no.clone(), rcond,
    )
    return (A.mT * 0).contiguous(), info


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


def _saturate(Z: Tensor, which: Tensor) -> Tensor:
    """Overflowed matrices: clamp to the largest finite value (reported, never inf)."""
    if not bool(which.any()):
        return Z
    big = torch.finfo(Z.dtype).max
    return torch.where(which[:, None, None], Z.nan_to_num(posinf=big, neginf=-big), Z)


def _failure_text(raw, failed, unrep, max_iter, tol, order, init, work) -> str:
    n_div, n_stag, n_rep = int(raw["diverged"].sum()), int(raw["stagnated"].sum()), int(unrep.sum())
    count = int(failed.sum())
    rest = count - int((raw["diverged"] | raw["stagnated"] | unrep)[failed].sum())
    return (
        f"{count} of {failed.numel()} matrices failed (diverged: {n_div}, stagnated: "
        f"{n_stag}, overflow in the output dtype: {n_rep}, not certified by "
        f"max_iter={max_iter}: {rest}); their bounds: {_fmt(raw['bound'][failed])}, steps: "
        f"{_fmt(raw['residual'][failed])} (tol={tol:g}, order={order}, init={init!r}, "
        f"dtype={work})"
    )


def _fmt(t: Tensor, limit: int = 8) -> str:
    vals = [f"{v:.3g}" for v in t.flatten()[:limit].tolist()]
    more = f", … ({t.numel() - limit} more)" if t.numel() > limit else ""
    return "[" + ", ".join(vals) + more + "]"


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


# --------------------------------------------------------------------------- regularised


@in_given_dtypes
def pinv_reg(
    A: Tensor,
    *,
    method: str = "tikhonov",
    lam: float = 1e-3,
    rcond: float = 1e-3,
    solver: str = "direct",
    **pinv_options,
) -> Tensor:
    """Regularised pseudoinverse of every matrix of a (..., m, n) batch.

    * ``method="tikhonov"``: (AᵀA + λ'I)⁻¹Aᵀ with λ' = ``lam``·‖A‖₂² (so ``lam`` is relative
      to the largest squared singular value and the result is scale invariant). Each
      singular value σ is inverted as σ/(σ² + λ'): large ones ≈ 1/σ, those below √λ'
      damped to ≈ σ/λ' instead of amplified (Tikhonov regularisation; e.g. Hansen,
      *Rank-Deficient and Discrete Ill-Posed Problems*, 1998, §5.1). ``solver="direct"``
      solves the (smaller) Gram system; ``"iterative"`` applies :func:`pinv` to the
      stacked matrix [A; √λ'·I], whose pseudoinverse's first m columns are the same
      thing and whose condition number is at most √(1 + 1/lam) — so it converges fast.
    * ``method="tsvd"``: truncated SVD — singular values below ``rcond``·σ_max are
      dropped (``torch.linalg.pinv(A, rtol=rcond)``); direct only.

    ``lam`` / ``rcond`` may be floats or tensors with the batch shape of A (one value per
    matrix). Computed in float32 (float64 for float64 input); returns A's dtype. λ' is
    treated as a constant for gradients.
    """
    check_matrix(A)
    check_choice("method", method, REG_METHODS)
    check_choice("solver", solver, ("direct", "iterative"))
    work = compute_dtype(A.dtype)
    a = A.to(work)
    if method == "tsvd":
        rcond_t = _reg_param("rcond", rcond, a)
        if solver != "direct":
            raise ValueError("solver='iterative' is not available for method='tsvd'; use 'direct'")
        return torch.linalg.pinv(a, rtol=rcond_t).to(A.dtype)
    lam_t = _reg_param("lam", lam, a)
    m, n = a.shape[-2:]
    with torch.no_grad():
        sigma2 = torch.linalg.matrix_norm(a.detach(), ord=2).square()
        lam_abs = (lam_t * sigma2)[..., None, None]
    if solver == "iterative":
        eye = torch.eye(n, dtype=work, device=a.device).expand(*a.shape[:-2], n, n)
        Z = pinv(torch.cat([a, lam_abs.sqrt() * eye], dim=-2), **pinv_options)
        return Z[..., :m].to(A.dtype)
    if m >= n:  # (AᵀA + λ'I)⁻¹Aᵀ, an n×n system
        gram = a.mT @ a + lam_abs * torch.eye(n, dtype=work, device=a.device)
        return torch.linalg.solve(gram, a.mT).to(A.dtype)
    gram = a @ a.mT + lam_abs * torch.eye(m, dtype=work, device=a.device)  # Aᵀ(AAᵀ + λ'I)⁻¹
    return torch.linalg.solve(gram, a).mT.to(A.dtype)


def _reg_param(arg: str, value: float | Tensor, a: Tensor) -> float | Tensor:
    """A positive float, or a positive tensor with the batch shape of ``a`` (per matrix)."""
    if isinstance(value, Tensor):
        if value.shape != a.shape[:-2] or not bool((value > 0).all() & torch.isfinite(value).all()):
            raise ValueError(
                f"{arg} as a tensor must be positive and finite with the batch shape "
                f"{tuple(a.shape[:-2])}; got shape {tuple(value.shape)}"
            )
        return value.to(a.dtype)
    return check_positive_float(arg, value)


__all__ = [
    "AUTO_INIT", "BACKWARDS", "GAP", "INITS", "ON_FAIL", "PinvError", "PinvInfo", "REG_METHODS",
    "SHARP_NOISE",
    "binary_exponent", "certify", "default_rcond", "default_tol", "growth_factor",
    "initial_scale", "matmuls_per_iteration", "penrose_residual", "pinv", "pinv_iterates",
    "pinv_reg", "reach_count", "scale_pow2", "spectral_norm_estimate", "spectral_norm_upper",
    "unit_roundoff",
]
