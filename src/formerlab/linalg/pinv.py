"""Iterative Moore–Penrose pseudoinverse for batches of matrices, with honest diagnostics.

Iterations (E = I − AZ is the error of the current iterate Z):

* ``order=2`` — Newton–Schulz (Ben-Israel 1965): Z ← Z(2I − AZ); E ← E².
* ``order=3`` — Razavi et al. (2014), used by Nyströmformer (Xiong et al. 2021, eq. 13):
  Z ← ¼ Z(13I − AZ(15I − AZ(7I − AZ))); E ← ¾E³ + ¼E⁴; 4 matmuls per iteration.
* ``order=p`` (p >= 4) — hyperpower (Ben-Israel & Greville, *Generalized Inverses*, ch. 7):
  Z ← Z Σᵢ₌₀..ₚ₋₁ (I − AZ)ⁱ (Horner form); E ← Eᵖ; p matmuls per iteration.

All of them converge to A⁺ from Z₀ = αAᵀ whenever 0 < α < 2/σ_max(A)²: AZ stays symmetric
with eigenvalues in (0, 2) on the range of A, and each component of E shrinks
(Ben-Israel & Greville, ch. 7; Pan & Schreiber 1991). A singular value σ is "reached"
once its eigenvalue σ²α·cᵏ of AZ has grown to ~1, where c = 3.25 for ``order=3`` and
c = p otherwise (the growth factor of small eigenvalues per iteration).

Initial scale α, computed **per matrix** (``init``):

* ``"razavi"``: α = 1/(‖A‖₁‖A‖∞) (σ_max² <= ‖A‖₁‖A‖∞);
* ``"frobenius"``: α = 1/‖A‖_F²;
* ``"spectral"``: α = 1/(1.05·σ̂²), σ̂ from 8 power iterations on AᵀA (σ̂ <= σ_max, so
  AZ₀ has eigenvalues <= 1/1.05·σ_max²/σ̂², below 2 unless σ̂ is off by 27 %);
* ``"global"``: α = 1/(maxᵦ‖Aᵦ‖₁ · maxᵦ‖Aᵦ‖∞), one scale for the whole batch as in the
  public Nyströmformer implementations. It warns; kept only to reproduce their failure: in a
  batch whose matrices differ in scale, the small ones start with eigenvalues of AZ₀ orders
  of magnitude below 1 and get nowhere in a fixed number of iterations;
* ``"auto"``: :data:`AUTO_INIT` — the measured choice (see ``formerlab pinv-study`` and
  the README): the fewest matmuls of the safe inits on row-softmax and random matrices.

Stopping (``iters=None``). The residual is the relative step
``‖Z_k − Z_{k−1}‖_F / ‖Z_k‖_F``. For a superlinear iteration it estimates the relative error
of Z_{k−1} (and bounds that of Z_k), and it tends to 0 for any A, rank-deficient and
rectangular included (the Penrose residual ‖AZA − A‖ does too but is blind to the small
singular values, so it reaches its floor long before Z does; both are reported). A matrix
stops when its residual is <= ``tol`` (*converged*). In floating point the residual stops
falling at a level set by rounding (about u·κ(A)); past that, a rank-deficient A has its
rounding-noise singular values inverted and the iterates drift away from A⁺. So once every
singular value above u·σ_max (u = unit roundoff; below it is only rounding noise) has been
reached and the residual has not halved in 3 further iterations, the matrix has
*stagnated*: it stops, returns its iterate of smallest residual (the last one if the
residual never fell below 1e-2) and reports ``converged=False`` — instead of looping to
``max_iter`` or claiming convergence.

Divergence (non-finite values, or ‖AZ‖_F > 2√m, impossible for a valid iterate) is
detected at the iteration where it happens; the last valid iterate is kept.

Backward. ``"unroll"`` differentiates through the iterations; ``"implicit"`` runs them
without autograd and uses the derivative of the pseudoinverse at the result (Golub &
Pereyra 1973, Thm. 4.3): dA⁺ = −A⁺dA A⁺ + A⁺A⁺ᵀdAᵀ(I − AA⁺) + (I − A⁺A)dAᵀA⁺ᵀA⁺, whose
memory does not depend on the iteration count (it assumes the rank is locally constant).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor

from formerlab.errors import check_choice, check_positive_float, check_positive_int

INITS = ("auto", "razavi", "frobenius", "spectral", "global")
ON_FAIL = ("raise", "warn", "exact")
BACKWARDS = ("unroll", "implicit")
REG_METHODS = ("tikhonov", "tsvd")
AUTO_INIT = "razavi"
SPECTRAL_MARGIN = 1.05
SPECTRAL_POWER_STEPS = 8
PATIENCE = 3
_ASYMPTOTIC = 1e-2  # a relative step below this means the iteration is past its slow start


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other dtype is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def default_tol(dtype: torch.dtype) -> float:
    """Default tolerance on the relative step (float32: 1e-5, float64: 1e-12)."""
    return 1e-12 if compute_dtype(dtype) == torch.float64 else 1e-5


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


@dataclass
class PinvInfo:
    """Diagnostics of one ``pinv`` call; tensors have the batch shape of A.

    Attributes:
        iterations: iterations that produced the returned Z (long).
        residual: relative step ‖Z_k − Z_{k−1}‖_F/‖Z_k‖_F into the returned iterate
            (1.0 for Z₀; 0 for a zero matrix) — the stopping quantity.
        penrose: ‖AZA − A‖_F/‖A‖_F of the returned Z.
        converged: residual <= tol (and not diverged).
        diverged: non-finite values or ‖AZ‖_F > 2√m appeared; Z is the last valid iterate.
        stagnated: stopped because the residual stopped falling before reaching tol.
        fallback: replaced by ``torch.linalg.pinv`` (``on_fail="exact"``).
        init, order, tol: the resolved settings.
        extra: ``"diverged_at"``: the iteration at which divergence was detected (-1 if not).
    """

    iterations: Tensor
    residual: Tensor
    penrose: Tensor
    converged: Tensor
    diverged: Tensor
    stagnated: Tensor
    fallback: Tensor
    init: str
    order: int
    tol: float
    extra: dict = field(default_factory=dict)

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
        return {
            "pinv_iterations": its.mean().item(),
            "pinv_iterations_max": its.max().item(),
            "pinv_residual": res.mean().item(),
            "pinv_residual_max": res.max().item(),
            "pinv_penrose": self.penrose.double().mean().item(),
            "pinv_converged": self.converged.double().mean().item(),
            "pinv_diverged": self.diverged.double().mean().item(),
        }

    def reshape(self, shape: tuple[int, ...]) -> PinvInfo:
        """The same diagnostics with the batch dims reshaped to ``shape``."""

        def r(t: Tensor) -> Tensor:
            return t.reshape(shape)

        extra = {k: r(v) if isinstance(v, Tensor) else v for k, v in self.extra.items()}
        return PinvInfo(
            r(self.iterations), r(self.residual), r(self.penrose), r(self.converged),
            r(self.diverged), r(self.stagnated), r(self.fallback), self.init, self.order,
            self.tol, extra,
        )


# --------------------------------------------------------------------------- helpers


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


def _safe_reciprocal(x: Tensor) -> Tensor:
    return torch.where(x > 0, 1.0 / x.clamp(min=torch.finfo(x.dtype).tiny), torch.zeros_like(x))


def _fro(x: Tensor) -> Tensor:
    return x.flatten(-2).norm(dim=-1)


def spectral_norm_estimate(A: Tensor, steps: int = SPECTRAL_POWER_STEPS) -> Tensor:
    """σ̂ <= σ_max(A) for each matrix of a (b, m, n) batch, by power iteration on AᵀA.

    The start vector is a fixed pseudo-random vector (deterministic results); the result
    is the larger of the Rayleigh quotient and the certain lower bound ‖A‖_F/√min(m, n).
    """
    b, m, n = A.shape
    gen = torch.Generator().manual_seed(0)
    v = torch.randn(n, generator=gen, dtype=torch.float64).to(A.device, A.dtype)
    v = (v / v.norm()).expand(b, n).unsqueeze(-1)
    for _ in range(steps):
        w = A.mT @ (A @ v)
        v = w * _safe_reciprocal(w.norm(dim=-2, keepdim=True))
    rayleigh = (A @ v).square().sum(dim=(-2, -1))
    lower = A.square().sum(dim=(-2, -1)) / min(m, n)
    return torch.maximum(rayleigh, lower).sqrt()


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


def _reach_iterations(a: Tensor, alpha: Tensor, order: int) -> Tensor:
    """Iterations after which every singular value >= u·σ_max has been reached.

    A singular value σ has eigenvalue σ²α·cᵏ in AZ_k while that is small; it is reached
    when that is ~1. Uses a lower bound of σ_max²α (power-iteration Rayleigh quotient), so
    the count errs on the late side; below u·σ_max (u = unit roundoff) there is only
    rounding noise, whose inversion makes the iterates drift away from A⁺.
    """
    eps = torch.finfo(a.dtype).eps
    s = (alpha.flatten() * spectral_norm_estimate(a).square()).clamp(1e-300, 1.0)
    k = torch.log(1.0 / (eps * eps * s)) / math.log(growth_factor(order))
    return k.ceil().long() + 1


def _rel_step(new: Tensor, old: Tensor) -> Tensor:
    num, den = _fro(new - old), _fro(new)
    return torch.where(den > 0, num / den.clamp(min=torch.finfo(den.dtype).tiny), torch.zeros_like(num))


def _penrose(a: Tensor, Z: Tensor) -> Tensor:
    r = _fro(torch.baddbmm(a, a @ Z, a, beta=-1.0))
    a_norm = _fro(a)
    return torch.where(a_norm > 0, r / a_norm.clamp(min=torch.finfo(a.dtype).tiny), r)


# --------------------------------------------------------------------------- iteration


def pinv_iterates(A: Tensor, *, order: int = 3, init: str = "auto") -> Iterator[Tensor]:
    """Yield Z₀, Z₁, Z₂, … of the iteration for a (..., m, n) batch, without stopping.

    In the compute dtype (float32, or float64 for float64 input). Used for studies of
    the error per iteration (semi-convergence) and for sampled-row validation; the caller
    decides when to stop. Differentiable (unrolled).
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
    a = A.to(work).reshape(-1, m, n)
    eye = torch.eye(m, dtype=work, device=A.device)
    Z = initial_scale(a, init) * a.mT
    while True:
        yield Z.reshape(*A.shape[:-2], n, m)
        Z = _step(Z, a @ Z, order, eye)


def _warn_global() -> None:
    warnings.warn(
        'pinv init="global" uses one scale for the whole batch; matrices of smaller scale '
        'then barely move in a fixed number of iterations. Use init="razavi" or "auto".',
        stacklevel=3,
    )


def _iterate(
    a: Tensor, order: int, init: str, iters: int | None, tol: float, early_stop: bool,
    max_iter: int,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Run the iteration on a (b, m, n) batch with m <= n; returns Z and diagnostics.

    ``iters`` given: exactly that many steps (early stop at ``tol`` if ``early_stop``);
    else iterate to ``tol`` with stagnation detection, at most ``max_iter`` steps.
    """
    b, m, _ = a.shape
    dev = a.device
    eye = torch.eye(m, dtype=a.dtype, device=dev)
    alpha = initial_scale(a, init)
    Z = alpha * a.mT
    X = a @ Z
    false = torch.zeros(b, dtype=torch.bool, device=dev)
    active, diverged, stagnated, converged = ~false, false.clone(), false.clone(), false.clone()
    iterations = torch.zeros(b, dtype=torch.long, device=dev)
    diverged_at = torch.full((b,), -1, dtype=torch.long, device=dev)
    res = torch.where(_fro(a) > 0, 1.0, 0.0).to(a.dtype)  # nothing known about Z₀
    to_tol = iters is None
    if to_tol:  # best iterate so far, for matrices that stagnate
        reach = _reach_iterations(a.detach(), alpha.detach(), order)
        best_Z, best_res, best_k = Z, res.clone(), iterations.clone()
        ref = res.clone()  # residual at the last halving
        since = iterations.clone()
    x_limit = 2.0 * math.sqrt(m) * (1 + 1e-3)
    steps = max_iter if to_tol else iters
    for _ in range(steps):
        if early_stop:
            done = active & (res.detach() <= tol)
            converged |= done
            active = active & ~done
            if not bool(active.any()):
                break
        Z_new = _step(Z, X, order, eye)
        X_new = a @ Z_new
        r = _rel_step(Z_new, Z)
        rd = r.detach()
        bad = ~torch.isfinite(rd) | ~torch.isfinite(_fro(Z_new.detach()))
        bad |= ~(_fro(X_new.detach()) <= x_limit)
        diverged_at = torch.where(active & bad, iterations + 1, diverged_at)
        diverged |= active & bad
        take = active & ~bad
        t3 = take[:, None, None]
        Z = torch.where(t3, Z_new, Z)
        X = torch.where(t3, X_new, X)
        res = torch.where(take, r, res)
        iterations += take.long()
        active = take
        if to_tol:
            better = take & (rd < best_res)
            best_Z = torch.where(better[:, None, None], Z, best_Z)
            best_res = torch.where(better, rd, best_res)
            best_k = torch.where(better, iterations, best_k)
            # patience counts only once every meaningful singular value has been reached
            past = iterations >= reach
            halved = rd <= 0.5 * ref
            ref = torch.where(~past | halved, rd, ref)
            since = torch.where(past & ~halved, since + 1, torch.zeros_like(since))
            stuck = take & (rd > tol) & (since >= PATIENCE)
            stagnated |= stuck
            active = active & ~stuck
    if early_stop:
        converged |= active & (res.detach() <= tol)
    if to_tol:
        # stagnated or diverged matrices return their iterate of smallest step, if the
        # iteration ever reached its superlinear phase (else the step says nothing)
        use_best = ((stagnated | diverged) & (best_res < _ASYMPTOTIC))[:, None, None]
        Z = torch.where(use_best, best_Z, Z)
        res = torch.where(use_best[:, 0, 0], best_res, res)
        iterations = torch.where(use_best[:, 0, 0], best_k, iterations)
        converged = converged | (stagnated & (best_res <= tol))
        stagnated = stagnated & ~converged
    else:
        converged = converged | (res.detach() <= tol)
    converged = converged & ~diverged
    info = dict(
        iterations=iterations, residual=res.detach(), converged=converged,
        diverged=diverged, stagnated=stagnated, diverged_at=diverged_at,
    )
    return Z, info


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


def pinv(
    A: Tensor,
    *,
    order: int = 3,
    init: str = "auto",
    iters: int | None = None,
    tol: float | None = None,
    max_iter: int = 100,
    backward: str = "unroll",
    on_fail: str = "raise",
    return_info: bool = False,
) -> Tensor | tuple[Tensor, PinvInfo]:
    """Moore–Penrose pseudoinverse of every matrix of a (..., m, n) batch by iteration.

    Args:
        A: (..., m, n) floating tensor, finite.
        order: 2 (Newton–Schulz), 3 (Razavi et al. 2014, Nyströmformer's) or p >= 4
            (hyperpower of order p).
        init: ``"auto"``, ``"razavi"``, ``"frobenius"``, ``"spectral"`` or ``"global"``
            (warns; reproduces a known failure) — see the module docs.
        iters: a fixed number of iterations. Reaching it is not a failure (a truncated
            iteration regularises, see ``formerlab approx``); with ``tol`` also given,
            matrices stop early once their residual is <= tol.
        tol: tolerance on the relative step (module docs). When ``iters`` is None each
            matrix iterates until its residual is <= tol, it stagnates, it diverges or
            ``max_iter``; default :func:`default_tol` of the compute dtype.
        max_iter: cap on iterations when iterating to tolerance.
        backward: ``"unroll"`` (autograd through the iterations) or ``"implicit"``
            (analytic derivative of A⁺ at the result; memory independent of iterations).
        on_fail: for matrices that diverged or, iterating to tolerance, did not converge
            (stagnation or ``max_iter``): ``"raise"`` a :class:`PinvError`, ``"warn"`` and
            return the best valid iterate, or ``"exact"``: replace them by
            ``torch.linalg.pinv`` computed in float64.
        return_info: also return a :class:`PinvInfo` (per-matrix iterations, residual,
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
    check_positive_int("max_iter", max_iter)
    explicit_tol = tol is not None
    tol = check_positive_float("tol", tol) if explicit_tol else default_tol(A.dtype)
    resolved = AUTO_INIT if init == "auto" else init
    if resolved == "global":
        _warn_global()

    transpose = A.shape[-2] > A.shape[-1]
    if transpose:  # pinv(A) = pinv(Aᵀ)ᵀ; iterate on the smaller Gram side
        A = A.mT
    m, n = A.shape[-2:]
    work = compute_dtype(A.dtype)
    batch = A.shape[:-2]
    a = A.to(work).reshape(-1, m, n)
    early_stop = iters is None or explicit_tol
    if backward == "implicit":
        with torch.no_grad():
            Z, raw = _iterate(a.detach(), order, resolved, iters, tol, early_stop, max_iter)
    else:
        Z, raw = _iterate(a, order, resolved, iters, tol, early_stop, max_iter)

    failed = raw["diverged"] | (~raw["converged"] if iters is None else raw["diverged"])
    fallback = torch.zeros_like(failed)
    if not torch.compiler.is_compiling() and bool(failed.any()):  # eager-only check
        n_div, n_stag = int(raw["diverged"].sum()), int(raw["stagnated"].sum())
        count = int(failed.sum())
        what = (
            f"{count} of {failed.numel()} matrices failed (diverged: {n_div}, stagnated: "
            f"{n_stag}, stopped at max_iter={max_iter}: {count - n_div - n_stag}); their "
            f"residuals: {_fmt(raw['residual'][failed])} (tol={tol:g}, order={order}, "
            f"init={resolved!r}, dtype={work})"
        )
        if on_fail == "raise":
            with torch.no_grad():
                penrose = _penrose(a.detach(), Z.detach())
            info = _make_info(raw, penrose, fallback, resolved, order, tol).reshape(batch)
            raise PinvError(
                f"pinv: {what}. Use on_fail='exact' (torch.linalg.pinv for those), a larger "
                "tol, float64, or a regularised inverse (pinv_reg).",
                info,
            )
        if on_fail == "warn":
            warnings.warn(f"pinv: {what}; returning the best valid iterates", stacklevel=2)
        else:  # exact fallback for the failed matrices only
            idx = failed.nonzero().squeeze(-1)
            sub = a[idx] if backward == "unroll" else a[idx].detach()
            # in float64: float32's default cut-off (max(m, n)·u) would drop singular
            # values the iteration resolves, making the "exact" answer the worse one
            Z = Z.index_put((idx,), torch.linalg.pinv(sub.double()).to(work))
            fallback = failed
            raw["converged"] = raw["converged"] | failed

    if backward == "implicit":
        Z = _ImplicitPinv.apply(a, Z.detach())
    with torch.no_grad():
        penrose = _penrose(a.detach(), Z.detach())
    info = _make_info(raw, penrose, fallback, resolved, order, tol).reshape(batch)
    Z = Z.reshape(*batch, n, m).to(A.dtype)
    if transpose:
        Z = Z.mT
    return (Z, info) if return_info else Z


def _fmt(t: Tensor, limit: int = 8) -> str:
    vals = [f"{v:.3g}" for v in t.flatten()[:limit].tolist()]
    more = f", … ({t.numel() - limit} more)" if t.numel() > limit else ""
    return "[" + ", ".join(vals) + more + "]"


def _make_info(
    raw: dict, penrose: Tensor, fallback: Tensor, init: str, order: int, tol: float
) -> PinvInfo:
    return PinvInfo(
        raw["iterations"], raw["residual"], penrose, raw["converged"], raw["diverged"],
        raw["stagnated"], fallback, init, order, tol, {"diverged_at": raw["diverged_at"]},
    )


def penrose_residual(A: Tensor, Z: Tensor) -> Tensor:
    """‖AZA − A‖_F/‖A‖_F per matrix of a batch (0 where A = 0), in the compute dtype."""
    work = compute_dtype(A.dtype)
    a = A.to(work).reshape(-1, *A.shape[-2:])
    z = Z.to(work).reshape(-1, *Z.shape[-2:])
    return _penrose(a, z).reshape(A.shape[:-2])


# --------------------------------------------------------------------------- regularised


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
    "AUTO_INIT", "BACKWARDS", "INITS", "ON_FAIL", "PinvError", "PinvInfo", "REG_METHODS",
    "compute_dtype", "default_tol", "growth_factor", "initial_scale", "matmuls_per_iteration",
    "penrose_residual", "pinv", "pinv_iterates", "pinv_reg", "spectral_norm_estimate",
]
