"""Root-finding benchmark: MINPACK's Moré-Garbow-Hillstrom test list against SciPy's hybr.

Problems (Moré, Garbow & Hillstrom, 1981, "Testing Unconstrained Optimization Software",
ACM TOMS 7(1), section 3, the 14 systems of nonlinear equations, in the form of MINPACK's
``vecfcn``/``initpt`` test drivers, which fix the Wood system as its gradient equations,
Watson's as the gradient equations of Watson's least-squares problem, and the standard
starting points x0): every (system, dimension, start) of MINPACK's own test list for
``hybrd``/``hybrj`` (the driver data ``ex/file21``: 55 cases; Rosenbrock, Powell singular,
Wood, helical valley, the n=10 systems and Chebyquad n=5..7 from x0, 10 x0 and 100 x0;
Powell badly scaled and Watson n=6, 9 from x0 and 10 x0; Chebyquad n=8, 9 and Brown
almost-linear n=30, 40 from x0 only; multiples follow ``initpt``: factor * x0, or every
entry = factor where x0 = 0). Names: the system, ``_n<size>`` for a size other than its
first, ``@10x0`` / ``@100x0`` for the multiples. Chebyquad n=8 has no root (MGH 1981), so
no method can solve it. Larger published problems: Broyden tridiagonal and banded at
n=100 and 500 (MGH's variable-dimension systems, standard start) and the 2-D Bratu
problem (Moré, 1990, "A collection of nonlinear model problems") on 10x10 and 20x20
grids, lambda = 6, from 0. Two more: the elementwise cubic z^3 + z - c (n=16, c evenly
spaced in [-5, 5]; the Jacobian is near +I, the case that broke Broyden's -I start) and a
DEQ-style tanh(W z + b) - z (n=32, ||W||_2 = 2, so z = tanh(W z + b) is not a
contraction and plain iteration need not converge).

Every method gets the same float64 function (one definition, in torch; SciPy calls it on
a batch of one). Reported per problem and method: solved (max_i |g_i(z)| <= 1e-8,
recomputed here from the returned z, whatever the method says), the method's own claim
(``converged`` / ``success``), function evaluations (counted by wrapping g, the same
way for every method; finite-difference and J-v evaluations included) and the wall time
(median of ``repeats``). SciPy methods: ``hybr`` (MINPACK's hybrd, Powell's hybrid
dogleg with a finite-difference Jacobian and Broyden updates; default options, so its
budget is maxfev = 200 (n + 1) evaluations and it stops on its step-size test
xtol = 1.49e-8, which can leave max|g| slightly above 1e-8),
``broyden1`` and ``krylov`` (``fatol=1e-8``, ``maxiter`` as ours). Ours stop at
||g||_2 <= 1e-8 (``stop="abs"``), which implies max |g_i| <= 1e-8, within ``max_iter``
iterations (default 1000; evaluations for Jacobians come on top). By default only
``"default"`` (``solve_root`` without ``method``) and ``hybr`` run; ``methods`` adds the
others.

SciPy is a benchmark dependency only: it is imported inside ``scipy_methods`` here.
"""

from __future__ import annotations

import fnmatch
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
OURS = ("hybrid", "broyden_newton", "broyden", "newton_krylov")
SCIPY = ("hybr", "broyden1", "krylov")
DEFAULT_METHODS = ("default", "hybr")


@dataclass(frozen=True)
class Problem:
    """g: (B, n) -> (B, n) in torch; x0: the starting point; start: which multiple of
    the standard starting point x0 is (``"x0"``, ``"10x0"``, ``"100x0"``)."""

    name: str
    g: Callable[[Tensor], Tensor]
    x0: tuple[float, ...]
    start: str = "x0"

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
    # row i sums x_j (1 + x_j) over j in [i - ml, i + mu], j != i: shifted copies of the
    # zero-padded vector (O(n (ml + mu)), no n x n band matrix)
    n = x.shape[1]
    q = torch.nn.functional.pad(x * (1 + x), (ml, mu))
    near = sum(q[:, ml + k: ml + k + n] for k in range(-ml, mu + 1) if k != 0)
    return x * (2 + 5 * x**2) + 1 - near


def watson(x: Tensor) -> Tensor:
    """MINPACK's Watson system: the gradient equations (halved) of Watson's 31-term
    least-squares problem, 29 points t_i = i / 29 plus the two extra terms."""
    n = x.shape[1]
    t = torch.arange(1, 30, dtype=x.dtype, device=x.device)[:, None] / 29  # (29, 1)
    j = torch.arange(n, dtype=x.dtype, device=x.device)[None, :]  # 0 .. n-1
    powers = t**j  # (29, n): t_i^(j)
    sum1 = x[:, 1:] @ (j[:, 1:] * t ** (j[:, 1:] - 1)).T  # sum_{j>=2} (j-1) t^(j-2) x_j
    sum2 = x @ powers.T  # (B, 29)
    r = sum1 - sum2**2 - 1
    # d r_i / d x_k = t^(k-2) ((k-1) - 2 t sum2_i)  (k = 1..n; here j = k - 1)
    coef = t ** (j - 1) * (j - 2 * t * sum2[:, :, None])  # (B, 29, n)
    out = (coef * r[:, :, None]).sum(dim=1)
    extra = x[:, 1] - x[:, 0] ** 2 - 1
    first = out[:, :1] + (x[:, :1] * (1 - 2 * extra[:, None]))
    second = out[:, 1:2] + extra[:, None]
    return torch.cat([first, second, out[:, 2:]], dim=1)


def chebyquad(x: Tensor) -> Tensor:
    """f_i = (1/n) sum_j T_i(2 x_j - 1) - integral of T_i over [0, 1] (shifted Chebyshev
    polynomials; the integral is -1/(i^2 - 1) for even i, 0 for odd i)."""
    n = x.shape[1]
    u = 2 * x - 1
    prev, cur = torch.ones_like(u), u
    rows = []
    for _ in range(n):
        rows.append(cur.mean(dim=1))
        prev, cur = cur, 2 * u * cur - prev
    out = torch.stack(rows, dim=1)
    i = torch.arange(1, n + 1, dtype=x.dtype, device=x.device)
    return out + torch.where(i % 2 == 0, 1 / (i**2 - 1), torch.zeros_like(i))


def bratu(side: int, lam: float = 6.0) -> Callable[[Tensor], Tensor]:
    """The 2-D Bratu (solid fuel ignition) problem -Lap u = lam e^u on the unit square,
    u = 0 on the boundary, 5-point differences on a side x side interior grid, in the
    form 4 u_ij - (sum of the 4 neighbours) - h^2 lam e^u_ij (Moré, 1990, "A collection of
    nonlinear model problems", Lectures in Appl. Math. 26, AMS, sec. 3.2; lam = 6 is below
    the turning point lam* ~ 6.81, so the problem has a (lower-branch) solution)."""
    h2 = 1.0 / (side + 1) ** 2

    def g(x: Tensor) -> Tensor:
        u = x.reshape(-1, 1, side, side)
        lap = 4 * u - torch.nn.functional.conv2d(
            torch.nn.functional.pad(u, (1, 1, 1, 1)),
            torch.tensor([[[[0.0, 1.0, 0.0], [1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]]], dtype=x.dtype),
        )
        return (lap - h2 * lam * torch.exp(u)).reshape(x.shape)

    return g


def cubic(c: Tensor) -> Callable[[Tensor], Tensor]:
    return lambda x: x**3 + x - c


def deq_tanh(n: int = 32, norm: float = 2.0, seed: int = 0) -> Callable[[Tensor], Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, n, generator=g, dtype=F64)
    w = norm * w / torch.linalg.matrix_norm(w, 2)
    b = torch.randn(n, generator=g, dtype=F64)
    return lambda z: torch.tanh(z @ w.T + b) - z


def _start(family: str, n: int) -> list[float]:
    """MINPACK ``initpt``'s standard starting point of a family at dimension n."""
    h = 1.0 / (n + 1)
    return {
        "rosenbrock": lambda: [-1.2, 1.0],
        "powell_singular": lambda: [3.0, -1.0, 0.0, 1.0],
        "powell_badly_scaled": lambda: [0.0, 1.0],
        "wood": lambda: [-3.0, -1.0, -3.0, -1.0],
        "helical_valley": lambda: [-1.0, 0.0, 0.0],
        "watson": lambda: [0.0] * n,
        "chebyquad": lambda: [j * h for j in range(1, n + 1)],
        "brown_almost_linear": lambda: [0.5] * n,
        "discrete_boundary_value": lambda: [(j * h) * (j * h - 1) for j in range(1, n + 1)],
        "discrete_integral_equation": lambda: [(j * h) * (j * h - 1) for j in range(1, n + 1)],
        "trigonometric": lambda: [1.0 / n] * n,
        "variably_dimensioned": lambda: [1 - j / n for j in range(1, n + 1)],
        "broyden_tridiagonal": lambda: [-1.0] * n,
        "broyden_banded": lambda: [-1.0] * n,
    }[family]()


FAMILIES: dict[str, Callable[[Tensor], Tensor]] = {
    "rosenbrock": rosenbrock,
    "powell_singular": powell_singular,
    "powell_badly_scaled": powell_badly_scaled,
    "wood": wood,
    "helical_valley": helical_valley,
    "watson": watson,
    "chebyquad": chebyquad,
    "brown_almost_linear": brown_almost_linear,
    "discrete_boundary_value": discrete_boundary_value,
    "discrete_integral_equation": discrete_integral_equation,
    "trigonometric": trigonometric,
    "variably_dimensioned": variably_dimensioned,
    "broyden_tridiagonal": broyden_tridiagonal,
    "broyden_banded": broyden_banded,
}

# MINPACK's test list for hybrd/hybrj (the data file ``ex/file21``): (family, n, starts),
# the starts being x0, 10 x0, 100 x0 up to ``starts``. The first size listed for a
# family is its plain name; other sizes get ``_n<size>``.
MINPACK_CASES: tuple[tuple[str, int, int], ...] = (
    ("rosenbrock", 2, 3), ("powell_singular", 4, 3), ("powell_badly_scaled", 2, 2),
    ("wood", 4, 3), ("helical_valley", 3, 3), ("watson", 6, 2), ("watson", 9, 2),
    ("chebyquad", 5, 3), ("chebyquad", 6, 3), ("chebyquad", 7, 3), ("chebyquad", 8, 1),
    ("chebyquad", 9, 1), ("brown_almost_linear", 10, 3), ("brown_almost_linear", 30, 1),
    ("brown_almost_linear", 40, 1), ("discrete_boundary_value", 10, 3),
    ("discrete_integral_equation", 10, 3), ("discrete_integral_equation", 1, 3),
    ("trigonometric", 10, 3), ("variably_dimensioned", 10, 3),
    ("broyden_tridiagonal", 10, 3), ("broyden_banded", 10, 3),
)
# larger published problems (standard starts): the MGH Broyden systems at n = 100, 500
# (variable-dimension problems; MINPACK's own tests stop at n = 10) and 2-D Bratu
LARGER: tuple[tuple[str, int], ...] = (
    ("broyden_tridiagonal", 100), ("broyden_tridiagonal", 500),
    ("broyden_banded", 100), ("broyden_banded", 500),
)


def problems() -> list[Problem]:
    """The benchmark's problems: MINPACK's hybrd test list (the 14 Moré-Garbow-Hillstrom
    systems at its dimensions, from x0 and the multiples of x0 it uses, ``initpt``'s rule:
    factor * x0, or all entries = factor where x0 = 0), the larger problems, and two
    extra ones (an elementwise cubic, a DEQ-style tanh layer)."""
    first_size: dict[str, int] = {}
    out = []

    def name_of(family: str, n: int) -> str:
        first_size.setdefault(family, n)
        return family if first_size[family] == n else f"{family}_n{n}"

    for family, n, starts in MINPACK_CASES:
        base = _start(family, n)
        name = name_of(family, n)
        for k in range(starts):
            factor = 10.0**k
            if factor == 1:
                x0 = base
            elif all(v == 0 for v in base):
                x0 = [factor] * n
            else:
                x0 = [factor * v for v in base]
            label = "x0" if k == 0 else f"{int(factor)}x0"
            key = name if k == 0 else f"{name}@{label}"
            out.append(Problem(key, FAMILIES[family], tuple(x0), label))
    for family, n in LARGER:
        out.append(Problem(name_of(family, n), FAMILIES[family], tuple(_start(family, n))))
    for side in (10, 20):
        out.append(Problem(f"bratu2d_{side}x{side}", bratu(side), (0.0,) * side**2))
    c = torch.linspace(-5, 5, 16, dtype=F64)
    out.append(Problem("cubic_x3+x-c", cubic(c), (0.0,) * 16))
    out.append(Problem("deq_tanh", deq_tanh(), (0.0,) * 32))
    return out


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
    start: str = "x0"


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
                with np.errstate(all="ignore"):
                    res = optimize.root(fun, np.array(problem.x0), method=method, options=options)
                x, ok = torch.from_numpy(np.asarray(res.x, dtype=np.float64)), bool(res.success)
            except (ValueError, FloatingPointError, np.linalg.LinAlgError, OverflowError):
                x, ok = torch.full((problem.n,), math.nan, dtype=F64), False
            return x, ok, counted.calls

        return run

    return {m: runner(m) for m in SCIPY}


def select(names: list[str] | None) -> list[Problem]:
    """The problems whose name matches one of ``names`` (exact names or shell patterns:
    ``"wood*"`` is Wood from every start); all problems for None. A pattern that matches
    nothing raises ``ValueError`` listing the names."""
    every = problems()
    if names is None:
        return every
    chosen = []
    for pattern in names:
        hits = [p for p in every if p.name == pattern] or [
            p for p in every if fnmatch.fnmatchcase(p.name, pattern)
        ]
        if not hits:
            raise ValueError(
                f"unknown problem(s) {pattern!r} in {names}; available (exact names or shell "
                f"patterns such as 'wood*'): {[p.name for p in every]}"
            )
        chosen.extend(p for p in hits if p not in chosen)
    return chosen


def run_benchmark(
    names: list[str] | None = None,
    methods: tuple[str, ...] = DEFAULT_METHODS,
    max_iter: int = 1000,
    repeats: int = 1,
) -> list[Row]:
    """Every method on every problem (``names`` selects problems, see ``select``);
    ``"default"`` is ``solve_root`` with no ``method``, other names are registered
    solvers or SciPy methods (``SCIPY``). Times: the median of ``repeats`` runs, the
    methods interleaved within each round."""
    chosen = select(names)
    known = set(solvers.available(root=True)) | set(SCIPY) | {"default"}
    bad = [m for m in methods if m not in known]
    if bad or not methods:
        raise ValueError(f"methods={list(methods)} is not allowed; expected names from {sorted(known)}")
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
                            statistics.median(times[m]), problem.start))
    return rows


def header(max_iter: int, repeats: int) -> str:
    """What the table's cells mean and the conditions of the run."""
    return (
        f"solved = max|g| <= {TOL:g} recomputed from the returned z; max_iter={max_iter} (ours; "
        f"hybr: its default maxfev = 200 (n + 1)), float64, threads={torch.get_num_threads()}, "
        f"time = median of {repeats} (shared machine: times are noisy, f-evals are exact). "
        "Cells: f-evals (time) when solved, '*' = solved but the method did not claim it; "
        "FAIL (max|g|, f-evals) when not; FAIL! = the method claimed convergence at a non-root."
    )


def summary(rows: list[Row], baseline: str = "hybr") -> list[str]:
    """Per method: problems solved, false claims, and the median evaluations against
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
    """Problems as rows; per method 'evals (time ms)' when solved (with '*' when the
    method did not claim convergence), 'FAIL' (with the recomputed max residual and the
    evaluations) when not; a '!' marks a converged claim at a non-root."""
    methods = list(dict.fromkeys(r.method for r in rows))
    by = {(r.problem, r.method): r for r in rows}
    head = "| problem | n | start | " + " | ".join(methods) + " |"
    lines = [head, "|---|---:|---|" + "---:|" * len(methods)]
    for p in dict.fromkeys(r.problem for r in rows):
        cells = []
        for m in methods:
            r = by[(p, m)]
            if r.solved:
                star = "" if r.claimed else "*"
                cells.append(f"{r.evaluations}{star} ({1e3 * r.time_s:.1f} ms)")
            else:
                mark = "!" if r.claimed else ""
                cells.append(f"FAIL{mark} ({r.max_residual:.1e}, {r.evaluations})")
        first = by[(p, methods[0])]
        lines.append(f"| {p} | {first.n} | {first.start} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
