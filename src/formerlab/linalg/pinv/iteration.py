"""The iteration: order-p steps from the initial Z₀ = αAᵀ, per-matrix stopping on the
certificate, stagnation and divergence detection, failure handling (``on_fail``), and the
entry points :func:`pinv` and :func:`pinv_iterates`.

Iterations (E = I − AZ is the error of the current iterate Z):

* ``order=2`` — Newton–Schulz (Ben-Israel 1965): Z ← Z(2I − AZ); E ← E².
* ``order=3`` — Razavi et al. (2014), used by Nyströmformer (Xiong et al. 2021, eq. 13):
  Z ← ¼ Z(13I − AZ(15I − AZ(7I − AZ))); E ← ¾E³ + ¼E⁴; 4 matmuls per iteration.
* ``order=p`` (p >= 4) — hyperpower (Ben-Israel & Greville, *Generalized Inverses*, ch. 7):
  Z ← Z Σᵢ₌₀..ₚ₋₁ (I − AZ)ⁱ (Horner form); E ← Eᵖ; p matmuls per iteration.

Stopping (``iters=None``): iterate until converged (the certificate of
:mod:`~formerlab.linalg.pinv.certificate`). The relative step
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
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from formerlab.errors import check_choice, check_positive_float, check_positive_int
from formerlab.linalg.numerics import autocast_off, compute_dtype, relative_step
from formerlab.linalg.pinv.autograd import _ImplicitPinv
from formerlab.linalg.pinv.certificate import (
    _make_info,
    _settle,
    certify,
    reach_and_upper_norm,
)
from formerlab.linalg.pinv.info import PinvError, PinvInfo
from formerlab.linalg.pinv.inits import (
    _fro,
    binary_exponent,
    initial_scale,
    scale_pow2,
)
from formerlab.linalg.pinv.options import (
    AUTO_INIT,
    BACKWARDS,
    INITS,
    ON_FAIL,
    check_matrix,
    check_order,
    check_rcond,
    default_rcond,
    default_tol,
    in_given_dtypes,
)

PATIENCE = 3
_CANDIDATE_STEP = 0.5  # the certificate is computed only once the step is below this
_ASYMPTOTIC = 1e-2  # a relative step below this means the iteration is past its slow start


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
    ``converged`` certifies ‖Z − A⁺_rcond‖_F/‖A⁺_rcond‖_F <= ``info.bound`` <= tol
    (:mod:`~formerlab.linalg.pinv.certificate` for the bound and its conditions).

    Args:
        A: (..., m, n) floating tensor, finite.
        order: 2 (Newton–Schulz), 3 (Razavi et al. 2014, Nyströmformer's) or p >= 4
            (hyperpower of order p).
        init: ``"auto"``, ``"razavi"``, ``"frobenius"``, ``"spectral"`` or ``"global"``
            (warns; reproduces a known failure) — see :mod:`~formerlab.linalg.pinv.inits`.
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
