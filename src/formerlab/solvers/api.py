"""The two entry points: ``solve_fixed_point`` (z = f(z)) and ``solve_root`` (g(z) = 0).

``solve_root``'s default method, ``"auto"``, picks by the number of unknowns per sample
n (the numel of one sample of ``z0``): ``"hybrid"`` (Powell's dogleg trust region around a
dense Broyden-updated Jacobian, MINPACK hybrd's algorithm) for n <= ``DENSE_MAX`` = 64,
``"broyden_newton"`` (limited-memory Broyden, then Jacobian-free Newton-Krylov) beyond.
Why: the dense method pays n evaluations per Jacobian and O(n^2) memory per sample, and
buys robustness on small, hard systems (singular or badly scaled Jacobians); for large n
the Jacobian alone costs more evaluations than a matrix-free solve needs in total (on
``formerlab bench roots``: Broyden tridiagonal n=500 takes 512 evaluations with
``hybrid``, 25 with ``broyden_newton``). Every Moré-Garbow-Hillstrom system in MINPACK's
test list has n <= 40 and so gets ``hybrid``. ``solve_fixed_point`` (and DEQ layers) are
unaffected: their default stays ``"anderson"``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor

from formerlab.solvers.base import Solver, SolverInfo
from formerlab.solvers.registry import SOLVERS

DENSE_MAX = 64
AUTO = "auto"


def auto_root_method(n: int) -> str:
    """The method ``solve_root(method="auto")`` uses for n unknowns per sample."""
    return "hybrid" if n <= DENSE_MAX else "broyden_newton"


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
    method: str | Solver = AUTO,
    tol: float = 1e-4,
    max_iter: int = 50,
    stop: str = "rel",
    **options: Any,
) -> tuple[Tensor, SolverInfo]:
    """Find g(z) = 0 for any ``g`` shaped like its input (per sample, batch first).

    ``method``: ``"auto"`` (default: ``"hybrid"`` for up to ``DENSE_MAX`` = 64 unknowns
    per sample, ``"broyden_newton"`` beyond; see the module docstring), ``"hybrid"``
    (Powell's hybrid dogleg trust region, MINPACK hybrd's algorithm), ``"broyden_newton"``
    (Broyden with a probed initial inverse Jacobian and a line search, switching to
    Newton-Krylov where it stalls), ``"broyden"`` or ``"newton_krylov"``; only methods
    registered with ``root=True`` accept root problems, the others raise ``ValueError``.
    With ``"auto"``, ``options`` go to the method it picks. ``stop="rel"`` measures
    ||g(z)|| / ||g(z0)||, ``"abs"`` measures ||g(z)||. ``max_iter`` counts steps (trial
    steps for ``hybrid``), not evaluations: ``info.evaluations`` has those (a dense
    Jacobian costs n). Returns ``(z, info)`` as ``solve_fixed_point`` does.
    """
    if isinstance(method, str) and method == AUTO:
        n = z0[0].numel() if isinstance(z0, Tensor) and z0.dim() >= 1 and z0.shape[0] else 0
        method = auto_root_method(n)
    return solve(
        g, z0, problem="root", method=method, tol=tol, max_iter=max_iter, stop=stop, **options
    )
