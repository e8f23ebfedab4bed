"""Powell's hybrid method: a dogleg trust region around a Broyden-updated dense Jacobian.

The globalisation MINPACK's ``hybrd`` uses, written from the published descriptions:
Powell (1970), "A hybrid method for nonlinear equations", in Rabinowitz (ed.), *Numerical
Methods for Nonlinear Algebraic Equations*, Gordon and Breach, pp. 87-114; and Moré,
Garbow & Hillstrom (1980), "User Guide for MINPACK-1", Argonne report ANL-80-74, ch. 2
(the algorithm of ``hybrd``: scaling, trust-region control, Jacobian updates). Per sample:

* **Jacobian** J at the start by forward differences, one batched evaluation per column
  (step h_j = sqrt(eps) |z_j|, or sqrt(eps) where z_j = 0), or exactly by forward-mode
  autodiff (``jacobian="autograd"``, one ``torch.func.jvp`` per column). Between
  recomputations J gets Broyden's rank-one secant update after every trial step s with
  residual change y, in the scaled form J += (y - J s) (D^2 s)^T / ||D s||^2
  (Broyden, 1965, Math. Comp. 19; MINPACK-1 guide, sec. 2.3).
* **Scaling** D (``rescale=True``): D_j = the norm of column j of the first Jacobian, then
  the maximum of that and each recomputed Jacobian's column norm (MINPACK's ``mode=1``);
  trust regions are balls in the scaled norm ||D p||, so badly scaled variables (Powell's
  badly scaled function) do not dictate the step.
* **Step**: Powell's dogleg in the scaled variables. The Gauss-Newton step p_N solves
  J p = -g (QR of J; a diagonal entry of R below eps max|R_kk| is replaced by that bound,
  so a singular J still gives a long, finite p_N and the dogleg falls back on the
  gradient); if ||D p_N|| <= Delta it is taken; otherwise the step is the point at
  scaled length Delta on the path from 0 through the Cauchy point (the minimiser of the
  linear model along the scaled steepest-descent direction -D^-1 J^T g) to p_N.
* **Trust region**: rho = actual / predicted reduction of ||g||^2 (predicted by the
  linear model ||g + J p||^2). rho < 0.1: Delta halves (a failure). Otherwise Delta grows to
  at least 2 ||D p|| when rho >= 0.5 or after two successes in a row, and is set to
  2 ||D p|| when |rho - 1| <= 0.1. The step is accepted when rho >= 1e-4 (or when it meets
  the tolerance). The first Delta is ``factor`` ||D z0|| (``factor`` if that is 0), cut to
  the length of the first step.
* **Restarts**: after ``max_fails`` failures in a row J is recomputed at the current point.
  A sample whose trust region has collapsed (Delta below eps ||D z||: no step can change
  z) gets one fresh start (new J, Delta reset); a second collapse freezes it, and the
  solve ends when every active sample is frozen (``info.notes`` says so; the sample is
  reported unconverged, ``reasons()`` says ``stalled``). With ``stall=k`` a sample is
  also frozen after k iterations in a row that cut ||g||^2 by less than 0.1% (the
  progress test MINPACK uses to give up, with k = 10 there); off by default, because
  slow stretches on badly scaled problems often end in a root (Chebyquad n=6 from 10 x0).
* **Fallback** (``fallback="broyden_newton"``, say): once every active sample is frozen,
  the unconverged ones continue from their best point with that method, on what is left
  of ``max_iter``. Off by default: on ``formerlab bench roots`` it rescued one problem
  (Watson n=9 from 10 x0) and, with ``stall=10``, lost another.

Every trial step is an iteration, accepted or not (a rejected one leaves z unchanged and
shrinks Delta), so ``info.iterations`` counts trial steps and ``info.evaluations`` adds
the n evaluations of each Jacobian.

A sample converges when its residual (recomputed by ``SolveRun`` on the accepted point)
meets ``tol``; nothing else is ever reported as converged. Costs per sample: one
evaluation per iteration plus n per Jacobian; memory O(n^2); an O(n^3) QR per iteration.
That is the right trade for small dense systems (n up to a few hundred), not for DEQ
states: ``solve_root``'s default uses this method up to ``DENSE_MAX`` unknowns
per sample and ``broyden_newton`` beyond (``formerlab.solvers.api``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from formerlab.errors import check_choice, check_positive_float, check_positive_int
from formerlab.solvers.base import Solver, SolveRun
from formerlab.solvers.registry import SOLVERS, register

JACOBIANS = ("fd", "autograd")
_ACCEPT = 1e-4  # minimum rho for taking a step


def _bmv(mat: Tensor, vec: Tensor) -> Tensor:
    """(B, n, m) @ (B, m) -> (B, n)."""
    return torch.bmm(mat, vec.unsqueeze(-1)).squeeze(-1)


def dogleg(jac: Tensor, g: Tensor, diag: Tensor, delta: Tensor) -> Tensor:
    """Powell's dogleg step for min ||g + J p|| subject to ||D p|| <= delta, per sample.

    ``jac`` (B, n, n), ``g`` (B, n), ``diag`` (B, n) > 0, ``delta`` (B,) > 0.
    """
    eps = torch.finfo(jac.dtype).eps
    tiny = torch.finfo(jac.dtype).tiny
    # Householder QR without forming Q (Q^T g applied from the reflectors)
    # (solve_triangular reads only the upper triangle: R needs no triu copy)
    h, tau = torch.geqrf(jac)
    d = h.diagonal(dim1=-2, dim2=-1)
    bound = eps * d.abs().amax(dim=1, keepdim=True)
    bound = torch.where(bound > 0, bound, torch.full_like(bound, eps))
    sign = torch.where(d < 0, -torch.ones_like(d), torch.ones_like(d))
    safe = torch.where(d.abs() < bound, sign * bound, d)
    r = h + torch.diag_embed(safe - d)
    qtg = torch.ormqr(h, tau, g.unsqueeze(-1), left=True, transpose=True).squeeze(-1)
    p_gn = -torch.linalg.solve_triangular(r, qtg.unsqueeze(-1), upper=True).squeeze(-1)
    y_gn = diag * p_gn
    n_gn = y_gn.norm(dim=1)
    inside = n_gn <= delta

    # the scaled steepest-descent direction and the Cauchy point along it
    gs = _bmv(jac.transpose(1, 2), g) / diag
    n_gs = gs.norm(dim=1)
    jv = _bmv(jac, gs / diag)
    t = n_gs**2 / (jv * jv).sum(dim=1).clamp_min(tiny)
    y_c = -t[:, None] * gs
    n_c = t * n_gs
    # Cauchy point outside the region: the steepest-descent step cut to the boundary
    y_sd = -(delta / n_gs.clamp_min(tiny))[:, None] * gs
    # otherwise: from the Cauchy point towards the Gauss-Newton point, to the boundary
    seg = y_gn - y_c
    a = (seg * seg).sum(dim=1)
    b = 2 * (y_c * seg).sum(dim=1)
    c = n_c**2 - delta**2
    tau = (-b + torch.sqrt((b * b - 4 * a * c).clamp_min(0))) / (2 * a).clamp_min(tiny)
    y_dl = y_c + tau.clamp(0, 1)[:, None] * seg
    # no gradient (a stationary point of ||g||^2): the Gauss-Newton direction, cut
    y_cut = (delta / n_gn.clamp_min(tiny))[:, None] * y_gn
    y = torch.where((n_c >= delta)[:, None], y_sd, y_dl)
    y = torch.where((n_gs == 0)[:, None], y_cut, y)
    y = torch.where(inside[:, None], y_gn, y)
    return y / diag


@register(
    "hybrid",
    description="Powell's hybrid method (MINPACK hybrd's algorithm): dogleg trust region, "
    "scaled, around a finite-difference Jacobian with Broyden updates (root or fixed point)",
    complexity="n f-evals per Jacobian (start, restarts) + 1 per iteration; O(n^2) memory, "
    "O(n^3) per iteration",
    root=True,
)
class Hybrid(Solver):
    """Powell's hybrid dogleg method with a dense Jacobian (see the module docstring).

    ``factor``: initial trust radius as a multiple of ||D z0|| (MINPACK's default 100).
    ``jacobian``: ``"fd"`` (forward differences, any g) or ``"autograd"`` (exact, g
    differentiable by torch). ``rescale``: scale variables by Jacobian column norms.
    ``max_fails``: failed steps in a row before the Jacobian is recomputed.
    ``stall``: freeze a sample after this many iterations of < 0.1% progress (None: never).
    ``fallback``: a root method to continue frozen samples with (None: stop there).
    """

    name = "hybrid"
    supports_root = True

    def __init__(
        self,
        factor: float = 100.0,
        jacobian: str = "fd",
        rescale: bool = True,
        max_fails: int = 2,
        stall: int | None = None,
        fallback: str | None = None,
    ) -> None:
        self.factor = check_positive_float("factor", factor)
        self.jacobian = check_choice("jacobian", jacobian, JACOBIANS)
        if not isinstance(rescale, bool):
            raise ValueError(f"rescale={rescale!r} is not allowed; expected True or False")
        self.rescale = rescale
        self.max_fails = check_positive_int("max_fails", max_fails)
        self.stall = None if stall is None else check_positive_int("stall", stall)
        if fallback is not None:
            allowed = [m for m in SOLVERS.available() if m != self.name
                       and SOLVERS.entry(m).extra.get("root")]
            check_choice("fallback", fallback, [None, *allowed])
        self.fallback = fallback

    # -- the Jacobian ---------------------------------------------------------------------
    def _jac(self, run: SolveRun) -> Tensor:
        """J(z) at the run's current point, (B, n, n), one batched evaluation per column."""
        z, g = run.z, run.g
        b, n = z.shape
        jac = z.new_empty(b, n, n)
        root_eps = torch.finfo(z.dtype).eps ** 0.5
        for j in range(n):
            if self.jacobian == "autograd":
                tangent = torch.zeros_like(z)
                tangent[:, j] = 1
                with torch.enable_grad():
                    _, col = torch.func.jvp(
                        run.fn, (z.reshape(run.shape).to(run.dtype),),
                        (tangent.reshape(run.shape).to(run.dtype),),
                    )
                run.evaluations += 1
                col = col.detach().reshape(b, n).to(run.sdtype)
                if run.problem == "fixed_point":
                    col = col - tangent
            else:
                h = root_eps * z[:, j].abs()
                h = torch.where(h > 0, h, torch.full_like(h, root_eps))
                zp = z.clone()
                zp[:, j] = z[:, j] + h
                h = zp[:, j] - z[:, j]  # the step as represented
                col = (run.evaluate(zp) - g) / h[:, None]
            jac[:, :, j] = col
        return jac

    def _scale(self, jac: Tensor, old: Tensor | None) -> Tensor:
        if not self.rescale:
            return torch.ones(jac.shape[0], jac.shape[2], dtype=jac.dtype, device=jac.device)
        cols = jac.norm(dim=1)
        cols = torch.where(torch.isfinite(cols) & (cols > 0), cols, torch.ones_like(cols))
        return cols if old is None else torch.maximum(old, cols)

    def _radius(self, z: Tensor, diag: Tensor) -> Tensor:
        xn = (diag * z).norm(dim=1)
        return torch.where(xn > 0, self.factor * xn, torch.full_like(xn, self.factor))

    # -- the iteration --------------------------------------------------------------------
    def iterate(self, run: SolveRun, start: int = 0) -> int:
        """Dogleg steps until ``run`` is done, counting from ``start``; returns the count."""
        b = run.z.shape[0]
        eps = torch.finfo(run.sdtype).eps
        jac = self._jac(run)
        jac_evals = 1
        diag = self._scale(jac, None)
        delta = self._radius(run.z, diag)
        first = torch.ones(b, dtype=torch.bool, device=run.z.device)
        ncsuc = torch.zeros(b, dtype=torch.long, device=run.z.device)
        ncfail = torch.zeros_like(ncsuc)
        restarted = torch.zeros_like(first)
        frozen = torch.zeros_like(first)
        slow = torch.zeros_like(ncsuc)  # iterations in a row that cut ||g||^2 by < 0.1%
        step = start
        while not run.done(step):
            z, g, active = run.z, run.g, run.active
            p = dogleg(jac, g, diag, delta)
            pnorm = (diag * p).norm(dim=1)
            delta = torch.where(first & (pnorm > 0), torch.minimum(delta, pnorm), delta)
            z_try = z + p
            g_try = run.evaluate(z_try)
            fnorm, fnorm1 = g.norm(dim=1), g_try.norm(dim=1)
            finite = torch.isfinite(fnorm1) & torch.isfinite(z_try.norm(dim=1))
            lin = (g + _bmv(jac, p)).norm(dim=1)
            tiny = torch.finfo(fnorm.dtype).tiny
            actred = torch.where(
                finite & (fnorm1 < fnorm), 1 - (fnorm1 / fnorm.clamp_min(tiny)) ** 2,
                -torch.ones_like(fnorm),
            )
            prered = torch.where(lin < fnorm, 1 - (lin / fnorm.clamp_min(tiny)) ** 2,
                                 torch.zeros_like(fnorm))
            ratio = torch.where(prered > 0, actred / prered.clamp_min(tiny),
                                torch.zeros_like(fnorm))
            # the trust region
            fail = ratio < 0.1
            ncsuc = torch.where(fail, torch.zeros_like(ncsuc), ncsuc + 1)
            ncfail = torch.where(fail, ncfail + 1, torch.zeros_like(ncfail))
            new_delta = torch.where(fail, 0.5 * delta, delta)
            grow = ~fail & ((ratio >= 0.5) | (ncsuc > 1))
            new_delta = torch.where(grow, torch.maximum(new_delta, 2 * pnorm), new_delta)
            new_delta = torch.where(~fail & ((ratio - 1).abs() <= 0.1), 2 * pnorm, new_delta)
            delta = torch.where(active, new_delta, delta)
            slow = torch.where(actred >= 1e-3, torch.zeros_like(slow), slow + 1)
            # acceptance: enough decrease, or the tolerance met
            res_try = run._residual(z_try, g_try, fnorm1, finite)
            accept = finite & ((ratio >= _ACCEPT) | (res_try <= run.tol))
            # Broyden's scaled secant update of J along the trial step
            upd = active & finite & (pnorm > 0)
            if bool(upd.any()):
                w = diag * diag * p / pnorm.clamp_min(tiny)[:, None] ** 2
                r = g_try - g - _bmv(jac, p)
                rank1 = r.unsqueeze(2) * w.unsqueeze(1)
                jac = torch.where(upd[:, None, None], jac + rank1, jac)
            run.accept(torch.where(accept[:, None], z_try, z), torch.where(accept[:, None], g_try, g))
            step += 1
            first = first & ~active
            # restarts: a fresh Jacobian after repeated failures; a collapsed region
            # restarts once, then freezes the sample
            xn = (diag * run.z).norm(dim=1)
            collapsed = run.active & (delta <= eps * xn.clamp_min(1.0))
            frozen = frozen | (collapsed & restarted)
            if self.stall is not None:
                frozen = frozen | (run.active & (slow >= self.stall))
            renew = run.active & ~frozen & ((ncfail >= self.max_fails) | collapsed)
            if not bool((run.active & ~frozen).any()):
                break
            if bool(renew.any()) and not run.done(step):
                fresh = self._jac(run)
                jac_evals += 1
                jac = torch.where(renew[:, None, None], fresh, jac)
                diag = torch.where(renew[:, None], self._scale(fresh, diag), diag)
                ncfail = torch.where(renew, torch.zeros_like(ncfail), ncfail)
                reset = renew & collapsed
                delta = torch.where(reset, self._radius(run.z, diag), delta)
                first = first | reset
                restarted = restarted | reset
        run.note(f"hybrid: {jac_evals} Jacobian(s) of {run.z.shape[1]} columns")
        if run.done(step):
            return step
        why = "no progress (the trust region collapsed twice"
        why += ")" if self.stall is None else (
            f", or {self.stall} iterations in a row cut ||g||^2 by < 0.1%)")
        if self.fallback is None:
            run.note(f"hybrid stopped at iteration {step}: {why}")
            return step
        run.note(f"hybrid: {why} at iteration {step}: switched to {self.fallback} from the "
                 "best point")
        run.rewind()
        solver = SOLVERS.build(self.fallback)
        budget = run.max_iter
        run.max_iter = budget - step  # the fallback gets what is left of the budget
        try:
            taken = solver.iterate(run)
        finally:
            run.max_iter = budget
        return step + (taken if isinstance(taken, int) else 0)
