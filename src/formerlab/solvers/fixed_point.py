"""Plain (optionally damped) fixed-point iteration: z <- (1 - tau) z + tau f(z).

Converges linearly when f is a contraction (Banach); damping tau < 1 helps when the
Jacobian of f has eigenvalues near -1 (Krasnoselskii-Mann iteration).
"""

from __future__ import annotations

from formerlab.errors import check_positive_float
from formerlab.solvers.base import Solver, SolveRun
from formerlab.solvers.registry import register


@register(
    "fixed_point",
    description="plain fixed-point iteration with optional damping (fixed-point problems only)",
    complexity="1 f-eval/iter, O(d) memory",
    root=False,
)
class FixedPointIteration(Solver):
    """z_{k+1} = z_k + damping * (f(z_k) - z_k); ``damping`` in (0, 1]."""

    name = "fixed_point"
    supports_root = False

    def __init__(self, damping: float = 1.0) -> None:
        check_positive_float("damping", damping)
        if damping > 1:
            raise ValueError(f"damping={damping!r} is not allowed; expected 0 < damping <= 1")
        self.damping = float(damping)

    def iterate(self, run: SolveRun) -> None:
        step = 0
        while not run.done(step):
            z_new = run.z + self.damping * run.g
            run.accept(z_new, run.evaluate(z_new))
            step += 1
