"""Anderson acceleration (Anderson, 1965; Walker & Ni, 2011, SIAM J. Numer. Anal. 49(4)).

Keeps the last ``memory`` iterates x_i and residuals g_i = f(x_i) - x_i and mixes them:

    alpha = argmin ||sum_i alpha_i g_i||  s.t.  sum_i alpha_i = 1
          = (G G^T + lam I)^{-1} 1 / (1^T (G G^T + lam I)^{-1} 1)
    x_new = sum_i alpha_i (x_i + beta g_i)

(the regularised normal-equation form used in the DEQ literature, e.g. Kolter, Duvenaud &
Johnson, "Deep Implicit Layers" tutorial, 2020). Here ``lam`` is relative to the mean
squared residual norm in the window (lam * trace(G G^T) / n), so the regularisation is
scale-free: it neither dominates tiny residuals near convergence nor vanishes for large
ones. The Gram matrix G G^T is updated one row per iteration (O(m d) per step, not
O(m^2 d)). Fixed-point problems only.
"""

from __future__ import annotations

import torch

from formerlab.errors import check_positive_float, check_positive_int
from formerlab.solvers.base import Solver, SolveRun, stack_combine, stack_dot
from formerlab.solvers.registry import register


@register(
    "anderson",
    description="Anderson acceleration: mixes the last m iterates (fixed-point problems only)",
    complexity="1 f-eval/iter, O(m d) memory",
    root=False,
)
class Anderson(Solver):
    """Anderson acceleration with ``memory`` m, relative regularisation ``lam``, mixing ``beta``."""

    name = "anderson"
    supports_root = False

    def __init__(self, memory: int = 5, lam: float = 1e-4, beta: float = 1.0) -> None:
        self.memory = check_positive_int("memory", memory)
        self.lam = check_positive_float("lam", lam, allow_zero=True)
        self.beta = check_positive_float("beta", beta)

    def iterate(self, run: SolveRun) -> None:
        b, d = run.z.shape
        m = self.memory
        # store x_i + beta g_i (what gets mixed) and g_i (what the Gram matrix needs)
        ys = run.z.new_zeros(b, m, d)
        gs = run.z.new_zeros(b, m, d)
        gram = run.z.new_zeros(b, m, m)
        tiny = torch.finfo(run.sdtype).tiny
        step = 0
        while not run.done(step):
            slot = step % m
            n = min(step + 1, m)
            torch.add(run.z, run.g, alpha=self.beta, out=ys[:, slot])
            gs[:, slot] = run.g
            row = stack_dot(gs[:, :n], run.g)
            gram[:, slot, :n] = row
            gram[:, :n, slot] = row
            if n == 1:
                z_new = run.z + self.beta * run.g
            else:
                h = gram[:, :n, :n]
                scale = h.diagonal(dim1=1, dim2=2).mean(dim=1)
                reg = (self.lam * scale + tiny)[:, None, None] * torch.eye(
                    n, dtype=h.dtype, device=h.device
                )
                ones = h.new_ones(b, n, 1)
                w, _ = torch.linalg.solve_ex(h + reg, ones)
                alpha = (w / w.sum(dim=1, keepdim=True)).squeeze(-1)
                # a singular window (e.g. a stopped sample repeating one point) falls back
                # to a plain step on the newest iterate instead of producing NaN
                ok = torch.isfinite(alpha).all(dim=1, keepdim=True)
                newest = torch.zeros_like(alpha)
                newest[:, slot] = 1.0
                alpha = torch.where(ok, alpha, newest)
                z_new = stack_combine(alpha, ys[:, :n])
            run.accept(z_new, run.evaluate(z_new))
            step += 1
