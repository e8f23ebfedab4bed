"""The pieces that make root solves robust, each against a hand-computed answer: the
backtracking rule, the secant scale of the initial inverse Jacobian, forward-difference
J-v products, the Broyden probe."""

from __future__ import annotations

import pytest
import torch

from formerlab import solvers
from formerlab.solvers.base import SolveRun, backtrack, fd_jvp, secant_scale

F64 = torch.float64


def identity_run(z0):
    return SolveRun(lambda z: z.clone(), z0, problem="root", tol=0.0, max_iter=10, stop="abs",
                    method="test")


def test_backtracking_requires_sufficient_decrease_and_halves():
    run = identity_run(torch.ones(1, 1, dtype=F64))
    # full step: |g| = 0.99995 = (1 - 5e-5) |g0|, short of the (1 - 1e-4) decrease: halve
    dz = torch.full((1, 1), -1.99995, dtype=F64)
    z, g, ok = backtrack(run, dz, steps=4)
    torch.testing.assert_close(z, 1 + dz / 2)
    torch.testing.assert_close(g, z)
    assert ok.tolist() == [True]
    assert run.evaluations == 1 + 2
    # an uphill direction: nothing qualifies, the shortest step 2^-4 is taken, ok is False
    z, _, ok = backtrack(run, torch.ones(1, 1, dtype=F64), steps=4)
    torch.testing.assert_close(z, torch.full((1, 1), 1 + 2.0**-4, dtype=F64))
    assert ok.tolist() == [False]


def test_backtracking_is_per_sample():
    run = identity_run(torch.ones(2, 1, dtype=F64))
    dz = torch.tensor([[-1.0], [-1.99995]], dtype=F64)  # sample 0: full step; 1: half
    z, _, ok = backtrack(run, dz, steps=3)
    torch.testing.assert_close(z, torch.tensor([[0.0], [1 - 1.99995 / 2]], dtype=F64))
    assert ok.tolist() == [True, True]


def test_secant_scale_recovers_the_inverse_slope_with_its_sign():
    s = torch.tensor([[1.0, 2.0], [0.5, -1.0], [1.0, 0.0]], dtype=F64)
    y = torch.stack([3 * s[0], -0.25 * s[1], torch.zeros(2, dtype=F64)])
    h = secant_scale(s, y)
    torch.testing.assert_close(h, torch.tensor([1 / 3, -4.0, 1.0], dtype=F64))
    # a rotation (s.y = 0): magnitude ||s|| / ||y||, positive sign
    h = secant_scale(torch.tensor([[1.0, 0.0]], dtype=F64), torch.tensor([[0.0, 2.0]], dtype=F64))
    torch.testing.assert_close(h, torch.tensor([0.5], dtype=F64))


def test_forward_difference_jvp_matches_the_analytic_jacobian():
    a = torch.tensor([[2.0, -1.0, 0.5], [0.0, 1.0, 3.0], [1.0, 1.0, 1.0]], dtype=F64)

    def g(z):
        return torch.sin(z) @ a.T + z**2

    z0 = torch.tensor([[0.3, -0.7, 1.1]], dtype=F64)
    run = SolveRun(g, z0, problem="root", tol=0.0, max_iter=1, stop="abs", method="test")
    v = torch.tensor([[1.0, -2.0, 0.5]], dtype=F64)
    jac = a * torch.cos(z0) + torch.diag(2 * z0[0])
    torch.testing.assert_close(fd_jvp(run, run.z, run.g, v), v @ jac.T, atol=1e-6, rtol=0)
    assert run.evaluations == 2


def test_broyden_probe_signs_the_first_step_for_a_positive_jacobian():
    # g(z) = 3 (z - 2): J = +3 I. The probe gives H0 = I/3 up to the finite-difference
    # error (~1e-7 relative), so the first step is Newton's to that accuracy and the second
    # (secant-corrected) one exact: 1 + 1 (probe) + 2 evaluations
    z, info = solvers.solve_root(
        lambda z: 3 * (z - 2), torch.zeros(2, 5, dtype=F64), method="broyden", tol=1e-10,
        stop="abs",
    )
    assert info.all_converged and info.iterations.tolist() == [2, 2]
    assert bool((info.trace[1] <= 1e-6 * info.trace[0]).all())
    assert info.evaluations == 4
    torch.testing.assert_close(z, torch.full((2, 5), 2.0, dtype=F64))
    # the old start H0 = -I steps away from the root: ||g|| grows at the first step
    _, old = solvers.solve_root(
        lambda z: 3 * (z - 2), torch.zeros(1, 5, dtype=F64), method="broyden", init_scale=1.0,
        line_search=False, tol=1e-10, stop="abs", max_iter=1,
    )
    assert float(old.trace[1, 0]) > float(old.trace[0, 0])


def rosenbrock(x):
    return torch.stack([1 - x[:, 0], 10 * (x[:, 1] - x[:, 0] ** 2)], dim=1)


def test_broyden_restarts_where_the_line_search_fails_and_says_so():
    # with a monotone search, Broyden's early secant model goes uphill on Rosenbrock
    z, info = solvers.solve_root(
        rosenbrock, torch.tensor([[-1.2, 1.0]], dtype=F64), method="broyden", ls_slack=0.0,
        tol=1e-10, stop="abs", max_iter=300,
    )
    assert info.all_converged
    assert any("no decrease" in n for n in info.notes)
    torch.testing.assert_close(z, torch.ones(1, 2, dtype=F64), atol=1e-9, rtol=0)
    monotone = info.evaluations
    # the default non-monotone search lets those steps through: far fewer evaluations
    z, info = solvers.solve_root(
        rosenbrock, torch.tensor([[-1.2, 1.0]], dtype=F64), method="broyden", tol=1e-10,
        stop="abs", max_iter=300,
    )
    assert info.all_converged and info.evaluations * 4 < monotone
    torch.testing.assert_close(z, torch.ones(1, 2, dtype=F64), atol=1e-9, rtol=0)


def test_non_monotone_slack_accepts_a_bounded_increase_only():
    run = identity_run(torch.ones(1, 1, dtype=F64))
    # full step to |g| = 1.5: accepted with slack 1 (bound 2 - 1e-4), not with slack 0.25
    z, _, ok = backtrack(run, torch.full((1, 1), 0.5, dtype=F64), steps=2, slack=1.0)
    assert z.tolist() == [[1.5]] and ok.tolist() == [True]
    z, _, ok = backtrack(run, torch.full((1, 1), 0.5, dtype=F64), steps=2, slack=0.25)
    assert z.tolist() == [[1.125]] and ok.tolist() == [True]  # a = 1/4: 1.125 <= 1.25


def test_root_relative_residual_is_the_reduction_of_the_starting_residual():
    # g(z) = z - 3 from z0 = 0: ||g(z0)|| = 3 sqrt(2); stop="rel" at 1e-6 means
    # ||g(z)|| <= 3 sqrt(2) 1e-6, not ||g(z)|| <= 1e-6
    z, info = solvers.solve_root(
        lambda z: 10 * (z - 3), torch.zeros(1, 2, dtype=F64), method="newton_krylov",
        tol=1e-6, stop="rel",
    )
    g_norm = float((10 * (z - 3)).norm())
    g0_norm = 30 * 2**0.5
    torch.testing.assert_close(info.rel_residual, torch.tensor([g_norm / g0_norm], dtype=F64))
    torch.testing.assert_close(info.abs_residual, torch.tensor([g_norm], dtype=F64))
    assert bool(info.converged[0]) == (g_norm / g0_norm <= 1e-6)
    # a residual reduced 1e-6-fold but above 1e-6 in absolute terms counts as converged
    run = identity_run(torch.full((1, 1), 1e3, dtype=F64))
    run.stop = "rel"
    run.accept(torch.full((1, 1), 5e-4, dtype=F64), torch.full((1, 1), 5e-4, dtype=F64))
    torch.testing.assert_close(run.residual, torch.tensor([5e-7], dtype=F64))


def test_rewind_returns_active_samples_to_their_best_point():
    run = identity_run(torch.ones(2, 1, dtype=F64))
    run.accept(torch.full((2, 1), 0.5, dtype=F64), torch.full((2, 1), 0.5, dtype=F64))
    run.accept(torch.full((2, 1), 4.0, dtype=F64), torch.full((2, 1), 4.0, dtype=F64))
    assert run.z.tolist() == [[4.0], [4.0]]
    run.active[1] = False
    run.rewind()
    assert run.z.tolist() == [[0.5], [4.0]] and run.g.tolist() == [[0.5], [4.0]]
    assert run.residual.tolist() == [0.5, 4.0]


def test_eisenstat_walker_forcing_terms_by_hand():
    # choice 2 of Eisenstat & Walker (1996): eta = 0.9 (||g|| / ||g_old||)^2, safeguarded
    # by 0.9 eta_old^2 when that exceeds 0.1, capped by eta_max, floored at 0.5 tau / ||g||
    nk = solvers.NewtonKrylov()
    run = SolveRun(lambda z: z.clone(), torch.full((1, 1), 0.05, dtype=F64), problem="root",
                   tol=1e-2, max_iter=5, stop="abs", method="test")
    eta = lambda prev, g, g_old: float(nk._next_eta(  # noqa: E731
        run, torch.tensor([prev], dtype=F64), torch.tensor([g], dtype=F64),
        torch.tensor([g_old], dtype=F64)))
    assert eta(0.5, 0.8, 1.0) == pytest.approx(0.9 * 0.64)  # plain choice 2
    assert eta(0.9, 0.1, 1.0) == pytest.approx(0.9 * 0.81)  # safeguard: 0.729 > 0.009
    assert eta(0.1, 0.05, 1.0) == pytest.approx(0.5 * 1e-2 / 0.05)  # floor 0.1 > 0.00225
    assert eta(0.5, 2.0, 1.0) == pytest.approx(0.9)  # capped at eta_max


def test_forward_difference_of_a_zero_direction_is_zero_and_stays_finite():
    inputs = []

    def g(z):
        inputs.append(z.clone())
        return torch.sin(z)

    # sample 0 at |z| ~ 1e9 with v = 0: the step e = sqrt(eps)(1 + |z|) / |v| would be
    # inf there, and z + inf * 0 = NaN
    z0 = torch.tensor([[1e9, 1e9, 1e9], [1.0, 1.0, 1.0]], dtype=F64)
    run = SolveRun(g, z0, problem="root", tol=0.0, max_iter=1, stop="abs", method="test")
    v = torch.zeros(2, 3, dtype=F64)
    v[1, 0] = 1.0
    jv = fd_jvp(run, run.z, run.g, v)
    assert jv[0].tolist() == [0.0, 0.0, 0.0]
    torch.testing.assert_close(jv[1], torch.tensor([0.5403023, 0.0, 0.0], dtype=F64), atol=1e-7, rtol=0)
    assert all(bool(torch.isfinite(z).all()) for z in inputs)


def test_an_infinite_iterate_of_a_root_problem_is_not_a_root():
    # g can be finite (even 0) at an infinite z, e.g. 1 / (1 + z^2): such a step stops the
    # sample as non-finite instead of claiming a root
    run = SolveRun(lambda z: 1 / (1 + z * z), torch.ones(1, 1, dtype=F64), problem="root",
                   tol=1e-8, max_iter=5, stop="abs", method="test")
    z_inf = torch.full((1, 1), float("inf"), dtype=F64)
    run.accept(z_inf, 1 / (1 + z_inf * z_inf))
    assert run.nonfinite.tolist() == [True] and run.converged.tolist() == [False]
    z, info = run.result()
    assert z.tolist() == [[1.0]] and not info.all_converged
