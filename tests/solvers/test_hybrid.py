"""Powell's hybrid method (``hybrid``) and ``solve_root``'s size rule, against ground truth:
closed-form roots of Moré-Garbow-Hillstrom systems, torch.linalg.solve on linear systems,
SciPy's ``hybr`` (MINPACK) as a peer, the dogleg step's defining properties, honest
convergence claims (property test, including problems with no root), per-sample batching
and option errors."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from formerlab import solvers
from formerlab.bench import roots
from formerlab.solvers.api import DENSE_MAX, auto_root_method
from formerlab.solvers.hybrid import dogleg

F64 = torch.float64
BY_NAME = {p.name: p for p in roots.problems()}


def hybrid_root(g, z0, tol=1e-10, max_iter=300, **options):
    return solvers.solve_root(g, z0, method="hybrid", tol=tol, stop="abs", max_iter=max_iter,
                              **options)


@pytest.mark.parametrize(
    "name,root",
    [
        ("rosenbrock", [1.0, 1.0]),
        ("rosenbrock@100x0", [1.0, 1.0]),
        ("helical_valley", [1.0, 0.0, 0.0]),
        ("helical_valley@10x0", [1.0, 0.0, 0.0]),
        ("brown_almost_linear", [1.0] * 10),
        ("variably_dimensioned", [1.0] * 10),
        ("powell_badly_scaled", [1.098159e-05, 9.106146]),  # MGH: the unique root
    ],
)
def test_known_roots(name, root):
    p = BY_NAME[name]
    z, info = hybrid_root(p.g, torch.tensor([p.x0], dtype=F64))
    assert info.all_converged, info.explain()
    torch.testing.assert_close(z[0], torch.tensor(root, dtype=F64), atol=1e-6, rtol=1e-6)


def test_powell_singular_reaches_its_singular_root():
    # J is singular at the root 0: convergence is linear, the dogleg must not blow up
    p = BY_NAME["powell_singular"]
    z, info = hybrid_root(p.g, torch.tensor([p.x0], dtype=F64), tol=1e-12, max_iter=500)
    assert info.all_converged and float(z.abs().max()) < 1e-4


def test_wood_reaches_a_root_of_its_gradient_equations():
    # the gradient of Wood's function also vanishes away from (1, 1, 1, 1) (MINPACK's
    # hybrd stops at (-0.968, 0.947, -0.970, 0.951)): check the residual, not the point
    p = BY_NAME["wood"]
    z, info = hybrid_root(p.g, torch.tensor([p.x0], dtype=F64))
    assert info.all_converged and float(p.g(z).abs().max()) <= 1e-10
    assert info.evaluations <= 100  # hybr: 93


def test_linear_systems_match_torch_linalg_solve():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(5, 12, 12, generator=gen, dtype=F64) + 4 * torch.eye(12, dtype=F64)
    b = torch.randn(5, 12, generator=gen, dtype=F64)
    exact = torch.linalg.solve(a, b)
    z, info = hybrid_root(lambda z: torch.einsum("bij,bj->bi", a, z) - b,
                          torch.zeros(5, 12, dtype=F64), tol=1e-11)
    assert info.all_converged
    torch.testing.assert_close(z, exact, atol=1e-10, rtol=0)
    # the forward-difference Jacobian of a linear map is exact up to rounding: the first
    # Gauss-Newton step lands within rounding of the root, a second (Broyden-corrected) one
    # at the tolerance
    assert int(info.iterations.max()) <= 3
    assert info.evaluations == 1 + 12 + int(info.iterations.max())


def test_autograd_jacobian_agrees_with_forward_differences():
    p = BY_NAME["discrete_integral_equation"]
    z0 = torch.tensor([p.x0], dtype=F64)
    z_fd, info_fd = hybrid_root(p.g, z0)
    z_ad, info_ad = hybrid_root(p.g, z0, jacobian="autograd")
    assert info_fd.all_converged and info_ad.all_converged
    torch.testing.assert_close(z_fd, z_ad, atol=1e-9, rtol=0)
    assert info_ad.evaluations == 1 + 10 + int(info_ad.iterations[0])


@pytest.mark.parametrize("name", ["chebyquad", "discrete_boundary_value", "broyden_banded",
                                  "trigonometric@100x0", "deq_tanh"])
def test_same_root_as_scipy_hybr(name):
    np = pytest.importorskip("numpy")
    optimize = pytest.importorskip("scipy.optimize")
    p = BY_NAME[name]
    z, info = hybrid_root(p.g, torch.tensor([p.x0], dtype=F64), tol=1e-10)
    assert info.all_converged, info.explain()
    res = optimize.root(lambda x: p.g(torch.from_numpy(x)[None])[0].numpy(), np.array(p.x0),
                        method="hybr")
    assert res.success
    torch.testing.assert_close(z[0], torch.from_numpy(res.x), atol=1e-7, rtol=1e-7)


def test_dogleg_step_properties():
    gen = torch.Generator().manual_seed(1)
    jac = torch.randn(3, 6, 6, generator=gen, dtype=F64) + 3 * torch.eye(6, dtype=F64)
    g = torch.randn(3, 6, generator=gen, dtype=F64)
    diag = torch.rand(3, 6, generator=gen, dtype=F64) + 0.5
    newton = -torch.linalg.solve(jac, g)
    # a large region: the Gauss-Newton step
    p = dogleg(jac, g, diag, torch.full((3,), 1e6, dtype=F64))
    torch.testing.assert_close(p, newton)
    # a small region: on the boundary ||D p|| = delta, along the scaled steepest descent
    delta = torch.full((3,), 1e-6, dtype=F64)
    p = dogleg(jac, g, diag, delta)
    torch.testing.assert_close((diag * p).norm(dim=1), delta)
    sd = -(torch.einsum("bji,bj->bi", jac, g)) / diag**2
    cos = (p * sd).sum(1) / (p.norm(dim=1) * sd.norm(dim=1))
    torch.testing.assert_close(cos, torch.ones(3, dtype=F64))
    # in between: on the boundary, on the segment from the Cauchy point (the minimiser of
    # the linear model along the scaled steepest descent, computed here independently) to
    # the Newton point, and the linear model decreases
    gs = torch.einsum("bji,bj->bi", jac, g) / diag  # scaled gradient
    jv = torch.einsum("bij,bj->bi", jac, gs / diag)
    cauchy = -((gs * gs).sum(1) / (jv * jv).sum(1))[:, None] * gs / diag
    n_c, n_n = (diag * cauchy).norm(dim=1), (diag * newton).norm(dim=1)
    assert bool((n_c < n_n).all())
    mid = 0.5 * (n_c + n_n)
    p = dogleg(jac, g, diag, mid)
    torch.testing.assert_close((diag * p).norm(dim=1), mid)
    u, v = p - cauchy, newton - cauchy
    cos = (u * v).sum(1) / (u.norm(dim=1) * v.norm(dim=1))
    torch.testing.assert_close(cos, torch.ones(3, dtype=F64))
    model = (g + torch.einsum("bij,bj->bi", jac, p)).norm(dim=1)
    assert bool((model < g.norm(dim=1)).all())
    # a singular J (rank 1) still gives a finite step inside the region
    sing = torch.ones(1, 2, 2, dtype=F64)
    p = dogleg(sing, torch.tensor([[1.0, -2.0]], dtype=F64), torch.ones(1, 2, dtype=F64),
               torch.ones(1, dtype=F64))
    assert bool(torch.isfinite(p).all()) and float(p.norm()) <= 1 + 1e-12


def test_batch_gives_the_per_sample_answers_of_solo_solves():
    c = torch.tensor([[-4.0], [0.5], [30.0]], dtype=F64)

    def g(z):  # per-sample cubic systems of different difficulty, coupled within a sample
        return z**3 + z - c + 0.1 * z.roll(1, dims=1)

    z0 = torch.full((3, 4), 0.3, dtype=F64)
    z, info = hybrid_root(g, z0)
    assert info.all_converged
    for k in range(3):
        zk, ik = solvers.solve_root(lambda v, k=k: v**3 + v - c[k] + 0.1 * v.roll(1, dims=1),
                                    z0[k:k + 1], method="hybrid", tol=1e-10, stop="abs",
                                    max_iter=300)
        torch.testing.assert_close(z[k], zk[0], atol=1e-13, rtol=0)
        assert int(info.iterations[k]) == int(ik.iterations[0])
    assert len(set(info.iterations.tolist())) > 1  # each sample stopped on its own


def test_fixed_point_problems_and_float32():
    gen = torch.Generator().manual_seed(2)
    a = 0.9 * torch.linalg.qr(torch.randn(2, 8, 8, generator=gen))[0]
    b = torch.randn(2, 8, generator=gen)
    z, info = solvers.solve_fixed_point(lambda z: torch.einsum("bij,bj->bi", a, z) + b,
                                        torch.zeros(2, 8), method="hybrid", tol=1e-5)
    assert info.all_converged and z.dtype == torch.float32
    exact = torch.linalg.solve(torch.eye(8) - a, b)
    torch.testing.assert_close(z, exact, atol=1e-4, rtol=1e-4)


def test_auto_rule_picks_by_problem_size():
    assert auto_root_method(1) == auto_root_method(DENSE_MAX) == "hybrid"
    assert auto_root_method(DENSE_MAX + 1) == "broyden_newton"
    small = solvers.solve_root(lambda z: z - 1, torch.zeros(2, 4, 4, dtype=F64))[1]
    large = solvers.solve_root(lambda z: z - 1, torch.zeros(2, 65, dtype=F64))[1]
    assert small.method == "hybrid" and large.method == "broyden_newton"
    assert small.all_converged and large.all_converged


def test_no_root_is_reported_not_converged():
    # x^2 + 1 = 0 has no real root; ||g|| has a minimum (1) at 0: the trust region
    # collapses there, the solve stops early and says so
    z, info = hybrid_root(lambda z: z**2 + 1, torch.tensor([[3.0], [-0.5]], dtype=F64),
                          max_iter=400)
    assert not bool(info.converged.any())
    torch.testing.assert_close(info.lowest_residual, torch.ones(2, dtype=F64), atol=1e-6, rtol=0)
    assert int(info.iterations.max()) < 400 and any("stopped" in n for n in info.notes)
    assert set(info.reasons()) <= {"stalled", "slow"}


def test_fallback_switches_and_respects_the_budget():
    p = BY_NAME["trigonometric"]  # hybr and hybrid both stop at a non-root here
    z, info = hybrid_root(p.g, torch.tensor([p.x0], dtype=F64), max_iter=150,
                          fallback="broyden_newton", stall=10)
    assert any("switched to broyden_newton" in n for n in info.notes)
    assert int(info.iterations[0]) <= 150
    assert bool(info.converged[0]) == (float(p.g(z).norm()) <= 1e-10)


def test_bad_options_are_named():
    for options, match in [
        ({"factor": 0}, "factor=0 is not allowed"),
        ({"jacobian": "exact"}, r"jacobian='exact' is not allowed.*'fd', 'autograd'"),
        ({"rescale": "yes"}, "rescale='yes' is not allowed; expected True or False"),
        ({"max_fails": 0}, "max_fails=0 is not allowed"),
        ({"stall": 0}, "stall=0 is not allowed"),
        ({"fallback": "anderson"}, r"fallback='anderson' is not allowed.*broyden_newton"),
        ({"fallback": "hybrid"}, r"fallback='hybrid' is not allowed"),
        ({"facter": 1.0}, "facter.*valid options"),
    ]:
        with pytest.raises(ValueError, match=match):
            solvers.build("hybrid", **options)


# -- the property: a claim of convergence is always true, also where there is no root ------
PROBLEMS = {
    # name: (g, has a root)
    "no_root_square": (lambda z, c: z**2 + 1 + c**2, False),
    "no_root_exp": (lambda z, c: torch.exp(z) + c.abs(), False),
    "cubic": (lambda z, c: z**3 + z - 3 * c, True),
    "rotation_plus_tanh": (lambda z, c: torch.tanh(2 * z.roll(1, dims=1)) - z + c, True),
    "atan_overshoot": (lambda z, c: torch.atan(5 * (z - c)), True),
}


@settings(max_examples=25, deadline=None)
@given(
    name=st.sampled_from(sorted(PROBLEMS)),
    method=st.sampled_from(["hybrid", "auto", "broyden_newton"]),
    seed=st.integers(0, 2**16),
    tol=st.sampled_from([1e-3, 1e-8]),
    scale=st.sampled_from([0.1, 1.0, 10.0]),
)
def test_converged_claims_are_true(name, method, seed, tol, scale):
    g_of, has_root = PROBLEMS[name]
    gen = torch.Generator().manual_seed(seed)
    c = torch.randn(3, 5, generator=gen, dtype=F64)
    z0 = scale * torch.randn(3, 5, generator=gen, dtype=F64)
    z, info = solvers.solve_root(lambda z: g_of(z, c), z0, method=method, tol=tol, stop="abs",
                                 max_iter=60)
    residual = g_of(z, c).norm(dim=1)
    for k in range(3):
        if bool(info.converged[k]):
            assert float(residual[k]) <= tol, (name, method, k, float(residual[k]))
        if not has_root:
            assert not bool(info.converged[k])
    assert bool(torch.isfinite(z).all())
    assert math.isfinite(float(info.lowest_residual.max())) or bool(info.nonfinite.any())
