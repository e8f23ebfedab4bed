"""Broyden's "good" method with a bounded low-rank inverse Jacobian.

Solves g(z) = 0 (Broyden, 1965, Math. Comp. 19). The inverse-Jacobian estimate is never
formed as a d x d matrix: H = -h0 I + sum_i u_i v_i^T, kept as two (L, d) stacks, so
H g = -h0 g + U (V g) and s^T H = -h0 s^T + (s^T U) V cost O(L d) (the low-rank form
used for deep equilibrium models by Bai, Kolter & Koltun, 2019). After a step s with
residual change y the Sherman-Morrison form of Broyden's update adds one term:

    u = (s - H y) / (s^T H y),    v^T = s^T H.

Initial inverse Jacobian H0 = h I, per sample. Fixed-point problems (g = f(z) - z, whose
Jacobian is close to -I when f is contractive) use h = -1 by default: the first step is
z + g, plain fixed-point iteration, and no evaluation is spent on a probe. Root problems
have no such prior (for g(z) = z^3 + z - c the Jacobian is near +I, and H0 = -I sends the
first step the wrong way), so by default one probe step s = -t g(z0) of relative length
sqrt(eps) is evaluated and h is the Barzilai-Borwein scale s.y / y.y of the pair (s, y),
sign included; the pair also gives the first rank-one update. ``init_scale`` fixes
h = -init_scale instead (the pre-probe behaviour). On a linear problem good Broyden with
full steps terminates in at most 2d iterations (Gay, 1979, SIAM J. Numer. Anal. 16(4)); in
practice it usually needs about d + 1.

Bounded memory: at most ``memory`` (u, v) pairs are kept. When all slots are used the
``on_full`` policy applies: ``"restart"`` (default) clears every pair and starts again
from H0 at the current iterate (limited-memory Broyden with restart, see van de Rotten &
Verduyn Lunel, 2003); ``"drop_oldest"`` overwrites the oldest pair, a sliding window.
Memory therefore never exceeds 2 * memory * d numbers per sample, whatever ``max_iter``.

Safeguard: a pair is skipped (H kept) for a sample whose |s^T H y| is below
1e-10 ||s|| ||H y||, the standard guard against a near-singular update.

Globalisation (``line_search``, default on for root problems, off for fixed points):
backtracking on ||g|| (``formerlab.solvers.base.backtrack``, ``ls_steps`` halvings),
non-monotone: at iteration k a step may raise ||g|| by the factor 1 + eta_k, eta_k =
``ls_slack`` / (k + 1)^2 (summable, so the slack dies out; the derivative-free line search
of Li & Fukushima, 2000, Optim. Methods Softw. 13(3), made for Broyden-like methods, whose
directions need not be descent directions). A monotone search (``ls_slack=0``) rejects the
early steps in which Broyden is still learning the Jacobian: on the MGH problems it
needed 285 evaluations on Rosenbrock instead of 14.
Restart on stall: a sample whose line search finds no decrease has its pairs cleared and
h re-scaled from its last secant pair (s, y), so a bad inverse-Jacobian estimate is
dropped instead of steering further steps; the count is reported in ``info.notes``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from formerlab.errors import check_choice, check_positive_float, check_positive_int
from formerlab.solvers.base import (
    Solver,
    SolveRun,
    backtrack,
    masked_rows,
    secant_scale,
    stack_combine,
    stack_dot,
)
from formerlab.solvers.registry import register

ON_FULL = ("restart", "drop_oldest")


@register(
    "broyden",
    description="good Broyden, low-rank inverse Jacobian with bounded memory (root or fixed point)",
    complexity="1 f-eval/iter (+ line search), O(L d) memory",
    root=True,
)
class Broyden(Solver):
    """Good Broyden with ``memory`` rank-one pairs, policy ``on_full``, line search.

    ``init_scale``: None (default) picks H0 per problem (-I for fixed points, a probed
    secant scale for roots, see the module docstring); a number c fixes H0 = -c I.
    ``line_search``: None (default) = on for root problems, off for fixed points.
    ``ls_slack``: eta_0 of the non-monotone line search (0 = monotone).
    """

    name = "broyden"
    supports_root = True

    def __init__(
        self,
        memory: int = 30,
        on_full: str = "restart",
        line_search: bool | None = None,
        ls_steps: int = 4,
        init_scale: float | None = None,
        ls_slack: float = 10.0,
    ) -> None:
        self.memory = check_positive_int("memory", memory)
        self.on_full = check_choice("on_full", on_full, ON_FULL)
        if line_search is not None and not isinstance(line_search, bool):
            raise ValueError(
                f"line_search={line_search!r} is not allowed; expected True, False or None (auto)"
            )
        self.line_search = line_search
        self.ls_steps = check_positive_int("ls_steps", ls_steps)
        self.ls_slack = check_positive_float("ls_slack", ls_slack, allow_zero=True)
        if init_scale is not None:
            ok = isinstance(init_scale, (int, float)) and not isinstance(init_scale, bool)
            if not ok or init_scale == 0 or not math.isfinite(init_scale):
                raise ValueError(
                    f"init_scale={init_scale!r} is not allowed; expected a finite non-zero "
                    "number or None (auto)"
                )
            init_scale = float(init_scale)
        self.init_scale = init_scale

    @staticmethod
    def _apply(h: Tensor, us: Tensor, vs: Tensor, n: int, g: Tensor) -> Tensor:
        """H g = h g + U (V g) over the first ``n`` pairs (``h`` per sample, (B, 1))."""
        out = h * g
        if n:
            out = out + stack_combine(stack_dot(vs[:, :n], g), us[:, :n])
        return out

    @staticmethod
    def _apply_t(h: Tensor, us: Tensor, vs: Tensor, n: int, s: Tensor) -> Tensor:
        """s^T H = h s^T + (s^T U) V over the first ``n`` pairs."""
        out = h * s
        if n:
            out = out + stack_combine(stack_dot(us[:, :n], s), vs[:, :n])
        return out

    def _initial_scale(self, run: SolveRun) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """h (B, 1) of H0 = h I, and the probe's secant pair (s, y) when one was taken."""
        b = run.z.shape[0]
        if self.init_scale is not None or run.problem == "fixed_point":
            c = 1.0 if self.init_scale is None else self.init_scale
            return run.z.new_full((b, 1), -c), None, None
        # probe along -g: ||s|| = sqrt(eps) max(||z||, 1), small enough to be a
        # derivative estimate, large enough to stay clear of rounding
        root_eps = torch.finfo(run.sdtype).eps ** 0.5
        length = root_eps * run.z.norm(dim=1).clamp_min(1.0)
        g_norm = run.g.norm(dim=1).clamp_min(torch.finfo(run.sdtype).tiny)
        s = masked_rows(run.active, -(length / g_norm)[:, None] * run.g)
        y = run.evaluate(run.z + s) - run.g
        good = torch.isfinite(y.norm(dim=1))
        y = torch.where(good[:, None], y, torch.zeros_like(y))
        s = masked_rows(good, s)
        return secant_scale(s, y)[:, None], s, y

    def iterate(self, run: SolveRun, stall: int | None = None) -> int:
        """Run until ``run`` is done; with ``stall``, also return early once no active
        sample has reached a new lowest residual in the last ``stall`` iterations.
        Returns the number of iterations taken."""
        b, d = run.z.shape
        size = self.memory
        line_search = run.problem == "root" if self.line_search is None else self.line_search
        us = run.z.new_zeros(b, size, d)
        vs = run.z.new_zeros(b, size, d)
        h, s_probe, y_probe = self._initial_scale(run)
        used = 0  # pairs in use (restart) / pairs written so far (drop_oldest)
        restarts = stalls = 0
        if s_probe is not None:
            used = self._add_pair(h, us, vs, 0, s_probe, h * y_probe, run.active)
        # H g is carried from one iteration to the next: per iteration only H g_new and
        # s^T H are computed over the stored pairs (4 passes over U, V instead of 6),
        # because H y = H g_new - H g_old and H_new g_new = H g_new + u (v^T g_new)
        hg = self._apply(h, us, vs, used, run.g)
        step = 0
        while not run.done(step):
            dz = -hg
            if line_search:
                z_new, g_new, ok = backtrack(run, dz, self.ls_steps, self.ls_slack / (step + 1) ** 2)
            else:
                z_new = run.z + dz
                g_new = run.evaluate(z_new)
                ok = None
            z_old, g_old, active = run.z, run.g, run.active
            run.accept(z_new, g_new)
            step += 1
            if run.done(step) or (stall is not None and run.stalled(stall)):
                break
            n = min(used, size)
            if used >= size and self.on_full == "restart":
                # clear before computing the new pair so that it is a secant update of H0
                us.zero_()
                vs.zero_()
                used, n = 0, 0
                restarts += 1
                hg = self._apply(h, us, vs, 0, g_old)
            s = masked_rows(active, run.z - z_old)
            no_decrease = None if ok is None else active & ~ok
            if no_decrease is not None and bool(no_decrease.any()):
                # restart on stall: forget this sample's pairs, rescale H0 from (s, y)
                stalls += int(no_decrease.sum())
                keep_rows = (~no_decrease).to(us.dtype)[:, None, None]
                us.mul_(keep_rows)
                vs.mul_(keep_rows)
                h = torch.where(no_decrease[:, None], secant_scale(s, run.g - g_old)[:, None], h)
                hg = torch.where(no_decrease[:, None], h * g_old, hg)
            hg_new = self._apply(h, us, vs, n, run.g)
            hy = masked_rows(active, hg_new - hg)
            slot = used % size
            if used >= size:  # drop_oldest: the pair in this slot leaves H
                hg_new = hg_new - us[:, slot] * (vs[:, slot] * run.g).sum(dim=1, keepdim=True)
            used = self._add_pair(h, us, vs, used, s, hy, active, n)
            hg = hg_new + us[:, slot] * (vs[:, slot] * run.g).sum(dim=1, keepdim=True)
        if restarts:
            run.note(f"broyden memory ({size} pairs) was full {restarts} time(s): restarted")
        if stalls:
            run.note(f"broyden line search found no decrease {stalls} time(s): H reset there")
        return step

    def _add_pair(
        self, h: Tensor, us: Tensor, vs: Tensor, used: int, s: Tensor, hy: Tensor,
        active: Tensor, n: int | None = None,
    ) -> int:
        """Write the Broyden pair of step ``s`` (with ``hy`` = H y) into the next slot."""
        n = min(used, self.memory) if n is None else n
        v = self._apply_t(h, us, vs, n, s)
        denom = (s * hy).sum(dim=1)
        # skip near-singular updates (a rejected or zero step gives denom = 0)
        keep = active & (denom.abs() > 1e-10 * s.norm(dim=1) * hy.norm(dim=1))
        safe = torch.where(keep, denom, torch.ones_like(denom))
        slot = used % self.memory
        us[:, slot] = masked_rows(keep, (s - hy) / safe[:, None])
        vs[:, slot] = masked_rows(keep, v)
        return used + 1
