"""Jacobian-free Newton-Krylov: inexact Newton steps solved by GMRES on J-v products.

Solves g(z) = 0 (Knoll & Keyes, 2004, "Jacobian-free Newton-Krylov methods: a survey of
approaches and applications", J. Comput. Phys. 193). Each outer iteration solves the
Newton equation J(z) dz = -g(z) only to a relative accuracy eta_k,

    ||J dz + g|| <= eta_k ||g||,

with GMRES (Saad & Schultz, 1986), which needs J only through products J v. These come
from a forward difference (``jvp="fd"``, one evaluation each, see
``formerlab.solvers.base.fd_jvp``; works for any g) or from forward-mode autodiff
(``jvp="autograd"``, ``torch.func.jvp``; exact, g must be differentiable by torch).

Forcing terms (``forcing="ew"``): Eisenstat & Walker (1996), SIAM J. Sci. Comput. 17(1),
choice 2, eta_k = gamma (||g_k|| / ||g_{k-1}||)^alpha with gamma = 0.9, alpha = 2, the
safeguard eta_k >= gamma eta_{k-1}^alpha when that exceeds 0.1, capped by ``eta_max``, and
kept above 0.5 tau / ||g_k|| (tau the stopping tolerance in ||g||) so the last linear
solve is not over-solved (Kelley, 2003, "Solving Nonlinear Equations with Newton's
Method", sec. 3.2.3). A number for ``forcing`` fixes eta instead. Loose linear solves
far from the root, tight ones near it: superlinear convergence at few J-v products.

Globalisation: backtracking on ||g|| (``formerlab.solvers.base.backtrack``). Each time a
sample's line search has to shorten the step, its cap on eta is divided by 10 (down to
1e-6): a more accurate Newton direction is a better descent direction for ||g||^2, and
Eisenstat-Walker alone would loosen eta again after a step that made little progress.

Batched per sample: the Arnoldi process runs on the whole batch, each sample keeps the
GMRES solution of the first Krylov dimension that meets its own eta and stops its outer
iteration at its own tolerance. Memory: ``krylov_dim`` + 1 basis vectors per sample.
"""

from __future__ import annotations

import torch
from torch import Tensor

from formerlab.errors import check_choice, check_positive_float, check_positive_int
from formerlab.solvers.base import (
    Solver,
    SolveRun,
    backtrack,
    fd_jvp,
    stack_combine,
    stack_dot,
)
from formerlab.solvers.registry import register

JVPS = ("fd", "autograd")
_GAMMA, _ALPHA = 0.9, 2.0


@register(
    "newton_krylov",
    description="Jacobian-free Newton-Krylov: GMRES on J-v products, Eisenstat-Walker forcing "
    "(root or fixed point)",
    complexity="1 + k f-evals/iter (k GMRES steps) + line search, O(k d) memory",
    root=True,
)
class NewtonKrylov(Solver):
    """Inexact Newton with GMRES(``krylov_dim``) inner solves and a line search.

    ``jvp``: ``"fd"`` (forward differences) or ``"autograd"`` (``torch.func.jvp``).
    ``forcing``: ``"ew"`` (Eisenstat-Walker) or a fixed eta in (0, 1). ``eta_max`` caps
    the Eisenstat-Walker eta. ``ls_steps``: halvings of the backtracking line search.
    """

    name = "newton_krylov"
    supports_root = True

    def __init__(
        self,
        krylov_dim: int = 30,
        jvp: str = "fd",
        forcing: str | float = "ew",
        eta_max: float = 0.9,
        ls_steps: int = 8,
    ) -> None:
        self.krylov_dim = check_positive_int("krylov_dim", krylov_dim)
        self.jvp = check_choice("jvp", jvp, JVPS)
        if isinstance(forcing, str):
            check_choice("forcing", forcing, ("ew",))
        else:
            check_positive_float("forcing", forcing)
            if not forcing < 1:
                raise ValueError(f"forcing={forcing!r} is not allowed; expected 'ew' or 0 < eta < 1")
            forcing = float(forcing)
        self.forcing = forcing
        check_positive_float("eta_max", eta_max)
        if not eta_max < 1:
            raise ValueError(f"eta_max={eta_max!r} is not allowed; expected 0 < eta_max < 1")
        self.eta_max = float(eta_max)
        self.ls_steps = check_positive_int("ls_steps", ls_steps, minimum=0)

    # -- J v -------------------------------------------------------------------------------
    def _matvec(self, run: SolveRun, v: Tensor) -> Tensor:
        if self.jvp == "fd":
            return fd_jvp(run, run.z, run.g, v)
        z = run.z.reshape(run.shape).to(run.dtype)
        tangent = v.reshape(run.shape).to(run.dtype)
        with torch.enable_grad():
            _, jv = torch.func.jvp(run.fn, (z,), (tangent,))
        run.evaluations += 1
        jv = jv.detach().reshape(run.batch, -1).to(run.sdtype)
        if run.problem == "fixed_point":
            jv = jv - v
        return jv * run.active.to(jv.dtype)[:, None]

    # -- GMRES -----------------------------------------------------------------------------
    def _gmres(self, run: SolveRun, rhs: Tensor, eta: Tensor) -> tuple[Tensor, Tensor]:
        """Per sample, x with ||J x - rhs|| <= eta ||rhs|| (or the best in ``krylov_dim``
        steps); returns (x, Krylov dimension used)."""
        b, d = rhs.shape
        m = min(self.krylov_dim, d)
        beta = rhs.norm(dim=1)
        tiny = torch.finfo(rhs.dtype).tiny
        basis = rhs.new_zeros(b, m + 1, d)
        basis[:, 0] = rhs / beta.clamp_min(tiny)[:, None]
        hess = rhs.new_zeros(b, m + 1, m)
        e1 = rhs.new_zeros(b, m + 1, 1)
        e1[:, 0, 0] = beta
        x = torch.zeros_like(rhs)
        used = torch.zeros(b, dtype=torch.long, device=rhs.device)
        done = ~run.active | (beta == 0)
        for k in range(m):
            w = self._matvec(run, basis[:, k])
            # classical Gram-Schmidt applied twice (as stable as modified GS, batched)
            h = stack_dot(basis[:, : k + 1], w)
            w = w - stack_combine(h, basis[:, : k + 1])
            h2 = stack_dot(basis[:, : k + 1], w)
            w = w - stack_combine(h2, basis[:, : k + 1])
            h_next = w.norm(dim=1)
            hess[:, : k + 1, k] = h + h2
            hess[:, k + 1, k] = h_next
            breakdown = h_next <= 1e3 * torch.finfo(rhs.dtype).eps * (h + h2).norm(dim=1)
            basis[:, k + 1] = torch.where(
                breakdown[:, None], torch.zeros_like(w), w / h_next.clamp_min(tiny)[:, None]
            )
            small = hess[:, : k + 2, : k + 1]
            # the small least-squares problem via the pseudoinverse: rank-deficient
            # Hessenbergs (singular Jacobians) get the minimum-norm solution
            y = torch.linalg.pinv(small) @ e1[:, : k + 2]
            res = (e1[:, : k + 2] - small @ y).norm(dim=(1, 2))
            finite = torch.isfinite(res)
            stop = ~done & (~finite | (res <= eta * beta) | breakdown | (k == m - 1))
            x_k = stack_combine(y.squeeze(-1), basis[:, : k + 1])
            x = torch.where((stop & finite)[:, None], x_k, x)
            used = torch.where(stop, torch.full_like(used, k + 1), used)
            done = done | stop
            if bool(done.all()):
                break
        return x, used

    # -- forcing terms ---------------------------------------------------------------------
    def _next_eta(self, run: SolveRun, eta: Tensor, g_norm: Tensor, g_old_norm: Tensor) -> Tensor:
        if not isinstance(self.forcing, str):
            return torch.full_like(eta, self.forcing)
        ratio = g_norm / g_old_norm.clamp_min(torch.finfo(g_norm.dtype).tiny)
        new = _GAMMA * ratio**_ALPHA
        safeguard = _GAMMA * eta**_ALPHA
        new = torch.where(safeguard > 0.1, torch.maximum(new, safeguard), new)
        return torch.clamp(torch.maximum(new, 0.5 * self._abs_tol(run) / g_norm.clamp_min(1e-300)),
                           max=self.eta_max)

    @staticmethod
    def _abs_tol(run: SolveRun) -> Tensor:
        """The stopping tolerance expressed in ||g||, per sample."""
        g_norm = run.g.norm(dim=1)
        per_unit = g_norm / run.residual.clamp_min(torch.finfo(g_norm.dtype).tiny)
        return run.tol * torch.where(torch.isfinite(per_unit), per_unit, g_norm)

    def iterate(self, run: SolveRun, start: int = 0) -> int:
        """Newton steps until ``run`` is done, counting iterations from ``start`` (a solve
        handed over by another method); returns the iteration count reached."""
        b = run.z.shape[0]
        eta = run.z.new_full((b,), 0.5 if isinstance(self.forcing, str) else self.forcing)
        eta = eta.clamp(max=self.eta_max)
        # cap on eta, per sample: each step the line search had to shorten divides it by
        # 10 (down to 1e-6), so a direction that Newton's model got wrong is recomputed
        # more accurately next time instead of being loosened again by Eisenstat-Walker
        cap = torch.full_like(eta, self.eta_max)
        inner = failures = 0
        step = start
        while not run.done(step):
            dz, used = self._gmres(run, -run.g, eta)
            inner += int(used.max())
            g_old_norm = run.g.norm(dim=1)
            z_old, active = run.z, run.active
            if self.ls_steps:
                z_new, g_new, ok = backtrack(run, dz, self.ls_steps)
            else:
                z_new = run.z + dz
                g_new, ok = run.evaluate(z_new), None
            run.accept(z_new, g_new)
            step += 1
            if ok is not None:
                failed = active & ~ok
                failures += int(failed.sum())
                shortened = (z_new - z_old).norm(dim=1) < (1 - 1e-3) * dz.norm(dim=1)
                cap = torch.where(active & shortened, (cap * 0.1).clamp_min(1e-6), cap)
            eta = self._next_eta(run, eta, run.g.norm(dim=1), g_old_norm)
            eta = torch.where(active, torch.minimum(eta, cap), eta)
        run.note(f"newton_krylov: {inner} GMRES steps in {step - start} Newton steps (batch max)")
        if failures:
            run.note(f"newton_krylov line search found no decrease {failures} time(s)")
        return step
