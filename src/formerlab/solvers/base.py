"""What every solver shares: the result type and the per-sample bookkeeping of a solve.

Problems are batched: the first dimension of ``z`` is the batch, and each sample is its own
problem with its own stopping decision. A sample stops when its residual reaches ``tol``
(or when its function value turns non-finite) and is never updated again, so an easy
sample's answer does not change while a hard one keeps iterating.

Residuals, per sample (flattened over all non-batch dimensions, 2-norm):

* fixed-point problems, g(z) = f(z) - z:  ``abs`` = ||f(z) - z||,
  ``rel`` = ||f(z) - z|| / ||f(z)||  (``relative_step``; the relative residual of Bai et al., 2019,
  "Deep Equilibrium Models", NeurIPS);
* root problems g(z) = 0:  ``abs`` = ||g(z)||,  ``rel`` = ||g(z)|| / (||g(z0)|| + eps),
  the reduction of the starting residual (a root problem has no natural scale of its own).

Solver state is float32, or float64 when the input is float64; the function is always
called with ``z`` in the input's dtype and shape, and the result comes back in that dtype.
The returned iterate is the one with the lowest residual seen, not the last one.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from formerlab.errors import check_choice, check_positive_float, check_positive_int
from formerlab.linalg.numerics import (
    autocast_off,
    compute_dtype,
    relative_step,
    with_callers_autocast,
)

PROBLEMS = ("fixed_point", "root")
STOPS = ("abs", "rel")
_EPS = 1e-12


@dataclass
class SolverInfo:
    """Diagnostics of one batched solve; every per-sample field has shape (B,).

    ``iterations``: updates the sample received before it stopped (or ``max_iter``).
    ``residual``: residual (in the ``stop`` metric) of the sample's last iterate.
    ``lowest_residual``: residual of the returned (lowest-residual) iterate.
    ``lowest_iteration``: iteration at which that iterate was reached.
    ``converged``: ``lowest_residual <= tol``.
    ``nonfinite``: the function returned inf/NaN for this sample (the sample was stopped
    there; the returned iterate is its last finite one).
    ``abs_residual`` / ``rel_residual``: both metrics of the returned iterate.
    ``trace``: (T + 1, B) residual after 0..T iterations; a stopped sample repeats its
    last value, a non-finite evaluation shows as ``inf``.
    ``evaluations``: function evaluations on the whole batch (line searches add some).
    """

    method: str
    problem: str
    stop: str
    tol: float
    max_iter: int
    iterations: Tensor
    residual: Tensor
    lowest_residual: Tensor
    lowest_iteration: Tensor
    converged: Tensor
    nonfinite: Tensor
    abs_residual: Tensor
    rel_residual: Tensor
    trace: Tensor
    evaluations: int
    notes: list[str] = field(default_factory=list)

    @property
    def batch_size(self) -> int:
        return int(self.iterations.numel())

    @property
    def all_converged(self) -> bool:
        return bool(self.converged.all())

    def summary(self) -> dict[str, float]:
        """Batch means as plain floats (for logs and training metrics)."""
        return {
            "iterations": float(self.iterations.float().mean()),
            "max_iterations": float(self.iterations.max()),
            "residual": float(self.lowest_residual.float().mean()),
            "max_residual": float(self.lowest_residual.float().max()),
            "abs_residual": float(self.abs_residual.float().mean()),
            "rel_residual": float(self.rel_residual.float().mean()),
            "nonconverged": float((~self.converged).float().mean()),
            "evaluations": float(self.evaluations),
        }

    def reasons(self) -> list[str]:
        """Per sample, why the solve ended: ``converged``, ``nonfinite``, ``diverged``
        (the last residual is >10x the lowest), ``stalled`` (no 10% improvement over the
        last half of the iterations) or ``slow`` (still improving: raise ``max_iter``)."""
        out = []
        for b in range(self.batch_size):
            if bool(self.converged[b]):
                out.append("converged")
            elif bool(self.nonfinite[b]):
                out.append("nonfinite")
            else:
                last, low = float(self.residual[b]), float(self.lowest_residual[b])
                t = int(self.iterations[b])
                half = float(self.trace[max(t // 2, 0), b])
                if last > 10 * low:
                    out.append("diverged")
                elif low > 0.9 * half:
                    out.append("stalled")
                else:
                    out.append("slow")
        return out

    def explain(self, max_samples: int = 5) -> str:
        """A human-readable account of the solve, naming each non-converged sample's reason."""
        n_bad = int((~self.converged).sum())
        head = (
            f"{self.method} ({self.problem}, stop={self.stop}, tol={self.tol:g}, "
            f"max_iter={self.max_iter}): {self.batch_size - n_bad}/{self.batch_size} "
            f"samples converged; iterations mean {float(self.iterations.float().mean()):.1f}, "
            f"max {int(self.iterations.max())}"
        )
        lines = [head]
        shown = 0
        for b, reason in enumerate(self.reasons()):
            if reason == "converged":
                continue
            if shown == max_samples:
                lines.append(f"  ... and {n_bad - shown} more")
                break
            hint = {
                "nonfinite": "the function returned inf/NaN; check the scale of f",
                "diverged": "residual grew; try damping, line_search=True or a smaller step",
                "stalled": "no progress; f may not be contractive here (try broyden, or "
                "regularise the Jacobian)",
                "slow": "still improving; raise max_iter or loosen tol",
            }[reason]
            lines.append(
                f"  sample {b}: {reason} - residual {float(self.residual[b]):.3g} after "
                f"{int(self.iterations[b])} iterations, lowest {float(self.lowest_residual[b]):.3g}"
                f" at iteration {int(self.lowest_iteration[b])} ({hint})"
            )
            shown += 1
        lines.extend(f"  note: {n}" for n in self.notes)
        return "\n".join(lines)


class SolveRun:
    """Per-sample bookkeeping of one solve; solvers drive it through ``evaluate``/``accept``.

    ``z`` and ``g`` are the flattened (B, d) state and its residual vector; a method
    proposes new iterates, evaluates them with ``evaluate`` and hands them to ``accept``,
    which updates only the active samples.
    """

    def __init__(
        self,
        fn: Callable[[Tensor], Tensor],
        z0: Tensor,
        *,
        problem: str,
        tol: float,
        max_iter: int,
        stop: str,
        method: str,
    ) -> None:
        check_choice("problem", problem, PROBLEMS)
        check_choice("stop", stop, STOPS)
        check_positive_float("tol", tol, allow_zero=True)
        check_positive_int("max_iter", max_iter, minimum=0)
        if not isinstance(z0, Tensor) or not z0.is_floating_point() or z0.dim() < 1:
            got = f"{z0.dtype} {tuple(z0.shape)}" if isinstance(z0, Tensor) else type(z0).__name__
            raise ValueError(
                f"z0 must be a floating-point tensor with a batch dimension first; got {got}"
            )
        if z0.shape[0] == 0:
            raise ValueError(f"z0 has an empty batch (shape {tuple(z0.shape)})")
        if not bool(torch.isfinite(z0).all()):
            raise ValueError("z0 contains inf or NaN; start the solver from a finite point")
        self.fn, self.problem, self.tol, self.max_iter = fn, problem, tol, max_iter
        self.stop, self.method = stop, method
        self.shape, self.dtype = z0.shape, z0.dtype
        self.sdtype = compute_dtype(z0.dtype)
        self.batch = z0.shape[0]
        self.evaluations = 0
        self.notes: list[str] = []

        self.z = z0.detach().reshape(self.batch, -1).to(self.sdtype).clone()
        g = self.evaluate(self.z)
        g_norm = g.norm(dim=1)
        finite = torch.isfinite(g_norm)
        self.g = torch.where(finite[:, None], g, torch.zeros_like(g))
        self.g0_norm = torch.where(finite, g_norm, torch.ones_like(g_norm))
        res = self._residual(self.z, g, g_norm, finite)
        self.residual = res
        self.best_z, self.best_res = self.z.clone(), res.clone()
        self.best_g = self.g.clone()
        self.best_iter = torch.zeros(self.batch, dtype=torch.long, device=z0.device)
        self.iterations = torch.zeros(self.batch, dtype=torch.long, device=z0.device)
        self.nonfinite = ~finite
        self.converged = finite & (res <= tol)
        self.active = ~self.converged & finite
        self._trace = [res.clone()]

    # -- function evaluation -------------------------------------------------------------
    def evaluate(self, z: Tensor) -> Tensor:
        """g(z) for the flat state ``z`` (B, d): f(z) - z for fixed points, g(z) for roots.

        Stopped samples are evaluated at their final iterate, whatever the method proposed
        for them, so f never sees them move.
        """
        if hasattr(self, "active"):
            z = blend(self.active, z, self.z)
        out = self.fn(z.reshape(self.shape).to(self.dtype))
        if not isinstance(out, Tensor) or out.shape != self.shape:
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(
                f"the solver's function must return a tensor shaped like z {tuple(self.shape)}; "
                f"got {got}"
            )
        self.evaluations += 1
        out = out.detach().reshape(self.batch, -1).to(self.sdtype)
        return out - z if self.problem == "fixed_point" else out

    def _residual(self, z: Tensor, g: Tensor, g_norm: Tensor, finite: Tensor) -> Tensor:
        """Per-sample residual in the ``stop`` metric from ||g||; inf where not finite."""
        num = g_norm if self.stop == "abs" else self._relative(z, g, g_norm)
        return torch.where(finite, num, torch.full_like(num, math.inf))

    def _relative(self, z: Tensor, g: Tensor, g_norm: Tensor) -> Tensor:
        if self.problem == "fixed_point":  # ||f(z) - z|| / ||f(z)||, f(z) = z + g
            return relative_step(z + g, z, dims=(1,))
        return g_norm / (self.g0_norm + _EPS)

    def abs_rel(self, z: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
        num = g.norm(dim=1)
        return num, self._relative(z, g, num)

    # -- updates -------------------------------------------------------------------------
    def accept(self, z_new: Tensor, g_new: Tensor, mask: Tensor | None = None) -> None:
        """Move the active samples (and ``mask``) to ``z_new``; stop those that converged.

        A sample whose ``g_new`` is not finite keeps its last iterate and is stopped with
        ``nonfinite`` set: nothing downstream ever sees the inf/NaN.
        """
        take = self.active if mask is None else self.active & mask
        # finiteness from the norms (one pass each, no (B, d) bool temporaries); a norm
        # that overflows counts as non-finite, which it is for the solver's purposes
        g_norm = g_new.norm(dim=1)
        finite = torch.isfinite(g_norm)
        if self.problem == "root":  # g can be finite at an infinite z (e.g. tanh)
            finite = finite & torch.isfinite(z_new.norm(dim=1))
        bad = take & ~finite
        take = take & finite
        res_new = self._residual(z_new, g_new, g_norm, finite)
        self.z = blend(take, z_new, self.z)
        self.g = blend(take, g_new, self.g)
        self.iterations = self.iterations + (take | bad).long()
        self.residual = torch.where(take, res_new, self.residual)
        self.residual = torch.where(bad, torch.full_like(res_new, math.inf), self.residual)
        better = take & (res_new < self.best_res)
        self.best_z = blend(better, z_new, self.best_z)
        self.best_g = blend(better, g_new, self.best_g)
        self.best_res = torch.where(better, res_new, self.best_res)
        self.best_iter = torch.where(better, self.iterations, self.best_iter)
        self.nonfinite = self.nonfinite | bad
        self.converged = self.converged | (take & (res_new <= self.tol))
        self.active = self.active & ~self.converged & ~bad
        self._trace.append(self.residual.clone())

    def done(self, step: int) -> bool:
        return step >= self.max_iter or not bool(self.active.any())

    def stalled(self, window: int) -> bool:
        """Whether no active sample reached a new lowest residual in its last ``window``
        iterations."""
        recent = self.iterations - self.best_iter < window
        return not bool((self.active & recent).any())

    def rewind(self) -> None:
        """Move every active sample back to its lowest-residual iterate (to hand the
        solve to another method from the best point found)."""
        self.z = blend(self.active, self.best_z, self.z)
        self.g = blend(self.active, self.best_g, self.g)
        self.residual = torch.where(self.active, self.best_res, self.residual)

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)

    def result(self) -> tuple[Tensor, SolverInfo]:
        """The lowest-residual iterate, shaped and typed like ``z0``, and the diagnostics."""
        abs_res, rel_res = self.abs_rel(self.best_z, self.best_g)
        info = SolverInfo(
            method=self.method,
            problem=self.problem,
            stop=self.stop,
            tol=self.tol,
            max_iter=self.max_iter,
            iterations=self.iterations,
            residual=self.residual,
            lowest_residual=self.best_res,
            lowest_iteration=self.best_iter,
            converged=self.best_res <= self.tol,
            nonfinite=self.nonfinite,
            abs_residual=abs_res,
            rel_residual=rel_res,
            trace=torch.stack(self._trace),
            evaluations=self.evaluations,
            notes=list(self.notes),
        )
        return self.best_z.reshape(self.shape).to(self.dtype), info


class Solver:
    """Base class: subclasses set ``name`` / ``supports_root`` and implement ``iterate``.

    ``solve(fn, z0, problem=..., tol=..., max_iter=..., stop=...)`` runs under
    ``torch.no_grad()`` (implicit layers differentiate the fixed point, not the solver)
    and returns ``(z, SolverInfo)``.
    """

    name = "solver"
    supports_root = False

    def iterate(self, run: SolveRun) -> None:
        raise NotImplementedError

    @torch.no_grad()
    def solve(
        self,
        fn: Callable[[Tensor], Tensor],
        z0: Tensor,
        *,
        problem: str = "fixed_point",
        tol: float = 1e-4,
        max_iter: int = 50,
        stop: str = "rel",
    ) -> tuple[Tensor, SolverInfo]:
        check_choice("problem", problem, PROBLEMS)
        if problem == "root" and not self.supports_root:
            raise ValueError(
                f"solver {self.name!r} solves fixed-point problems z = f(z) only, not a root "
                "problem g(z) = 0; use a root method ('auto', the default: 'hybrid' up to 64 "
                "unknowns, 'broyden_newton' beyond; or 'broyden', 'newton_krylov') for root problems (or pose the problem "
                "as solve_fixed_point(lambda z: z + g(z), ...), which converges only if that "
                "map contracts)"
            )
        # the solver's own updates (least squares, low-rank updates, Krylov bases) in its
        # compute dtype, the user's function under the caller's autocast, as if called there
        device = z0.device if isinstance(z0, Tensor) else torch.device("cpu")  # else SolveRun raises
        fn = with_callers_autocast(device)(fn)
        with autocast_off(device):
            run = SolveRun(
                fn, z0, problem=problem, tol=tol, max_iter=max_iter, stop=stop, method=self.name
            )
            if not run.done(0):
                self.iterate(run)
            return run.result()

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({opts})"


def blend(mask: Tensor, new: Tensor, old: Tensor) -> Tensor:
    """Rows of ``new`` where ``mask`` (B,) is set, else rows of ``old``; no copy when the
    mask is all-True or all-False (the common cases)."""
    if bool(mask.all()):
        return new
    if not bool(mask.any()):
        return old
    return torch.where(mask.view(-1, *([1] * (new.dim() - 1))), new, old)


def stack_dot(stack: Tensor, vec: Tensor) -> Tensor:
    """(B, n, d) . (B, d) -> (B, n): each stored row dotted with the sample's vector.

    Written as (1 x d) @ (d x n) per sample: on CPU this BLAS form is several times faster
    than the (n x d) @ (d x 1) one that einsum/matmul pick for the same product.
    """
    return torch.bmm(vec.unsqueeze(1), stack.transpose(1, 2)).squeeze(1)


def stack_combine(coef: Tensor, stack: Tensor) -> Tensor:
    """(B, n) x (B, n, d) -> (B, d): per-sample linear combination of the stored rows."""
    return torch.bmm(coef.unsqueeze(1), stack).squeeze(1)


def masked_rows(active: Tensor, t: Tensor) -> Tensor:
    """Zero the rows of ``t`` (B, ...) of samples that are not active."""
    shape = (-1,) + (1,) * (t.dim() - 1)
    return t * active.to(t.dtype).view(shape)


def backtrack(
    run: SolveRun, dz: Tensor, steps: int, slack: float = 0.0
) -> tuple[Tensor, Tensor, Tensor]:
    """Backtracking line search on ||g|| per sample along ``dz``.

    Step lengths 1, 1/2, ..., 2^-steps until ||g(z + a dz)|| <= (1 + slack - 1e-4 a) ||g(z)||
    (the Armijo-type condition on the residual norm of Dennis & Schnabel, 1983, sec. 6.3;
    ``slack`` > 0 makes it non-monotone);
    a sample for which no length qualifies takes the shortest one. Returns
    ``(z_new, g_new, ok)``, ``ok`` (B,) marking the samples whose step met the condition.
    One batched evaluation per trial; trials stop once every active sample has its step.
    """
    g_norm = run.g.norm(dim=1)
    a = torch.ones_like(g_norm)
    done = ~run.active
    ok_all = torch.zeros_like(done)
    z_new, g_new = run.z, run.g
    for trial in range(steps + 1):
        z_try = run.z + a[:, None] * dz
        g_try = run.evaluate(z_try)
        n_try = g_try.norm(dim=1)
        ok = torch.isfinite(n_try) & torch.isfinite(z_try.norm(dim=1))
        ok = ok & (n_try <= (1 + slack - 1e-4 * a) * g_norm)
        take = ~done & (ok | (trial == steps))
        z_new = torch.where(take[:, None], z_try, z_new)
        g_new = torch.where(take[:, None], g_try, g_new)
        ok_all = ok_all | (~done & ok)
        done = done | take
        if bool(done.all()):
            break
        a = torch.where(done, a, a / 2)
    return z_new, g_new, ok_all


def secant_scale(s: Tensor, y: Tensor) -> Tensor:
    """Per-sample h with h y ~ s in least squares (Barzilai & Borwein, 1988): s.y / y.y.

    The scalar inverse-Jacobian estimate along one secant pair, sign included. Where s.y
    is too small to trust (|s.y| <= 1e-8 ||s|| ||y||, e.g. a rotation) or y is zero, the
    magnitude ||s|| / ||y|| is used with the sign of s.y (+ if zero), and 1 if y = 0.
    """
    sy = (s * y).sum(dim=1)
    yy = (y * y).sum(dim=1)
    s_norm, y_norm = s.norm(dim=1), y.norm(dim=1)
    tiny = torch.finfo(s.dtype).tiny
    bb = sy / yy.clamp_min(tiny)
    sign = torch.where(sy < 0, -torch.ones_like(sy), torch.ones_like(sy))
    fallback = sign * s_norm / y_norm.clamp_min(tiny)
    h = torch.where(sy.abs() > 1e-8 * s_norm * y_norm, bb, fallback)
    good = torch.isfinite(h) & (y_norm > 0) & (h != 0)
    return torch.where(good, h, torch.ones_like(h))


def fd_jvp(run: SolveRun, z: Tensor, g: Tensor, v: Tensor) -> Tensor:
    """J(z) v by a forward difference (g(z + e v) - g) / e, per sample.

    e = sqrt(eps) (1 + ||z||) / ||v||, the usual balance of truncation and rounding error
    (Kelley, 2003, "Solving Nonlinear Equations with Newton's Method", sec. 3.2.5).
    Costs one batched evaluation; a zero ``v`` gives 0.
    """
    v_norm = v.norm(dim=1)
    root_eps = torch.finfo(z.dtype).eps ** 0.5
    e = root_eps * (1 + z.norm(dim=1)) / v_norm.clamp_min(torch.finfo(z.dtype).tiny)
    e = torch.where(v_norm > 0, e, torch.ones_like(e))
    return (run.evaluate(z + e[:, None] * v) - g) / e[:, None]
