"""Broyden's "good" method with a bounded low-rank inverse Jacobian.

Solves g(z) = 0 (Broyden, 1965, Math. Comp. 19). The inverse-Jacobian estimate is never
formed as a d x d matrix: H = -h0 I + sum_i u_i v_i^T, kept as two (L, d) stacks, so
H g = -h0 g + U (V g) and s^T H = -h0 s^T + (s^T U) V cost O(L d) (the low-rank form
used for deep equilibrium models by Bai, Kolter & Koltun, 2019). After a step s with
residual change y the Sherman-Morrison form of Broyden's update adds one term:

    u = (s - H y) / (s^T H y),    v^T = s^T H.

H0 = -h0 I makes the first step z + h0 g, i.e. plain fixed-point iteration when
g = f(z) - z, whose Jacobian is close to -I when f is contractive. On a linear problem
good Broyden with full steps terminates in at most 2d iterations (Gay, 1979, SIAM J.
Numer. Anal. 16(4)); in practice it usually needs about d + 1.

Bounded memory: at most ``memory`` (u, v) pairs are kept. When all slots are used the
``on_full`` policy applies: ``"restart"`` (default) clears every pair and starts again
from H0 at the current iterate (limited-memory Broyden with restart, see van de Rotten &
Verduyn Lunel, 2003); ``"drop_oldest"`` overwrites the oldest pair, a sliding window.
Memory therefore never exceeds 2 * memory * d numbers per sample, whatever ``max_iter``.

Safeguard: a pair is skipped (H kept) for a sample whose |s^T H y| is below
1e-10 ||s|| ||H y||, the standard guard against a near-singular update.

Optional backtracking line search on ||g||: step lengths 1, 1/2, 1/4, ... (``ls_steps``
halvings) until ||g(z + a dz)|| <= (1 - 1e-4 a) ||g(z)||; if none qualifies the shortest
step is taken anyway (Broyden then still learns from it). Each trial costs one batched
function evaluation. Works for fixed-point and general root problems.
"""

from __future__ import annotations

import torch
from torch import Tensor

from formerlab.errors import check_choice, check_positive_int
from formerlab.solvers.base import Solver, SolveRun, masked_rows, stack_combine, stack_dot
from formerlab.solvers.registry import register

ON_FULL = ("restart", "drop_oldest")


@register(
    "broyden",
    description="good Broyden, low-rank inverse Jacobian with bounded memory (root or fixed point)",
    complexity="1 f-eval/iter (+ line search), O(L d) memory",
    root=True,
)
class Broyden(Solver):
    """Good Broyden with ``memory`` rank-one pairs, policy ``on_full``, optional line search.

    ``init_scale`` is h0 in H0 = -h0 I (the initial inverse-Jacobian guess). The default
    suits g = f(z) - z; for a root problem whose Jacobian is near +c I use ``-1 / c``.
    """

    name = "broyden"
    supports_root = True

    def __init__(
        self,
        memory: int = 30,
        on_full: str = "restart",
        line_search: bool = False,
        ls_steps: int = 4,
        init_scale: float = 1.0,
    ) -> None:
        self.memory = check_positive_int("memory", memory)
        self.on_full = check_choice("on_full", on_full, ON_FULL)
        if not isinstance(line_search, bool):
            raise ValueError(f"line_search={line_search!r} is not allowed; expected True/False")
        self.line_search = line_search
        self.ls_steps = check_positive_int("ls_steps", ls_steps)
        ok = isinstance(init_scale, (int, float)) and not isinstance(init_scale, bool)
        if not ok or init_scale == 0 or init_scale != init_scale or abs(init_scale) == float("inf"):
            raise ValueError(
                f"init_scale={init_scale!r} is not allowed; expected a finite non-zero number"
            )
        self.init_scale = float(init_scale)

    def _apply(self, us: Tensor, vs: Tensor, n: int, g: Tensor) -> Tensor:
        """H g = -h0 g + U (V g) over the first ``n`` pairs."""
        out = -self.init_scale * g
        if n:
            out = out + stack_combine(stack_dot(vs[:, :n], g), us[:, :n])
        return out

    def _apply_t(self, us: Tensor, vs: Tensor, n: int, s: Tensor) -> Tensor:
        """s^T H = -h0 s^T + (s^T U) V over the first ``n`` pairs."""
        out = -self.init_scale * s
        if n:
            out = out + stack_combine(stack_dot(us[:, :n], s), vs[:, :n])
        return out

    def _search(self, run: SolveRun, dz: Tensor) -> tuple[Tensor, Tensor]:
        """Backtracking on ||g|| per sample; returns the chosen (z_new, g_new)."""
        g_norm = run.g.norm(dim=1)
        a = torch.ones_like(g_norm)
        done = ~run.active
        z_new, g_new = run.z, run.g
        for trial in range(self.ls_steps + 1):
            z_try = run.z + a[:, None] * dz
            g_try = run.evaluate(z_try)
            n_try = g_try.norm(dim=1)
            ok = torch.isfinite(n_try) & (n_try <= (1 - 1e-4 * a) * g_norm)
            last = trial == self.ls_steps
            take = ~done & (ok | last)
            z_new = torch.where(take[:, None], z_try, z_new)
            g_new = torch.where(take[:, None], g_try, g_new)
            done = done | take
            if bool(done.all()):
                break
            a = torch.where(done, a, a / 2)
        return z_new, g_new

    def iterate(self, run: SolveRun) -> None:
        b, d = run.z.shape
        size = self.memory
        us = run.z.new_zeros(b, size, d)
        vs = run.z.new_zeros(b, size, d)
        used = 0  # pairs in use (restart) / pairs written so far (drop_oldest)
        restarts = 0
        step = 0
        # H g is carried from one iteration to the next: per iteration only H g_new and
        # s^T H are computed over the stored pairs (4 passes over U, V instead of 6),
        # because H y = H g_new - H g_old and H_new g_new = H g_new + u (v^T g_new)
        hg = self._apply(us, vs, 0, run.g)
        while not run.done(step):
            dz = -hg
            if self.line_search:
                z_new, g_new = self._search(run, dz)
            else:
                z_new = run.z + dz
                g_new = run.evaluate(z_new)
            z_old, g_old, active = run.z, run.g, run.active
            run.accept(z_new, g_new)
            step += 1
            if run.done(step):
                break
            n = min(used, size)
            if used >= size and self.on_full == "restart":
                # clear before computing the new pair so that it is a secant update of H0
                us.zero_()
                vs.zero_()
                used, n = 0, 0
                restarts += 1
                hg = self._apply(us, vs, 0, g_old)
            s = masked_rows(active, run.z - z_old)
            hg_new = self._apply(us, vs, n, run.g)
            hy = masked_rows(active, hg_new - hg)
            v = self._apply_t(us, vs, n, s)
            denom = (s * hy).sum(dim=1)
            # skip near-singular updates (a rejected or zero step gives denom = 0)
            keep = active & (denom.abs() > 1e-10 * s.norm(dim=1) * hy.norm(dim=1))
            u = masked_rows(keep, (s - hy) / torch.where(keep, denom, torch.ones_like(denom))[:, None])
            v = masked_rows(keep, v)
            slot = used % size
            if used >= size:  # drop_oldest: the pair in this slot leaves H
                hg_new = hg_new - us[:, slot] * (vs[:, slot] * run.g).sum(dim=1, keepdim=True)
            us[:, slot], vs[:, slot] = u, v
            used += 1
            hg = hg_new + u * (v * run.g).sum(dim=1, keepdim=True)
        if restarts:
            run.note(f"broyden memory ({size} pairs) was full {restarts} time(s): restarted")
