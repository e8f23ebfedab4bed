"""Newton-Krylov and the default root solver against exact answers: torch.linalg.solve on
linear systems, known roots, analytic fixed points, the DEQ layer."""

from __future__ import annotations

import pytest
import torch

from formerlab import solvers
from formerlab.deq import DEQ

F64 = torch.float64


def linear_system(batch: int, d: int, seed: int):
    """g(z) = A z - b per sample with well-conditioned non-symmetric A; root solve(A, b)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(batch, d, d, generator=g, dtype=F64) / d**0.5 + 2 * torch.eye(d, dtype=F64)
    b = torch.randn(batch, d, generator=g, dtype=F64)
    return (lambda z: torch.einsum("bij,bj->bi", a, z) - b), torch.linalg.solve(a, b)


@pytest.mark.parametrize("jvp", ["fd", "autograd"])
def test_linear_system_matches_linalg_solve(jvp):
    g, root = linear_system(3, 12, seed=0)
    z, info = solvers.solve_root(
        g, torch.zeros(3, 12, dtype=F64), method="newton_krylov", jvp=jvp, forcing=1e-12,
        tol=1e-11, stop="abs",
    )
    assert info.all_converged
    torch.testing.assert_close(z, root, atol=1e-10, rtol=0)
    # an (almost) exact linear solve: one Newton step, two for the finite-difference error
    assert int(info.iterations.max()) <= (1 if jvp == "autograd" else 2)


def test_gmres_dimension_bounds_the_inner_iterations():
    # GMRES on a d x d system finds the exact solution in at most d steps; with
    # krylov_dim=d one Newton step (autograd J-v, exact) solves the linear problem
    g, root = linear_system(2, 6, seed=1)
    z, info = solvers.solve_root(
        g, torch.zeros(2, 6, dtype=F64), method="newton_krylov", jvp="autograd",
        forcing=1e-14, krylov_dim=6, tol=1e-10, stop="abs",
    )
    assert info.all_converged and int(info.iterations.max()) == 1
    # 1 initial evaluation + <= 6 J-v products + 1 line-search trial
    assert info.evaluations <= 8
    torch.testing.assert_close(z, root, atol=1e-10, rtol=0)


@pytest.mark.parametrize("method", ["newton_krylov", "broyden_newton", "broyden"])
def test_cubic_with_known_roots(method):
    # Broyden's old failure case: z^3 + z - c, c in [-5, 5], 16 unknowns, default options
    r = torch.linspace(-1.5, 1.5, 16, dtype=F64).reshape(1, 16)
    c = r**3 + r
    z, info = solvers.solve_root(
        lambda x: x**3 + x - c, torch.zeros_like(r), method=method, tol=1e-12, stop="abs"
    )
    assert info.all_converged, info.explain()
    torch.testing.assert_close(z, r, atol=1e-10, rtol=0)


def test_newton_krylov_converges_superlinearly_on_the_cubic():
    # Newton needs ~7 steps from 0 on z^3 + z - c (c in [-5, 5]); Eisenstat-Walker keeps
    # the outer iteration count near that
    c = torch.linspace(-5, 5, 16, dtype=F64).reshape(1, 16)
    _, info = solvers.solve_root(
        lambda x: x**3 + x - c, torch.zeros_like(c), method="newton_krylov", tol=1e-10,
        stop="abs",
    )
    assert info.all_converged and int(info.iterations[0]) <= 9
    trace = info.trace[:, 0]
    # last steps: the residual falls by far more than a linear rate would
    assert float(trace[-1]) < 1e-3 * float(trace[-3])


@pytest.mark.parametrize("jvp", ["fd", "autograd"])
def test_fixed_point_use_reaches_the_analytic_fixed_point_per_sample(jvp):
    g = torch.Generator().manual_seed(2)
    a = torch.randn(2, 8, 8, generator=g, dtype=F64)
    a = a / torch.linalg.matrix_norm(a, 2)[:, None, None] * torch.tensor([0.3, 0.95], dtype=F64)[:, None, None]
    b = torch.randn(2, 8, generator=g, dtype=F64)
    z_star = torch.linalg.solve(torch.eye(8, dtype=F64) - a, b)
    z, info = solvers.solve_fixed_point(
        lambda z: torch.einsum("bij,bj->bi", a, z) + b, torch.zeros(2, 8, dtype=F64),
        method="newton_krylov", jvp=jvp, forcing=1e-12, tol=1e-11, stop="abs",
    )
    assert info.all_converged
    torch.testing.assert_close(z, z_star, atol=1e-10, rtol=0)
    # exact linear solves with J-v of g = f(z) - z: one Newton step (two with the
    # forward-difference error)
    assert int(info.iterations.max()) <= (1 if jvp == "autograd" else 2)


def test_newton_krylov_as_a_deq_solver_matches_the_converged_fixed_point():
    torch.manual_seed(0)
    w = torch.randn(6, 6, dtype=F64)
    w = 0.7 * w / torch.linalg.matrix_norm(w, 2)
    cell = lambda z, x: torch.tanh(z @ w.T + x)  # noqa: E731
    x = torch.randn(3, 6, dtype=F64)
    ref = torch.zeros(3, 6, dtype=F64)
    for _ in range(300):  # plain iteration of a 0.7-contraction: converged to rounding
        ref = cell(ref, x)
    deq = DEQ(cell, solver="newton_krylov", solver_options={"krylov_dim": 6}, tol=1e-12,
              stop="abs", max_iter=30)
    with torch.no_grad():
        out = deq(x)
    assert deq.info.all_converged and deq.info.method == "newton_krylov"
    assert int(deq.info.iterations.max()) <= 8
    torch.testing.assert_close(out, ref, atol=1e-11, rtol=0)


def test_no_real_root_is_reported_as_not_converged():
    # z^2 + 1 has no real root: every root method must say so and return finite points
    for method in solvers.available(root=True):
        z, info = solvers.solve_root(
            lambda x: x**2 + 1, torch.ones(2, 3, dtype=F64), method=method, tol=1e-8,
            stop="abs", max_iter=40,
        )
        assert not bool(info.converged.any()), method
        assert bool(torch.isfinite(z).all())
        torch.testing.assert_close(info.abs_residual, (z**2 + 1).norm(dim=1))


def test_default_switches_to_newton_where_broyden_stalls_and_says_so():
    # Powell's singular function (MGH problem 13, root 0, singular Jacobian there): Broyden
    # alone stalls; broyden_newton hands over and solves it (solve_root's default at this
    # size is now hybrid, see test_hybrid.py)
    from formerlab.bench.roots import powell_singular

    z0 = torch.tensor([[3.0, -1.0, 0.0, 1.0]], dtype=F64)
    _, alone = solvers.solve_root(powell_singular, z0, method="broyden", tol=1e-8, stop="abs",
                                  max_iter=200)
    z, info = solvers.solve_root(powell_singular, z0, method="broyden_newton", tol=1e-8,
                                 stop="abs", max_iter=200)
    assert not alone.all_converged
    assert info.all_converged and info.method == "broyden_newton"
    assert any("switched to newton_krylov" in n for n in info.notes)
    assert float(powell_singular(z).norm()) <= 1e-8
    # singular root: |z| ~ sqrt(|g|), so the point is near 0 only to ~1e-4
    assert float(z.abs().max()) < 1e-3


def test_options_are_validated():
    with pytest.raises(ValueError, match="jvp='exact'"):
        solvers.build("newton_krylov", jvp="exact")
    with pytest.raises(ValueError, match="forcing=1.5"):
        solvers.build("newton_krylov", forcing=1.5)
    with pytest.raises(ValueError, match="forcing='fixed'"):
        solvers.build("newton_krylov", forcing="fixed")
    with pytest.raises(ValueError, match="eta_max=1"):
        solvers.build("newton_krylov", eta_max=1.0)
    with pytest.raises(ValueError, match="krylov_dim=0"):
        solvers.build("newton_krylov", krylov_dim=0)
    with pytest.raises(ValueError, match="stall=0"):
        solvers.build("broyden_newton", stall=0)
    with pytest.raises(ValueError, match="init_scale=0"):
        solvers.build("broyden", init_scale=0)
    with pytest.raises(ValueError, match="line_search=1"):
        solvers.build("broyden", line_search=1)


def test_newton_krylov_solves_powell_badly_scaled():
    # MGH problem 3: J has entries from 1e-4 to 1e4 along the path; with Eisenstat-Walker
    # alone the loose linear solves gave directions the line search could not use
    from formerlab.bench.roots import powell_badly_scaled

    z, info = solvers.solve_root(
        powell_badly_scaled, torch.tensor([[0.0, 1.0]], dtype=F64), method="newton_krylov",
        tol=1e-9, stop="abs", max_iter=200,
    )
    assert info.all_converged
    # the root: x1 x2 = 1e-4 and exp(-x1) + exp(-x2) = 1.0001 (x1 = 1.098e-5, x2 = 9.106)
    torch.testing.assert_close(z, torch.tensor([[1.098159e-5, 9.106146]], dtype=F64), rtol=1e-5, atol=0)


@pytest.mark.parametrize("method", ["newton_krylov", "broyden_newton"])
def test_per_sample_stopping_freezes_the_easy_sample(method):
    # sample 0: root near the start; sample 1: z^3 + z = 40, far away
    c = torch.tensor([[0.1] * 4, [40.0] * 4], dtype=F64)
    seen = []

    def g(z):
        seen.append(z.clone())
        return z**3 + z - c

    z, info = solvers.solve_root(g, torch.zeros(2, 4, dtype=F64), method=method, tol=1e-12,
                                 stop="abs")
    assert info.all_converged
    easy, hard = info.iterations.tolist()
    assert easy < hard
    moved = [i for i, s in enumerate(seen) if not torch.equal(s[0], z[0])]
    # after its last move sample 0 is only ever evaluated at its returned point, while
    # sample 1 keeps being evaluated elsewhere
    tail = seen[moved[-1] + 1:]
    assert len(tail) > 3 and all(torch.equal(s[0], z[0]) for s in tail)
    assert any(not torch.equal(s[1], z[1]) for s in tail)
    alone, _ = solvers.solve_root(lambda v: v**3 + v - c[:1], torch.zeros(1, 4, dtype=F64),
                                  method=method, tol=1e-12, stop="abs")
    torch.testing.assert_close(z[:1], alone, atol=1e-14, rtol=0)


def test_default_hands_over_to_newton_from_the_best_point():
    # Powell badly scaled: when Broyden stalls its last iterate is far worse than its
    # best; Newton-Krylov must start from the best one
    from formerlab.bench.roots import powell_badly_scaled

    bn = solvers.BroydenNewton()
    entry = {}

    def capture(run, start=0):
        entry.update(z=run.z.clone(), best=run.best_z.clone(), res=run.residual.clone(),
                     best_res=run.best_res.clone(), last=run._trace[-1].clone())
        return start

    bn._newton.iterate = capture
    solvers.solve_root(powell_badly_scaled, torch.tensor([[0.0, 1.0]], dtype=F64), method=bn,
                       tol=1e-9, stop="abs", max_iter=50)
    assert float(entry["last"][0]) > 10 * float(entry["best_res"][0])  # Broyden ended badly
    assert torch.equal(entry["z"], entry["best"])
    assert torch.equal(entry["res"], entry["best_res"])


def test_gmres_stays_accurate_on_an_ill_conditioned_system():
    # cond(A) = 1e10, d = 40, one Newton step with a full Krylov space: with a single
    # Gram-Schmidt pass the basis loses orthogonality and the step is useless (residual
    # ~||b||); with the second pass it reduces the residual by > 1e5
    g = torch.Generator().manual_seed(0)
    d = 40
    q1, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=F64))
    q2, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=F64))
    a = q1 @ torch.diag(torch.logspace(0, -10, d, dtype=F64)) @ q2.T
    b = torch.randn(1, d, generator=g, dtype=F64)
    _, info = solvers.solve_root(
        lambda z: z @ a.T - b, torch.zeros(1, d, dtype=F64), method="newton_krylov",
        jvp="autograd", forcing=1e-13, krylov_dim=d, tol=1e-12, stop="abs", max_iter=1,
    )
    assert float(info.abs_residual[0]) <= 1e-5 * float(b.norm())
