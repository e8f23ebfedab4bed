"""Solvers against exact answers: linear contractions (torch.linalg.solve), a nonlinear
system with a known root, Newton's method as reference, per-sample stopping."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from formerlab import solvers

F64 = torch.float64
METHODS = ["fixed_point", "anderson", "broyden"]


def contraction(batch: int, d: int, rho: float, seed: int, dtype=F64):
    """f(z) = A z + b with ||A||_2 = rho per sample, and its fixed point (I - A)^-1 b."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(batch, d, d, generator=g, dtype=F64)
    a = rho * a / torch.linalg.matrix_norm(a, 2)[:, None, None]
    b = torch.randn(batch, d, generator=g, dtype=F64)
    z_star = torch.linalg.solve(torch.eye(d, dtype=F64) - a, b)
    a, b = a.to(dtype), b.to(dtype)

    def f(z):
        return torch.einsum("bij,bj->bi", a, z) + b

    return f, z_star


@pytest.mark.parametrize("method", METHODS)
def test_linear_contraction_reaches_exact_fixed_point(method):
    f, z_star = contraction(batch=3, d=10, rho=0.8, seed=0)
    z, info = solvers.solve_fixed_point(
        f, torch.zeros(3, 10, dtype=F64), method=method, tol=1e-12, max_iter=500, stop="abs"
    )
    assert info.all_converged
    assert z.dtype == F64
    torch.testing.assert_close(z, z_star, atol=1e-10, rtol=0)


@settings(max_examples=15, deadline=None)
@given(
    d=st.integers(1, 12),
    batch=st.integers(1, 3),
    rho=st.floats(0.05, 0.9),
    seed=st.integers(0, 10_000),
    method=st.sampled_from(METHODS + ["newton_krylov"]),
)
def test_converged_answer_is_the_analytic_fixed_point(d, batch, rho, seed, method):
    # ||g(z)|| <= tol and ||(I - A)^-1|| <= 1 / (1 - rho) give ||z - z*|| <= tol / (1 - rho):
    # checked against z* = (I - A)^-1 b from torch.linalg.solve with the requested tol,
    # not the reported residual, so a misreported residual fails it too
    tol = 1e-9
    f, z_star = contraction(batch, d, rho, seed)
    z, info = solvers.solve_fixed_point(
        f, torch.zeros(batch, d, dtype=F64), method=method, tol=tol, max_iter=400, stop="abs"
    )
    assert info.all_converged
    err = (z - z_star).norm(dim=1)
    assert bool((err <= tol / (1 - rho) * (1 + 1e-6)).all()), (err, tol / (1 - rho))
    # the reported residual is the residual of the returned iterate
    torch.testing.assert_close(info.abs_residual, (f(z) - z).norm(dim=1))


def non_contraction(d: int, rho: float, seed: int, kind: str):
    """f(z) = A z + b with spectral radius rho >= 1, as (A, b, z_star, bound, u).
    ``expanding``: A = rho Q (Q orthogonal, rho > 1), unique fixed point (I - A)^-1 b, u None;
    ``no_fixed_point``: A symmetric with eigenvalue exactly 1 along the unit vector u and
    u.b = 1, so ||f(z) - z|| >= |u.(f(z) - z)| = 1 (as long as |u.z| stays below 2^53,
    where z + 1 rounds to z), z_star and bound None."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=F64))
    b = torch.randn(1, d, generator=g, dtype=F64)
    if kind == "expanding":
        a = rho * q
        z_star = torch.linalg.solve(torch.eye(d, dtype=F64) - a, b[0])[None]
        bound = float(torch.linalg.matrix_norm(torch.linalg.inv(torch.eye(d, dtype=F64) - a), 2))
        return a, b, z_star, bound, None
    # exact in floating point: a signed permutation P, A = P diag(1, ...) P^T, u = P e_0
    perm = torch.randperm(d, generator=g)
    signs = torch.randint(0, 2, (d,), generator=g).to(F64) * 2 - 1
    p = torch.zeros(d, d, dtype=F64)
    p[perm, torch.arange(d)] = signs
    eig = torch.linspace(-rho, rho, d, dtype=F64)
    eig[0] = 1.0
    a = p @ torch.diag(eig) @ p.T
    b[0, perm[0]] = signs[0]  # u.b = 1, u = P e_0
    return a, b, None, None, p[:, 0]


@settings(max_examples=25, deadline=None)
@given(
    d=st.integers(1, 10),
    rho=st.floats(1.05, 3.0),
    seed=st.integers(0, 10_000),
    method=st.sampled_from(METHODS + ["newton_krylov", "broyden_newton"]),
    kind=st.sampled_from(["expanding", "no_fixed_point"]),
)
@example(d=9, rho=2.920323096617827, seed=1870, method="broyden", kind="no_fixed_point")
def test_non_contractions_report_convergence_honestly(d, rho, seed, method, kind):
    # rho >= 1: plain iteration diverges; a method may still find the fixed point (then it
    # must be the right one), or must say it did not converge
    a, b, z_star, bound, u = non_contraction(d, rho, seed, kind)

    def f(z):
        return z @ a.T + b

    tol = 1e-8
    z, info = solvers.solve_fixed_point(
        f, torch.zeros(1, d, dtype=F64), method=method, tol=tol, max_iter=60, stop="abs"
    )
    assert bool(torch.isfinite(z).all())
    residual = (f(z) - z).norm(dim=1)
    torch.testing.assert_close(info.abs_residual, residual)
    if kind == "no_fixed_point":
        if bool(info.converged[0]):
            # the one way to a claim: a secant step fitted to rounding noise jumps to
            # |z| >= 2^53, where z + 1 rounds to z, a fixed point of the float64 map
            # (documented limitation; the claim is true of the computed residual)
            assert float(z.abs().max()) >= 2.0**52 and float(residual[0]) <= tol
        else:
            assert float(residual[0]) > tol and info.reasons()[0] != "converged"
            # the bound ||f(z) − z|| >= 1 holds in float64 while u.z + 1 is exact
            # (|u.z| < 2^53); a divergent run may end beyond that (seed 1870, d = 9,
            # broyden: u.z ≈ 2^53.3, where u.(f(z) − z) rounds to 0)
            if abs(float(z[0] @ u)) < 2.0**53:
                assert float(residual[0]) >= 1 - 1e-9
    elif bool(info.converged[0]):
        assert float(residual[0]) <= tol
        assert float((z - z_star).norm()) <= bound * tol * (1 + 1e-6) + 1e-12


def test_broyden_finite_termination_on_linear_problems():
    # Gay (1979): good Broyden with full steps solves a linear system in at most 2d steps
    # ("d + 1" is not a theorem for good Broyden: on generic problems it needs ~1.3d-2d).
    for d in (4, 8, 16):
        f, z_star = contraction(batch=4, d=d, rho=0.9, seed=d)
        z, info = solvers.solve_fixed_point(
            f, torch.zeros(4, d, dtype=F64), method="broyden", memory=2 * d + 2,
            tol=1e-10, max_iter=10 * d, stop="abs",
        )
        assert info.all_converged
        assert int(info.iterations.max()) <= 2 * d + 1  # 2d plus one for rounding
        torch.testing.assert_close(z, z_star, atol=1e-8, rtol=0)
        # far fewer steps than plain iteration needs at rho = 0.9
        _, fp = solvers.solve_fixed_point(
            f, torch.zeros(4, d, dtype=F64), method="fixed_point", tol=1e-10,
            max_iter=2000, stop="abs",
        )
        assert int(info.iterations.max()) < int(fp.iterations.min())


@pytest.mark.parametrize("on_full", ["restart", "drop_oldest"])
def test_broyden_bounded_memory_still_converges_and_says_so(on_full):
    f, z_star = contraction(batch=2, d=24, rho=0.7, seed=3)
    z, info = solvers.solve_fixed_point(
        f, torch.zeros(2, 24, dtype=F64), method="broyden", memory=4, on_full=on_full,
        tol=1e-10, max_iter=300, stop="abs",
    )
    assert info.all_converged
    torch.testing.assert_close(z, z_star, atol=1e-8, rtol=0)
    if on_full == "restart":
        assert any("restarted" in n for n in info.notes)


def test_anderson_beats_plain_iteration_on_slow_contraction():
    # symmetric A with eigenvalues spread over [-0.95, 0.95]: plain iteration needs
    # ~log(1e-10)/log(0.95) = 450 steps
    g = torch.Generator().manual_seed(5)
    q, _ = torch.linalg.qr(torch.randn(20, 20, generator=g, dtype=F64))
    a = q @ torch.diag(torch.linspace(-0.95, 0.95, 20, dtype=F64)) @ q.T
    b = torch.randn(2, 20, generator=g, dtype=F64)
    z_star = torch.linalg.solve(torch.eye(20, dtype=F64) - a, b.T).T
    kw = dict(tol=1e-10, max_iter=3000, stop="abs")
    z0 = torch.zeros(2, 20, dtype=F64)
    _, fp = solvers.solve_fixed_point(lambda z: z @ a.T + b, z0, method="fixed_point", **kw)
    z, aa = solvers.solve_fixed_point(lambda z: z @ a.T + b, z0, method="anderson", **kw)
    assert aa.all_converged and fp.all_converged
    assert int(aa.iterations.max()) * 3 < int(fp.iterations.min())
    torch.testing.assert_close(z, z_star, atol=1e-8, rtol=0)


def test_damped_fixed_point_converges_where_plain_iteration_oscillates():
    # f(z) = -z + 2: eigenvalue -1, plain iteration cycles forever; damping 1/2 hits z = 1
    def f(z):
        return -z + 2.0

    z0 = torch.zeros(1, 3, dtype=F64)
    _, plain = solvers.solve_fixed_point(f, z0, method="fixed_point", tol=1e-12, max_iter=20)
    z, damped = solvers.solve_fixed_point(
        f, z0, method="fixed_point", damping=0.5, tol=1e-12, max_iter=20
    )
    assert not plain.all_converged and plain.reasons() == ["stalled"]
    assert damped.all_converged
    torch.testing.assert_close(z, torch.ones(1, 3, dtype=F64))


def test_solve_root_broyden_on_a_nonlinear_system_with_known_root():
    # x^2 + y^2 = 2 and x = y: the two roots are (1, 1) and (-1, -1)
    def g(z):
        return torch.stack([z[:, 0] ** 2 + z[:, 1] ** 2 - 2, z[:, 0] - z[:, 1]], dim=1)

    z0 = torch.tensor([[1.5, 0.7], [0.6, 1.3], [1.2, 1.2]], dtype=F64)
    for line_search in (False, True, None):
        z, info = solvers.solve_root(
            g, z0, method="broyden", tol=1e-12, max_iter=60, stop="abs",
            line_search=line_search,
        )
        assert info.all_converged
        assert info.problem == "root"
        root = torch.sign(z[:, :1]).expand(3, 2)
        torch.testing.assert_close(z, root, atol=1e-10, rtol=0)


def test_solve_root_elementwise_cubic_with_known_roots():
    # g(z) = z^3 + z - c with c = r^3 + r: unique real root r; Jacobian near +I here, so
    # the initial inverse-Jacobian guess is +I (init_scale=-1)
    r = torch.tensor([[0.5, -1.0, 2.0], [1.5, 0.0, -0.3]], dtype=F64)
    c = r**3 + r
    z, info = solvers.solve_root(
        lambda z: z**3 + z - c, torch.zeros_like(r), method="broyden", init_scale=-1.0,
        line_search=True,
        tol=1e-12, max_iter=100, stop="abs",
    )
    assert info.all_converged
    torch.testing.assert_close(z, r, atol=1e-10, rtol=0)


def broyden_tridiagonal(x):
    """Moré, Garbow & Hillstrom (1981), problem 30."""
    left = torch.nn.functional.pad(x, (1, 0))[:, :-1]
    right = torch.nn.functional.pad(x, (0, 1))[:, 1:]
    return (3 - 2 * x) * x - left - 2 * right + 1


def newton(g, z, steps=30):
    for _ in range(steps):
        jac = torch.func.vmap(torch.func.jacrev(lambda v: g(v[None])[0]))(z)
        z = z - torch.linalg.solve(jac, g(z))
    return z


@pytest.mark.parametrize("options", [{}, {"line_search": True, "init_scale": 1.0}])
def test_solve_root_broyden_tridiagonal_matches_newton(options):
    z0 = -torch.ones(2, 10, dtype=F64)
    reference = newton(broyden_tridiagonal, z0)
    assert float(broyden_tridiagonal(reference).abs().max()) < 1e-12
    z, info = solvers.solve_root(
        broyden_tridiagonal, z0, method="broyden", tol=1e-12, max_iter=200, stop="abs",
        **options,
    )
    assert info.all_converged
    torch.testing.assert_close(z, reference, atol=1e-10, rtol=0)


def test_failing_root_solve_is_reported_not_silent():
    # the old defaults (H0 = -I, no line search) blow up from this start (inf/NaN); the
    # result must say so
    z0 = -torch.ones(1, 10, dtype=F64)
    z, info = solvers.solve_root(
        broyden_tridiagonal, z0, method="broyden", tol=1e-12, max_iter=200, stop="abs",
        init_scale=1.0,
        line_search=False,
    )
    assert not info.all_converged
    assert bool(torch.isfinite(z).all())
    assert "converged" not in info.reasons()
    assert "sample 0" in info.explain()


def test_per_sample_stopping_freezes_easy_samples():
    # sample 0 contracts fast (rho 0.1), sample 1 slowly (rho 0.95)
    g = torch.Generator().manual_seed(1)
    a = torch.randn(2, 6, 6, generator=g, dtype=F64)
    a = a / torch.linalg.matrix_norm(a, 2)[:, None, None]
    a = a * torch.tensor([0.1, 0.95], dtype=F64)[:, None, None]
    b = torch.randn(2, 6, generator=g, dtype=F64)
    seen = []

    def f(z):
        seen.append(z.clone())
        return torch.einsum("bij,bj->bi", a, z) + b

    for method in METHODS:
        seen.clear()
        z, info = solvers.solve_fixed_point(
            f, torch.zeros(2, 6, dtype=F64), method=method, tol=1e-10, max_iter=1000,
            stop="abs",
        )
        assert info.all_converged
        easy, hard = info.iterations.tolist()
        assert easy < hard
        # after its stop the easy sample is never moved again ...
        for later in seen[easy:]:
            assert torch.equal(later[0], seen[easy][0])
        # ... and what is returned is exactly where it stopped
        assert torch.equal(z[0], seen[easy][0])
        assert torch.equal(info.trace[easy:, 0], info.trace[easy, 0].expand(len(info.trace) - easy))
        # and equals solving the easy sample alone
        alone, _ = solvers.solve_fixed_point(
            lambda z: torch.einsum("ij,bj->bi", a[0], z) + b[0], torch.zeros(1, 6, dtype=F64),
            method=method, tol=1e-10, max_iter=1000, stop="abs",
        )
        torch.testing.assert_close(z[:1], alone, atol=1e-12, rtol=0)


def test_lowest_residual_iterate_is_returned():
    # an expanding map: the start is the best point seen; it must be what comes back
    def f(z):
        return -1.5 * z + 1.0

    z0 = torch.full((1, 2), 0.39, dtype=F64)  # fixed point 0.4
    z, info = solvers.solve_fixed_point(f, z0, method="fixed_point", tol=1e-12, max_iter=10)
    torch.testing.assert_close(z, z0)
    assert int(info.lowest_iteration[0]) == 0
    assert float(info.residual[0]) > float(info.lowest_residual[0])
    assert info.reasons() == ["diverged"]


def test_nonfinite_sample_is_stopped_and_reported():
    def f(z):
        out = 0.5 * z + 1.0
        out[1] = out[1] / (z[1] - z[1])  # 0/0 and x/0: inf/NaN for sample 1 from the start
        return out

    z, info = solvers.solve_fixed_point(f, torch.zeros(2, 3), method="anderson", tol=1e-6)
    assert info.converged.tolist() == [True, False]
    assert info.nonfinite.tolist() == [False, True]
    assert bool(torch.isfinite(z).all())
    assert math.isinf(float(info.lowest_residual[1]))
    torch.testing.assert_close(z[0], torch.full((3,), 2.0), atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_low_precision_inputs_keep_float32_state_and_return_input_dtype(dtype):
    f32, z_star = contraction(batch=2, d=8, rho=0.5, seed=2, dtype=torch.float32)
    dtypes_seen = set()

    def f(z):
        dtypes_seen.add(z.dtype)
        return f32(z.float()).to(z.dtype)

    z, info = solvers.solve_fixed_point(f, torch.zeros(2, 8, dtype=dtype), method="broyden", tol=1e-2)
    assert z.dtype == dtype and dtypes_seen == {dtype}
    assert info.lowest_residual.dtype == torch.float32
    assert info.all_converged
    torch.testing.assert_close(z.double(), z_star, atol=0.05, rtol=0.05)


def test_rel_and_abs_residual_definitions():
    f, _ = contraction(batch=2, d=5, rho=0.6, seed=4)
    z, info = solvers.solve_fixed_point(f, torch.zeros(2, 5, dtype=F64), tol=1e-3, stop="rel")
    fz = f(z)
    torch.testing.assert_close(info.rel_residual, (fz - z).norm(dim=1) / fz.norm(dim=1))
    torch.testing.assert_close(info.lowest_residual, info.rel_residual)
    assert bool((info.lowest_residual <= 1e-3).all())
    assert info.trace.shape == (int(info.iterations.max()) + 1, 2)


def test_multidimensional_states_are_solved_per_sample():
    # z of shape (B, N, C): the residual is over all of a sample's elements
    f, z_star = contraction(batch=3, d=12, rho=0.5, seed=6)
    z, info = solvers.solve_fixed_point(
        lambda z: f(z.reshape(3, 12)).reshape(3, 4, 3), torch.zeros(3, 4, 3, dtype=F64),
        tol=1e-12, stop="abs", max_iter=200,
    )
    assert info.iterations.shape == (3,)
    torch.testing.assert_close(z.reshape(3, 12), z_star, atol=1e-10, rtol=0)


def test_registry_and_errors():
    assert solvers.available() == [
        "anderson", "broyden", "broyden_newton", "fixed_point", "hybrid", "newton_krylov"
    ]
    assert solvers.available(root=True) == ["broyden", "broyden_newton", "hybrid", "newton_krylov"]
    z0 = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="unknown solver 'newton'.*anderson"):
        solvers.solve_fixed_point(lambda z: z, z0, method="newton")
    with pytest.raises(ValueError, match="memry.*valid options"):
        solvers.build("anderson", memry=3)
    with pytest.raises(ValueError, match="fixed-point problems.*only.*broyden_newton.*newton_krylov"):
        solvers.solve_root(lambda z: z, z0, method="anderson")
    with pytest.raises(ValueError, match="stop='max'"):
        solvers.solve_fixed_point(lambda z: z, z0, stop="max")
    with pytest.raises(ValueError, match="tol=-1"):
        solvers.solve_fixed_point(lambda z: z, z0, tol=-1)
    with pytest.raises(ValueError, match="damping=1.5"):
        solvers.build("fixed_point", damping=1.5)
    with pytest.raises(ValueError, match="on_full='lru'"):
        solvers.build("broyden", on_full="lru")
    with pytest.raises(ValueError, match="shaped like z"):
        solvers.solve_fixed_point(lambda z: z[:, :1], z0)
    with pytest.raises(ValueError, match="inf or NaN"):
        solvers.solve_fixed_point(lambda z: z, torch.full((1, 2), math.nan))
    with pytest.raises(ValueError, match="batch dimension"):
        solvers.solve_fixed_point(lambda z: z, torch.zeros(2, dtype=torch.long))


def test_solver_runs_without_autograd():
    w = torch.randn(4, 4, requires_grad=True)
    z, info = solvers.solve_fixed_point(lambda z: torch.tanh(0.1 * z @ w), torch.ones(2, 4))
    assert not z.requires_grad


def test_public_solver_classes_are_exported_and_registered_directly():
    # registered classes (not factories re-declaring their signature): the registry's
    # options are the constructor's
    for name in solvers.available():
        cls = solvers.SOLVERS.entry(name).factory
        assert isinstance(cls, type) and issubclass(cls, solvers.Solver)
        assert cls.__name__ in solvers.__all__ and getattr(solvers, cls.__name__) is cls
        assert type(solvers.build(name)) is cls and cls.name == name


def test_sample_that_overflows_mid_solve_is_stopped_at_that_iteration():
    # plain iteration of z <- z^2 + 1 from 0 overflows float64 after a dozen steps; the
    # step whose evaluation overflows counts as the sample's last iteration
    z_py, k = 0.0, 0
    while math.isfinite(z_py * z_py + 1):
        z_py, k = z_py * z_py + 1, k + 1
    z, info = solvers.solve_fixed_point(
        lambda z: z * z + 1, torch.zeros(1, 1, dtype=F64), method="fixed_point", tol=1e-8,
        max_iter=50,
    )
    assert info.nonfinite.tolist() == [True] and not info.all_converged
    # iteration k makes z_k (finite) and evaluates f(z_k) = inf: it counts, and stops it
    assert info.iterations.tolist() == [k]
    assert math.isinf(float(info.residual[0]))
    assert info.reasons() == ["nonfinite"]
    assert bool(torch.isfinite(z).all())
