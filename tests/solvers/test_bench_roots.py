"""The root benchmark's problem definitions against facts from MINPACK's test drivers, the
default solver on a few Moré-Garbow-Hillstrom problems, and the benchmark at toy size."""

from __future__ import annotations

import math

import pytest
import torch

from formerlab import solvers
from formerlab.bench import roots

F64 = torch.float64
BY_NAME = {p.name: p for p in roots.problems()}


def jacobian(fn, x):
    return torch.autograd.functional.jacobian(lambda v: fn(v[None])[0], x)


def test_known_roots_are_roots():
    # roots stated by Moré, Garbow & Hillstrom (1981) for the equation forms
    ones = lambda n: torch.ones(1, n, dtype=F64)  # noqa: E731
    for name, z in [
        ("rosenbrock", ones(2)),
        ("powell_singular", torch.zeros(1, 4, dtype=F64)),
        ("wood", ones(4)),
        ("helical_valley", torch.tensor([[1.0, 0.0, 0.0]], dtype=F64)),
        ("brown_almost_linear", ones(10)),
        ("variably_dimensioned", ones(10)),
    ]:
        assert float(BY_NAME[name].g(z).abs().max()) < 1e-14, name


def test_definitions_match_minpack_jacobians():
    # analytic Jacobians of MINPACK's vecjac (independent formulas) vs autograd of ours
    x = torch.linspace(-0.7, 0.9, 10, dtype=F64)
    n, h = 10, 1 / 11
    t = torch.arange(1, 11, dtype=F64) * h
    k = torch.arange(1, 11, dtype=F64)
    jac = torch.zeros(n, n, dtype=F64)
    for i in range(n):  # Broyden banded, ml = 5, mu = 1
        for j in range(max(0, i - 5), min(n, i + 2)):
            jac[i, j] = -(1 + 2 * x[j])
        jac[i, i] = 2 + 15 * x[i] ** 2
    torch.testing.assert_close(jacobian(roots.broyden_banded, x), jac)
    # discrete integral equation: h min(t_j (1 - t_k), t_k (1 - t_j)) 3 (x_j + t_j + 1)^2 / 2
    tj, tk = t[None, :], t[:, None]
    jac = h * torch.minimum(tj * (1 - tk), tk * (1 - tj)) * 3 * (x + t + 1)[None, :] ** 2 / 2
    torch.testing.assert_close(jacobian(roots.discrete_integral_equation, x), jac + torch.eye(n, dtype=F64))
    # discrete boundary value: tridiagonal, diagonal 2 + 3 h^2 (x_k + t_k + 1)^2 / 2
    jac = torch.diag(2 + 3 * h**2 * (x + t + 1) ** 2 / 2) - torch.diag(torch.ones(9, dtype=F64), 1)
    jac = jac - torch.diag(torch.ones(9, dtype=F64), -1)
    torch.testing.assert_close(jacobian(roots.discrete_boundary_value, x), jac)
    # trigonometric: column j is sin x_j, diagonal (j + 1) sin x_j - cos x_j
    jac = torch.sin(x)[None, :].expand(n, n).clone()
    jac.diagonal().copy_((k + 1) * torch.sin(x) - torch.cos(x))
    torch.testing.assert_close(jacobian(roots.trigonometric, x), jac)
    # variably dimensioned: k j (1 + 6 s^2) + delta, s = sum_j j (x_j - 1)
    s = float((k * (x - 1)).sum())
    jac = torch.outer(k, k) * (1 + 6 * s**2) + torch.eye(n, dtype=F64)
    torch.testing.assert_close(jacobian(roots.variably_dimensioned, x), jac)
    # Brown almost-linear: 1 + delta, last row prod / x_j
    jac = torch.ones(n, n, dtype=F64) + torch.eye(n, dtype=F64)
    jac[-1] = x.prod() / x
    torch.testing.assert_close(jacobian(roots.brown_almost_linear, x), jac)


def test_standard_starting_points_and_sizes():
    assert BY_NAME["rosenbrock"].x0 == (-1.2, 1.0)
    assert BY_NAME["wood"].x0 == (-3.0, -1.0, -3.0, -1.0)
    assert BY_NAME["helical_valley"].x0 == (-1.0, 0.0, 0.0)
    x0 = BY_NAME["discrete_boundary_value"].x0
    assert len(x0) == 10 and math.isclose(x0[0], (1 / 11) * (1 / 11 - 1))
    # MINPACK's starting residual of helical valley: f1 = 10 (0 - 10 * 0.5) = -50
    g0 = BY_NAME["helical_valley"].g(torch.tensor([[-1.0, 0.0, 0.0]], dtype=F64))
    torch.testing.assert_close(g0, torch.tensor([[-50.0, 0.0, 0.0]], dtype=F64))


@pytest.mark.parametrize(
    "name,root",
    [
        ("rosenbrock", [1.0, 1.0]),
        ("helical_valley", [1.0, 0.0, 0.0]),
        ("wood", None),  # the gradient equations also vanish at saddles of Wood's function
        ("variably_dimensioned", [1.0] * 10),
        ("broyden_banded", None),
        ("deq_tanh", None),
    ],
)
def test_default_solves_mgh_problems_from_the_standard_start(name, root):
    p = BY_NAME[name]
    z, info = solvers.solve_root(
        p.g, torch.tensor([p.x0], dtype=F64), tol=1e-10, stop="abs", max_iter=200
    )
    assert info.all_converged, info.explain()
    assert float(p.g(z).abs().max()) <= 1e-10
    if root is not None:
        torch.testing.assert_close(z[0], torch.tensor(root, dtype=F64), atol=1e-8, rtol=0)


def test_benchmark_on_two_problems():
    pytest.importorskip("scipy")
    rows = roots.run_benchmark(["rosenbrock", "cubic_x3+x-c"], repeats=1, max_iter=100)
    assert len(rows) == 2 * 6
    by = {(r.problem, r.method): r for r in rows}
    for r in rows:
        # solved is recomputed from z; a claim is never wrong for ours
        assert r.solved == (r.max_residual <= roots.TOL)
        assert r.evaluations > 0
    for m in ("default", "broyden", "newton_krylov", "hybr"):
        assert by[("rosenbrock", m)].solved and by[("cubic_x3+x-c", m)].solved
    for m in ("default", "broyden", "newton_krylov"):
        for p in ("rosenbrock", "cubic_x3+x-c"):
            assert by[(p, m)].claimed == by[(p, m)].solved
    table = roots.markdown_table(rows)
    assert "| rosenbrock | 2 |" in table and "hybr" in table
    assert any(line.startswith("default: solved 2/2") for line in roots.summary(rows))
    with pytest.raises(ValueError, match="unknown problem"):
        roots.run_benchmark(["nope"], repeats=1)


def test_bench_roots_command():
    pytest.importorskip("scipy")
    from typer.testing import CliRunner

    from formerlab.cli import app

    runner = CliRunner()
    out = runner.invoke(app, ["bench", "roots", "--problem", "rosenbrock", "--repeats", "1"],
                        env={"COLUMNS": "200"})
    assert out.exit_code == 0, out.output
    assert "| rosenbrock | 2 |" in out.output and "default: solved 1/1" in out.output
    bad = runner.invoke(app, ["bench", "roots", "--problem", "nope"])
    assert bad.exit_code != 0 and "unknown problem" in bad.output
