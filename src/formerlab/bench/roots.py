"""Root-finding benchmark: the Moré-Garbow-Hillstrom nonlinear equations against SciPy.

Problems (Moré, Garbow & Hillstrom, 1981, "Testing Unconstrained Optimization Software",
ACM TOMS 7(1), section 3, the systems of nonlinear equations, in the form of MINPACK's
``vecfcn``/``initpt`` test drivers, which fix the Wood system as its gradient equations
and the standard starting points): Rosenbrock (n=2), Powell singular (4), Powell badly
scaled (2), Wood (4), helical valley (3), and at n=10 Brown almost-linear, discrete
boundary value, discrete integral equation, trigonometric, variably dimensioned, Broyden
tridiagonal and Broyden banded. Two more: the elementwise cubic z^3 + z - c (n=16, c
evenly spaced in [-5, 5]; the Jacobian is near +I, the case that broke Broyden's -I
start) and a DEQ-style tanh(W z + b) - z (n=32, ||W||_2 = 2, so z = tanh(W z + b) is not
a contraction and plain iteration need not converge).

Every method gets the same float64 function (one definition, in torch; SciPy calls it on
a batch of one). Reported per problem and method: solved (max_i |g_i(z)| <= 1e-8,
recomputed here from the returned z, whatever the method says), the method's own claim
(``converged`` / ``success``), function evaluations (counted by wrapping g, the same
way for every method; finite-difference and J-v evaluations included) and the wall time
(median of ``repeats``). SciPy methods: ``hybr`` (MINPACK's hybrd, Powell's hybrid
dogleg with a finite-difference Jacobian and Broyden updates; default options),
``broyden1`` and ``krylov`` (``fatol=1e-8``, ``maxiter`` as ours). Ours stop at
||g||_2 <= 1e-8 (``stop="abs"``), which implies max |g_i| <= 1e-8.

SciPy is a benchmark dependency only: it is imported inside ``scipy_methods`` here.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from formerlab import solvers

TOL = 1e-8
F64 = torch.float64
OURS = ("broyden", "newton_krylov")
SCIPY = ("hybr", "broyden1", "krylov")


@dataclass(frozen=True)
class Problem:
    """g: (B, n) -> (B, n) in torch; x0: the standard starting point."""

    name: str
    g: Callable[[Tensor], Tensor]
    x0: tuple[float, ...]

    @property
    def n(self) -> int:
        return len(self.x0)


# -- the MGH systems (batched over the first dimension) -------------------------------------
def rosenbrock(x: Tensor) -> Tensor:
    return torch.stack([1 - x[:, 0], 10 * (x[:, 1] - x[:, 0] ** 2)], dim=1)


def powell_singular(x: Tensor) -> Tensor:
    x1, x2, x3, x4 = x.unbind(1)
    return torch.stack(
        [x1 + 10 * x2, 5**0.5 * (x3 - x4), (x2 - 2 * x3) ** 2, 10**0.5 * (x1 - x4) ** 2], dim=1
    )


def powell_badly_scaled(x: Tensor) -> Tensor:
    x1, x2 = x.unbind(1)
    return torch.stack([1e4 * x1 * x2 - 1, torch.exp(-x1) + torch.exp(-x2) - 1.0001], dim=1)


def wood(x: Tensor) -> Tensor:
    x1, x2, x3, x4 = x.unbind(1)
    t1, t2 = x2 - x1**2, x4 - x3**2
    return torch.stack(
        [
            -200 * x1 * t1 - (1 - x1),
            200 * t1 + 20.2 * (x2 - 1) + 19.8 * (x4 - 1),
            -180 * x3 * t2 - (1 - x3),
            180 * t2 + 20.2 * (x4 - 1) + 19.8 * (x2 - 1),
        ],
        dim=1,
    )


def helical_valley(x: Tensor) -> Tensor:
    x1, x2, x3 = x.unbind(1)
    two_pi = 2 * math.pi
    theta = torch.where(
        x1 > 0,
        torch.atan(x2 / x1) / two_pi,
        torch.where(x1 < 0, torch.atan(x2 / x1) / two_pi + 0.5, 0.25 * torch.sign(x2)),
    )
    # sign(0) = 0 in torch, +1 in Fortran's SIGN: x1 = x2 = 0 gives 0.25
    theta = torch.where((x1 == 0) & (x2 == 0), torch.full_like(theta, 0.25), theta)
    r = torch.sqrt(x1**2 + x2**2)
    return torch.stack([10 * (x3 - 10 * theta), 10 * (r - 1), x3], dim=1)


def brown_almost_linear(x: Tensor) -> Tensor:
    n = x.shape[1]
    out = x + x.sum(dim=1, keepdim=True) - (n + 1)
    return torch.cat([out[:, :-1], x.prod(dim=1, keepdim=True) - 1], dim=1)


def _grid(x: Tensor) -> tuple[float, Tensor]:
    n = x.shape[1]
    h = 1.0 / (n + 1)
    return h, torch.arange(1, n + 1, dtype=x.dtype, device=x.device) * h


def discrete_boundary_value(x: Tensor) -> Tensor:
    h, t = _grid(x)
    left = torch.nn.functional.pad(x, (1, 0))[:, :-1]
    right = torch.nn.functional.pad(x, (0, 1))[:, 1:]
    return 2 * x - left - right + h**2 * (x + t + 1) ** 3 / 2


def discrete_integral_equation(x: Tensor) -> Tensor:
    h, t = _grid(x)
    cube = (x + t + 1) ** 3
    below = torch.cumsum(t * cube, dim=1)  # sum_{j <= i} t_j (x_j + t_j + 1)^3
    above_incl = torch.flip(torch.cumsum(torch.flip((1 - t) * cube, [1]), dim=1), [1])
    above = above_incl - (1 - t) * cube  # sum_{j > i}
    return x + h * ((1 - t) * below + t * above) / 2


def trigonometric(x: Tensor) -> Tensor:
    n = x.shape[1]
    k = torch.arange(1, n + 1, dtype=x.dtype, device=x.device)
    cos = torch.cos(x)
    return n - cos.sum(dim=1, keepdim=True) + k * (1 - cos) - torch.sin(x)


def variably_dimensioned(x: Tensor) -> Tensor:
    n = x.shape[1]
    k = torch.arange(1, n + 1, dtype=x.dtype, device=x.device)
    s = ((x - 1) * k).sum(dim=1, keepdim=True)
    return x - 1 + k * s * (1 + 2 * s**2)


def broyden_tridiagonal(x: Tensor) -> Tensor:
    left = torch.nn.functional.pad(x, (1, 0))[:, :-1]
    right = torch.nn.functional.pad(x, (0, 1))[:, 1:]
    return (3 - 2 * x) * x - left - 2 * right + 1


def broyden_banded(x: Tensor, ml: int = 5, mu: int = 1) -> Tensor:
    n = x.shape[1]
    i = torch.arange(n, device=x.device)
    band = ((i[None, :] - i[:, None]) >= -ml) & ((i[None, :] - i[:, None]) <= mu)
    band = (band & (i[None, :] != i[:, None])).to(x.dtype)  # row i: j in J_i
    return x * (2 + 5 * x**2) + 1 - (x * (1 + x)) @ band.T


def cubic(c: Tensor) -> Callable[[Tensor], Tensor]:
    return lambda x: x**3 + x - c


def deq_tanh(n: int = 32, norm: float = 2.0, seed: int = 0) -> Callable[[Tensor], Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, n, generator=g, dtype=F64)
    w = norm * w / torch.linalg.matrix_norm(w, 2)
    b = torch.randn(n, generator=g, dtype=F64)
    return lambda z: torch.tanh(z @ w.T + b) - z


def problems() -> list[Problem]:
    """The benchmark's problems with their standard starting points (MINPACK ``initpt``)."""
    n = 10
    h = 1.0 / (n + 1)
    grid_start = tuple((j * h) * (j * h - 1) for j in range(1, n + 1))
    c = torch.linspace(-5, 5, 16, dtype=F64)
    return [
        Problem("rosenbrock", rosenbrock, (-1.2, 1.0)),
        Problem("powell_singular", powell_singular, (3.0, -1.0, 0.0, 1.0)),
        Problem("powell_badly_scaled", powell_badly_scaled, (0.0, 1.0)),
        Problem("wood", wood, (-3.0, -1.0, -3.0, -1.0)),
        Problem("helical_valley", helical_valley, (-1.0, 0.0, 0.0)),
        Problem("brown_almost_linear", brown_almost_linear, (0.5,) * n),
        Problem("discrete_boundary_value", discrete_boundary_value, grid_start),
        Problem("discrete_integral_equation", discrete_integral_equation, grid_start),
        Problem("trigonometric", trigonometric, (1.0 / n,) * n),
        Problem("variably_dimensioned", variably_dimensioned, tuple(1 - j / n for j in range(1, n + 1))),
        Problem("broyden_tridiagonal", broyden_tridiagonal, (-1.0,) * n),
        Problem("broyden_banded", broyden_banded, (-1.0,) * n),
        Problem("cubic_x3+x-c", cubic(c), (0.0,) * 16),
        Problem("deq_tanh", deq_tanh(), (0.0,) * 32),
    ]


# -- running the methods -----------------------------------------------------------------
@dataclass
class Row:
    """One method on one problem."""

    problem: str
    n: int
    method: str
    solved: bool
    claimed: bool
    max_residual: float
    evaluations: int
    time_s: float


class Counted:
    """Wraps g to count its calls (a batch of one per call)."""

    def __init__(self, g: Callable[[Tensor], Tensor]) -> None:
        self.g, self.calls = g, 0

    def __call__(self, x: Tensor) -> Tensor:
        self.calls += 1
        return self.g(x)


def max_residual(problem: Problem, z: Tensor) -> float:
    """max_i |g_i(z)| recomputed from a returned point (inf if not finite)."""
    with torch.no_grad():
        r = problem.g(z.reshape(1, -1).to(F64)).abs().max()
    return float(r) if bool(torch.isfinite(r)) else math.inf


def run_ours(problem: Problem, method: str | None, max_iter: int) -> tuple[Tensor, bool, int]:
    """``solve_root`` (its default method when ``method`` is None) from the start point."""
    counted = Counted(problem.g)
    z0 = torch.tensor([problem.x0], dtype=F64)
    kw = {} if method is None else {"method": method}
    z, info = solvers.solve_root(counted, z0, tol=TOL, stop="abs", max_iter=max_iter, **kw)
    return z[0], bool(info.converged[0]), counted.calls


def scipy_methods() -> dict[str, Callable[[Problem, int], tuple[Tensor, bool, int]]]:
    """``scipy.optimize.root`` runners keyed by method (SciPy imported here, lazily)."""
    import numpy as np
    from scipy import optimize

    def runner(method: str) -> Callable[[Problem, int], tuple[Tensor, bool, int]]:
        def run(problem: Problem, max_iter: int) -> tuple[Tensor, bool, int]:
            counted = Counted(problem.g)

            def fun(x: np.ndarray) -> np.ndarray:
                with torch.no_grad():
                    return counted(torch.from_numpy(np.asarray(x, dtype=np.float64))[None])[0].numpy()

            options = {} if method == "hybr" else {"fatol": TOL, "maxiter": max_iter}
            try:
                res = optimize.root(fun, np.array(problem.x0), method=method, options=options)
                x, ok = torch.from_numpy(np.asarray(res.x, dtype=np.float64)), bool(res.success)
            except (ValueError, FloatingPointError, np.linalg.LinAlgError, OverflowError):
                x, ok = torch.full((problem.n,), math.nan, dtype=F64), False
            return x, ok, counted.calls

        return run

    return {m: runner(m) for m in SCIPY}


def run_benchmark(
    names: list[str] | None = None,
    methods: tuple[str, ...] = ("default", *OURS, *SCIPY),
    max_iter: int = 200,
    repeats: int = 3,
) -> list[Row]:
    """Every method on every problem (``names`` selects problems); ``"default"`` is
    ``solve_root`` with no ``method``. Times: the median of ``repeats`` runs, the
    methods interleaved within each round."""
    chosen = [p for p in problems() if names is None or p.name in names]
    if names is not None and len(chosen) != len(set(names)):
        known = [p.name for p in problems()]
        raise ValueError(f"unknown problem(s) in {names}; available: {known}")
    sp = scipy_methods() if any(m in SCIPY for m in methods) else {}
    rows = []
    for problem in chosen:
        times: dict[str, list[float]] = {m: [] for m in methods}
        results: dict[str, tuple[Tensor, bool, int]] = {}
        for _ in range(repeats):
            for m in methods:
                start = time.perf_counter()
                if m in SCIPY:
                    results[m] = sp[m](problem, max_iter)
                else:
                    results[m] = run_ours(problem, None if m == "default" else m, max_iter)
                times[m].append(time.perf_counter() - start)
        for m in methods:
            z, claimed, calls = results[m]
            r = max_residual(problem, z)
            rows.append(Row(problem.name, problem.n, m, r <= TOL, claimed, r, calls,
                            statistics.median(times[m])))
    return rows


def header(max_iter: int, repeats: int) -> str:
    """What the table's cells mean and the conditions of the run."""
    return (
        f"solved = max|g| <= {TOL:g} recomputed from the returned z; max_iter={max_iter}, "
        f"float64, threads={torch.get_num_threads()}, time = median of {repeats} "
        "(shared machine: times are noisy, f-evals are exact). Cells: f-evals (time) or "
        "FAIL (max|g|, f-evals); FAIL! = the method claimed convergence at a non-root."
    )


def summary(rows: list[Row], baseline: str = "hybr") -> list[str]:
    """Per method: problems solved, false claims, and the median evaluation ratio against
    ``baseline`` over the problems both solve."""
    methods = list(dict.fromkeys(r.method for r in rows))
    by = {(r.problem, r.method): r for r in rows}
    problems_ = list(dict.fromkeys(r.problem for r in rows))
    lines = []
    for m in methods:
        mine = [by[(p, m)] for p in problems_]
        solved = sum(r.solved for r in mine)
        false = sum(r.claimed and not r.solved for r in mine)
        both = [p for p in problems_ if by[(p, m)].solved and by.get((p, baseline)) and by[(p, baseline)].solved]
        ratio = (
            statistics.median(by[(p, m)].evaluations / by[(p, baseline)].evaluations for p in both)
            if both else math.nan
        )
        med_m = statistics.median(by[(p, m)].evaluations for p in both) if both else math.nan
        med_b = statistics.median(by[(p, baseline)].evaluations for p in both) if both else math.nan
        lines.append(
            f"{m}: solved {solved}/{len(problems_)}, false convergence claims {false}, "
            f"on the {len(both)} problems both solve: median f-evals {med_m:g} vs {baseline} "
            f"{med_b:g}, median ratio {ratio:.2f}"
        )
    return lines


def markdown_table(rows: list[Row]) -> str:
    """Problems as rows; per method 'evals (time ms)' when solved, 'FAIL' (with the
    recomputed max residual) when not; a '!' marks a converged claim on a non-root."""
    methods = list(dict.fromkeys(r.method for r in rows))
    by = {(r.problem, r.method): r for r in rows}
    head = "| problem | n | " + " | ".join(methods) + " |"
    lines = [head, "|" + "---|" * (len(methods) + 2)]
    for p in dict.fromkeys(r.problem for r in rows):
        cells = []
        for m in methods:
            r = by[(p, m)]
            mark = "!" if r.claimed and not r.solved else ""
            if r.solved:
                cells.append(f"{r.evaluations} ({1e3 * r.time_s:.1f} ms)")
            else:
                cells.append(f"FAIL{mark} ({r.max_residual:.1e}, {r.evaluations})")
        lines.append(f"| {p} | {by[(p, methods[0])].n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
