"""Root and fixed-point solvers behind one registry and one result type.

``solve_fixed_point(f, z0, method="anderson")`` finds z = f(z); ``solve_root(g, z0,
method="broyden")`` finds g(z) = 0. Both return ``(z, SolverInfo)`` with per-sample
stopping and diagnostics (see ``formerlab.solvers.base``). Every module of this package
registers its solver on import; the package imports them all.
"""

import importlib
import pkgutil

from formerlab.solvers.api import solve, solve_fixed_point, solve_root
from formerlab.solvers.base import Solver, SolverInfo, SolveRun
from formerlab.solvers.registry import SOLVERS, available, build, describe, register

_INFRASTRUCTURE = {"api", "base", "registry"}
for _module in pkgutil.iter_modules(__path__):
    if not _module.name.startswith("_") and _module.name not in _INFRASTRUCTURE:
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "SOLVERS",
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
