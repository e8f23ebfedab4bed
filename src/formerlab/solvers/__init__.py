"""Root and fixed-point solvers behind one registry and one result type.

``solve_fixed_point(f, z0, method="anderson")`` finds z = f(z); ``solve_root(g, z0)``
finds g(z) = 0 (default ``method="auto"``: ``"hybrid"``, Powell's dogleg trust region
around a dense Jacobian, for up to 64 unknowns per sample, ``"broyden_newton"`` beyond;
also ``"broyden"``, ``"newton_krylov"``). Both return ``(z, SolverInfo)`` with per-sample
stopping and diagnostics (see ``formerlab.solvers.base``). Every module of this package
registers its solver on import; the package imports them all.
"""

import importlib
import pkgutil

from formerlab.solvers.anderson import Anderson
from formerlab.solvers.api import solve, solve_fixed_point, solve_root
from formerlab.solvers.base import Solver, SolverInfo, SolveRun
from formerlab.solvers.broyden import Broyden
from formerlab.solvers.broyden_newton import BroydenNewton
from formerlab.solvers.fixed_point import FixedPointIteration
from formerlab.solvers.hybrid import Hybrid
from formerlab.solvers.newton_krylov import NewtonKrylov
from formerlab.solvers.registry import SOLVERS, available, build, describe, register

_INFRASTRUCTURE = {"api", "base", "registry"}
for _module in pkgutil.iter_modules(__path__):
    if not _module.name.startswith("_") and _module.name not in _INFRASTRUCTURE:
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "SOLVERS",
    "Anderson",
    "Broyden",
    "BroydenNewton",
    "FixedPointIteration",
    "Hybrid",
    "NewtonKrylov",
    "SolveRun",
    "Solver",
    "SolverInfo",
    "available",
    "build",
    "describe",
    "register",
    "solve",
    "solve_fixed_point",
    "solve_root",
]
