"""The two entry points: ``solve_fixed_point`` (z = f(z)) and ``solve_root`` (g(z) = 0)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor

from formerlab.solvers.base import Solver, SolverInfo
from formerlab.solvers.registry import SOLVERS


def get_solver(method: str | Solver, options: dict[str, Any]) -> Solver:
    """A solver instance: ``method`` is a registered name (built with ``options``) or an
    already-built ``Solver`` (then ``options`` must be empty)."""
    if isinstance(method, Solver):
        if options:
            raise ValueError(
                f"options {sorted(options)} given with an already-built solver {method!r}; "
                "pass a method name to build one, or set the options on the instance"
            )
        return method
    if not isinstance(method, str):
        raise ValueError(
            f"method={method!r} is not allowed; expected a solver name {SOLVERS.available()} "
            "or a Solver instance"
        )
    return SOLVERS.build(method, **options)


def solve(
    fn: Callable[[Tensor], Tensor],
    z0: Tensor,
    *,
    problem: str = "fixed_point",
    method: str | Solver = "anderson",
    tol: float = 1e-4,
    max_iter: int = 50,
    stop: str = "rel",
    **options: Any,
) -> tuple[Tensor, SolverInfo]:
    """Solve a fixed-point (``fn`` = f) or root (``fn`` = g) problem; see the two wrappers."""
    return get_solver(method, options).solve(
        fn, z0, problem=problem, tol=tol, max_iter=max_iter, stop=stop
    )


def solve_fixed_point(
    f: Callable[[Tensor], Tensor],
    z0: Tensor,
    *,
    method: str | Solver = "anderson",
    tol: float = 1e-4,
    max_iter: int = 50,
    stop: str = "rel",
    **options: Any,
) -> tuple[Tensor, SolverInfo]:
    """Find z = f(z), starting from ``z0`` (first dimension = batch, solved per sample).

    ``method``: ``"fixed_point"``, ``"anderson"``, ``"broyden"``, ``"newton_krylov"`` or
    ``"broyden_newton"`` (or a built ``Solver``);
    ``options`` go to the method (e.g. ``memory=5``). ``stop="rel"`` stops a sample when
    ||f(z) - z|| / ||f(z)|| <= ``tol``, ``"abs"`` when ||f(z) - z|| <= ``tol``.
    Runs without autograd. Returns ``(z, info)``: the lowest-residual iterate per sample
    and a ``SolverInfo`` (iterations, residual, lowest_residual, converged, trace, ...).
    """
    return solve(
        f, z0, problem="fixed_point", method=method, tol=tol, max_iter=max_iter, stop=stop,
        **options,
    )


def solve_root(
    g: Callable[[Tensor], Tensor],
    z0: Tensor,
    *,
    method: str | Solver = "broyden_newton",
    tol: float = 1e-4,
    max_iter: int = 50,
    stop: str = "rel",
    **options: Any,
) -> tuple[Tensor, SolverInfo]:
    """Find g(z) = 0 for any ``g`` shaped like its input (per sample, batch first).

    ``method``: ``"broyden_newton"`` (default: Broyden with a probed initial inverse
    Jacobian and a line search, switching to Newton-Krylov where it stalls),
    ``"broyden"`` or ``"newton_krylov"``; only methods registered with ``root=True``
    accept root problems, the others raise ``ValueError``. ``stop="rel"`` measures ||g(z)|| / ||g(z0)||, ``"abs"``
    measures ||g(z)||. Returns ``(z, info)`` as ``solve_fixed_point`` does.
    """
    return solve(
        g, z0, problem="root", method=method, tol=tol, max_iter=max_iter, stop=stop, **options
    )
