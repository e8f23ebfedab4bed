"""The DEQ layer against exact answers: implicit gradients vs differentiating a fully
converged unrolled solve, gradcheck, saved-tensor counts independent of the forward
iteration count, Hutchinson and power-iteration estimates vs exact matrix norms."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from formerlab.deq import (
    DEQ,
    NonConvergenceError,
    apply_spectral_norm,
    apply_weight_norm,
    jacobian_frobenius,
    jacobian_spectral_norm,
    remove_norm,
)

F64 = torch.float64


class TanhCell(nn.Module):
    """f(z, x) = tanh(W z + U x + b) with ||W||_2 = rho < 1 (a contraction in z)."""

    def __init__(self, d: int = 6, e: int = 4, rho: float = 0.6, seed: int = 0, dtype=F64):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        w = torch.randn(d, d, generator=g, dtype=dtype)
        self.w = nn.Parameter(rho * w / torch.linalg.matrix_norm(w, 2))
        self.u = nn.Parameter(torch.randn(d, e, generator=g, dtype=dtype) / e**0.5)
        self.b = nn.Parameter(0.1 * torch.randn(d, generator=g, dtype=dtype))

    def forward(self, z, x):
        return torch.tanh(z @ self.w.T + x @ self.u.T + self.b)


class RotationCell(TanhCell):
    """f(z, x) = W z + U x + b with W = 0.99 * orthogonal: contracts by exactly 0.99."""

    def __init__(self):
        super().__init__(d=32, e=8, seed=4)
        with torch.no_grad():
            q, _ = torch.linalg.qr(torch.randn(32, 32, dtype=F64))
            self.w.copy_(0.99 * q)

    def forward(self, z, x):
        return z @ self.w.T + x @ self.u.T + self.b


def unrolled(cell, x, steps):
    """Differentiate straight through ``steps`` plain iterations from zero."""
    z = torch.zeros(x.shape[0], cell.w.shape[0], dtype=x.dtype)
    for _ in range(steps):
        z = cell(z, x)
    return z


def grads(loss, cell, x):
    return torch.autograd.grad(loss, [x, *cell.parameters()])


def exact_deq(cell, backward="implicit", **kw):
    options = dict(solver="broyden", max_iter=100, tol=1e-13, stop="abs", backward_tol=1e-13)
    options.update(kw)
    return DEQ(cell, backward=backward, **options)



@pytest.mark.parametrize(
    "solver", ["broyden", "anderson", "fixed_point", "newton_krylov", "broyden_newton"]
)
def test_implicit_gradient_equals_converged_unrolled_gradient(solver):
    cell = TanhCell()
    x = torch.randn(3, 4, dtype=F64, requires_grad=True)
    c = torch.randn(3, 6, dtype=F64)
    deq = exact_deq(cell, solver=solver, max_iter=300)
    z = deq(x, z0=torch.zeros(3, 6, dtype=F64))
    assert deq.info.all_converged
    implicit = grads((z * c).sum(), cell, x)
    assert deq.backward_info is not None and deq.backward_info.all_converged
    # ground truth: backprop through a fully converged unrolled solve (0.6^200 ~ 1e-45)
    reference = grads((unrolled(cell, x, 200) * c).sum(), cell, x)
    for got, want in zip(implicit, reference):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
        assert got.abs().max() > 1e-3  # not trivially zero


def test_implicit_gradient_matches_the_implicit_function_theorem_in_closed_form():
    # dL/dx = U^T D (I - W^T D)^-1 c with D = diag(1 - z*^2): a torch.linalg.solve answer
    cell = TanhCell(seed=3)
    x = torch.randn(1, 4, dtype=F64, requires_grad=True)
    c = torch.randn(1, 6, dtype=F64)
    z = exact_deq(cell)(x, z0=torch.zeros(1, 6, dtype=F64))
    (gx,) = torch.autograd.grad((z * c).sum(), x)
    with torch.no_grad():
        dg = torch.diag(1 - z[0] ** 2)
        jac = dg @ cell.w  # df/dz at z*
        u = torch.linalg.solve(torch.eye(6, dtype=F64) - jac.T, c[0])
        want = cell.u.T @ (dg @ u)
    torch.testing.assert_close(gx[0], want, atol=1e-10, rtol=0)


def test_gradcheck_implicit_layer():
    cell = TanhCell(d=4, e=3, seed=1)
    deq = exact_deq(cell)
    x = torch.randn(2, 3, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x: deq(x, z0=torch.zeros(2, 4, dtype=F64)), (x,), eps=1e-6, atol=1e-7
    )


@pytest.mark.parametrize("backward", ["phantom", "unroll"])
def test_phantom_and_unroll_approach_the_implicit_gradient_with_k(backward):
    cell = TanhCell(seed=2)
    x = torch.randn(3, 4, dtype=F64, requires_grad=True)
    c = torch.randn(3, 6, dtype=F64)
    z0 = torch.zeros(3, 6, dtype=F64)
    implicit = grads((exact_deq(cell)(x, z0=z0) * c).sum(), cell, x)
    errors = []
    for k in (1, 60):
        kw = {"phantom_steps": k, "phantom_damping": 0.5} if backward == "phantom" else {"unroll_steps": k}
        got = grads((exact_deq(cell, backward, **kw)(x, z0=z0) * c).sum(), cell, x)
        errors.append(max(float((a - b).abs().max()) for a, b in zip(got, implicit)))
    assert errors[1] < 1e-6  # (converged: a Neumann series of k terms)
    assert errors[0] > 1e-3  # one step is a genuinely different (approximate) gradient


@pytest.mark.parametrize("backward,tau", [("phantom", 0.5), ("phantom", 0.3), ("unroll", 1.0)])
def test_phantom_gradient_matches_its_closed_form_on_a_linear_cell(backward, tau):
    # f(z, x) = W z + U x + b. k damped steps z <- (1 - tau) z + tau f(z, x) from the
    # (detached) fixed point give dz_k/dx = tau sum_{j<k} M^j U, M = (1 - tau) I + tau W
    k = 3
    cell = RotationCell()
    x = torch.randn(2, 8, dtype=F64, requires_grad=True)
    c = torch.randn(2, 32, dtype=F64)
    kw = {"phantom_steps": k, "phantom_damping": tau} if backward == "phantom" else {"unroll_steps": k}
    deq = exact_deq(cell, backward, max_iter=400, **kw)
    z = deq(x, z0=torch.zeros(2, 32, dtype=F64))
    (gx,) = torch.autograd.grad((z * c).sum(), x)
    with torch.no_grad():
        w, u = cell.w, cell.u
        m = (1 - tau) * torch.eye(32, dtype=F64) + tau * w
        total = sum(torch.linalg.matrix_power(m, j) for j in range(k)) * tau
        want = c @ (total @ u)
    torch.testing.assert_close(gx, want, atol=1e-10, rtol=0)


def count_saved(fn):
    """Tensors and bytes autograd saves for backward during ``fn()``."""
    count, nbytes = 0, 0

    def pack(t):
        nonlocal count, nbytes
        count += 1
        nbytes += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, count, nbytes


@pytest.mark.parametrize("backward", ["implicit", "phantom", "unroll"])
def test_saved_tensors_do_not_grow_with_forward_iterations(backward):
    # W = 0.99 * orthogonal: plain iteration contracts by exactly 0.99 per step, so the
    # residual stays far from zero for 60 iterations and every iteration runs (tol=0)
    cell = RotationCell()
    x = torch.randn(4, 8, dtype=F64, requires_grad=True)
    saved = {}
    for iters in (10, 60):
        # tol=0 forces every iteration to run
        deq = DEQ(cell, solver="fixed_point", max_iter=iters, tol=0.0, backward=backward)
        z, count, nbytes = count_saved(lambda deq=deq: deq(x, z0=torch.zeros(4, 32, dtype=F64)))
        assert int(deq.info.iterations.min()) == iters
        z.sum().backward()
        saved[iters] = (count, nbytes)
    assert saved[10] == saved[60]
    assert saved[10][0] > 0


def test_implicit_backward_memory_is_one_graph_of_f():
    cell = TanhCell(d=32, e=8, rho=0.9, seed=4, dtype=torch.float32)
    x = torch.randn(4, 8, requires_grad=True)
    _, one_step, _ = count_saved(lambda: cell(torch.zeros(4, 32).requires_grad_(), x))
    deq = DEQ(cell, solver="anderson", max_iter=40, tol=1e-6)
    _, count, _ = count_saved(lambda: deq(x, z0=torch.zeros(4, 32)))
    assert count == one_step


def test_jacobian_frobenius_is_an_unbiased_estimate():
    # f(z) = A z: ||A||_F^2 / d exactly
    g = torch.Generator().manual_seed(0)
    a = torch.randn(2, 5, 5, generator=g, dtype=F64)
    z = torch.randn(2, 5, dtype=F64, requires_grad=True)
    f_out = torch.einsum("bij,bj->bi", a, z)
    est = jacobian_frobenius(f_out, z, samples=4000, create_graph=False, generator=g)
    exact = a.pow(2).sum() / z.numel()
    assert abs(float(est) / float(exact) - 1) < 0.05


def test_jacobian_spectral_norm_matches_matrix_2_norm():
    g = torch.Generator().manual_seed(1)
    q1, _ = torch.linalg.qr(torch.randn(2, 6, 6, generator=g, dtype=F64))
    q2, _ = torch.linalg.qr(torch.randn(2, 6, 6, generator=g, dtype=F64))
    s = torch.tensor([[0.9, 0.4, 0.3, 0.2, 0.1, 0.05], [1.7, 0.5, 0.2, 0.1, 0.1, 0.1]], dtype=F64)
    a = q1 @ torch.diag_embed(s) @ q2.transpose(1, 2)
    z = torch.randn(2, 6, dtype=F64)
    est = jacobian_spectral_norm(lambda z: torch.einsum("bij,bj->bi", a, z), z, iters=30)
    torch.testing.assert_close(est, s[:, 0], atol=1e-8, rtol=0)


def test_jacobian_regulariser_is_added_and_trainable():
    cell = TanhCell(seed=5)
    x = torch.randn(3, 4, dtype=F64)
    deq = DEQ(cell, jac_reg=2.0, jac_reg_samples=2, tol=1e-8, max_iter=100)
    deq.train()
    z = deq(x, z0=torch.zeros(3, 6, dtype=F64))
    assert deq.reg_loss is not None and deq.jac_loss is not None
    torch.testing.assert_close(deq.reg_loss, 2.0 * deq.jac_loss.float())
    (gw,) = torch.autograd.grad(deq.reg_loss, cell.w, retain_graph=True)
    assert gw.abs().max() > 0
    assert "deq_jac_loss" in deq.diagnostics()
    z.sum().backward()
    deq.eval()
    with torch.no_grad():
        deq(x, z0=torch.zeros(3, 6, dtype=F64))
    assert deq.reg_loss is None


def test_fixed_point_correction_keeps_differentiable_intermediate_estimates():
    cell = TanhCell(seed=6, rho=0.9)
    x = torch.randn(3, 4, dtype=F64)
    deq = DEQ(cell, solver="fixed_point", tol=1e-10, max_iter=60, correction=3, correction_weight=1.0)
    z = deq(x, z0=torch.zeros(3, 6, dtype=F64))
    assert len(deq.corrections) == 3
    assert all(c.requires_grad for c in deq.corrections)
    # later iterates are closer to the fixed point
    dists = [float((c - z).detach().norm()) for c in deq.corrections]
    assert dists == sorted(dists, reverse=True)
    # the loss by hand: weight * sum_i decay^(n-1-i) mean((step_i - z*)^2) / mean(z*^2)
    target = z.detach()
    want = sum(
        0.8 ** (2 - i) * (step - target).pow(2).mean() / target.pow(2).mean()
        for i, step in enumerate(deq.corrections)
    )
    assert deq.reg_loss is not None
    torch.testing.assert_close(deq.reg_loss.detach(), want.detach().float(), rtol=1e-6, atol=0)
    deq.reg_loss.backward()
    assert cell.w.grad is not None and cell.w.grad.abs().max() > 0


def nonconvergent_deq(policy):
    cell = TanhCell(seed=7, rho=0.99)
    return DEQ(cell, solver="fixed_point", max_iter=2, tol=1e-12, on_nonconvergence=policy)


def test_nonconvergence_count_warn_raise():
    x = torch.randn(3, 4, dtype=F64)
    z0 = torch.zeros(3, 6, dtype=F64)
    deq = nonconvergent_deq("count")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        deq(x, z0=z0)
    assert deq.diagnostics()["deq_nonconverged"] == 1.0
    assert deq.nonconverged_total == 3
    with pytest.warns(RuntimeWarning, match="(?s)did not converge.*sample 0: slow"):
        nonconvergent_deq("warn")(x, z0=z0)
    with pytest.raises(NonConvergenceError, match="slow") as caught:
        nonconvergent_deq("raise")(x, z0=z0)
    assert not caught.value.info.all_converged


def test_eval_without_grad_builds_no_graph():
    cell = TanhCell()
    deq = DEQ(cell)
    with torch.no_grad():
        z = deq(torch.randn(2, 4, dtype=F64), z0=torch.zeros(2, 6, dtype=F64))
    assert not z.requires_grad and deq.backward_info is None


def test_plain_callable_closing_over_parameters_still_gets_gradients():
    cell = TanhCell()
    deq = DEQ(lambda z, x: cell(z, x), tol=1e-12, max_iter=200, stop="abs", backward_tol=1e-12)
    x = torch.randn(2, 4, dtype=F64)  # x itself does not need grad
    z = deq(x, z0=torch.zeros(2, 6, dtype=F64))
    (gw,) = torch.autograd.grad(z.sum(), cell.w)
    (want,) = torch.autograd.grad(unrolled(cell, x, 200).sum(), cell.w)
    torch.testing.assert_close(gw, want, atol=1e-8, rtol=0)


def test_bad_options_raise_naming_the_value():
    cell = TanhCell()
    with pytest.raises(ValueError, match="backward='adjoint'.*implicit"):
        DEQ(cell, backward="adjoint")
    with pytest.raises(ValueError, match="phantom_damping=1.5"):
        DEQ(cell, phantom_damping=1.5)
    with pytest.raises(ValueError, match="on_nonconvergence='ignore'"):
        DEQ(cell, on_nonconvergence="ignore")
    with pytest.raises(ValueError, match="unknown solver"):
        DEQ(cell, solver="newton")
    with pytest.raises(ValueError, match="memry"):
        DEQ(cell, solver_options={"memry": 3})


def test_weight_and_spectral_norm_helpers():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8))
    x = torch.randn(5, 8)
    before = net(x)
    apply_weight_norm(net)
    # weight norm is a reparametrisation: the function is unchanged at initialisation
    torch.testing.assert_close(net(x), before)
    assert hasattr(net[0], "parametrizations")
    remove_norm(net)
    assert not hasattr(net[0], "parametrizations")
    torch.testing.assert_close(net(x), before)

    net2 = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8))
    with torch.no_grad():
        net2[0].weight.mul_(10)
    apply_spectral_norm(net2, n_power_iterations=5)
    for _ in range(5):
        net2(x)  # power iterations run in training mode
    sigma = torch.linalg.matrix_norm(net2[0].weight.detach(), 2)
    assert abs(float(sigma) - 1) < 1e-3


def test_backward_solver_defaults_to_the_forward_one_and_can_be_configured():
    cell = TanhCell()
    deq = DEQ(cell, solver="broyden", solver_options={"memory": 4})
    assert deq.backward_solver is deq.solver and deq.solver.memory == 4
    deq = DEQ(cell, solver="broyden", backward_options={"memory": 7})
    assert deq.backward_solver.name == "broyden" and deq.backward_solver.memory == 7
    deq = DEQ(cell, backward_solver="fixed_point", backward_options={"damping": 0.5},
              backward_tol=1e-12, backward_max_iter=500, stop="abs", tol=1e-12, max_iter=200)
    x = torch.randn(2, 4, dtype=F64, requires_grad=True)
    (gx,) = torch.autograd.grad(deq(x, z0=torch.zeros(2, 6, dtype=F64)).sum(), x)
    assert deq.backward_info.method == "fixed_point" and deq.backward_info.all_converged
    (want,) = torch.autograd.grad(unrolled(cell, x, 200).sum(), x)
    torch.testing.assert_close(gx, want, atol=1e-9, rtol=0)
