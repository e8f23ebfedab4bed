"""Iterative pseudoinverse against torch.linalg.pinv; diagnostics honesty; gradients."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from formerlab.linalg.pinv import PinvError, penrose_residual, pinv, pinv_iterates

D = torch.float64


def rel(a, b):
    return ((a.double() - b.double()).flatten(-2).norm(dim=-1) / b.double().flatten(-2).norm(dim=-1))


def softmax_matrix(n, std=1.0, batch=(), seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(*batch, n, 64, generator=g, dtype=D) * std
    k = torch.randn(*batch, n, 64, generator=g, dtype=D) * std
    return (q @ k.mT / 8).softmax(-1)


@pytest.mark.parametrize("n", [2, 17, 64, 200])
def test_rand_matrices_converge_to_pinv_float64(n):
    A = torch.rand(n, n, generator=torch.Generator().manual_seed(n), dtype=D)
    Z, info = pinv(A, init="razavi", return_info=True)
    assert bool(info.converged)
    err = rel(Z, torch.linalg.pinv(A, rtol=info.rcond))
    assert err <= info.bound <= 1e-8


@pytest.mark.parametrize("n", [2, 17, 64, 256])
def test_softmax_matrices_converge_to_pinv_float64(n):
    A = softmax_matrix(n, std=1.5, seed=n)
    Z, info = pinv(A, tol=1e-9, return_info=True)
    assert bool(info.converged)
    assert rel(Z, torch.linalg.pinv(A, rtol=info.rcond)) <= info.bound <= 1e-9


def test_batch_mixing_scales_1e6_converges_per_matrix():
    g = torch.Generator().manual_seed(0)
    scales = torch.tensor([1e-3, 1e-1, 1.0, 1e3], dtype=D)
    A = torch.rand(4, 32, 32, generator=g, dtype=D) * scales[:, None, None]
    Z, info = pinv(A, return_info=True)
    assert info.converged.all()
    assert (rel(Z, torch.linalg.pinv(A)) <= 1e-4).all()
    # scale invariance of the per-matrix init: same iteration counts as unscaled copies
    _, unscaled = pinv(A / scales[:, None, None], return_info=True)
    assert torch.equal(info.iterations, unscaled.iterations)


@pytest.mark.parametrize("shape", [(40, 40), (30, 50), (50, 30)])
def test_rank_deficient_and_rectangular_float64(shape):
    g = torch.Generator().manual_seed(1)
    m, n = shape
    A = torch.randn(m, 7, generator=g, dtype=D) @ torch.randn(7, n, generator=g, dtype=D)
    # rank 7: singular values 8..m are rounding noise (~1e-16·σ_max). A cut-off of 1e-3
    # leaves a window between the kept values and the noise, so it can be certified
    Z, info = pinv(A, rcond=1e-3, tol=1e-6, return_info=True)
    assert Z.shape == (n, m)
    assert bool(info.converged) and info.rcond == 1e-3
    assert rel(Z, torch.linalg.pinv(A, rtol=1e-3)) <= info.bound <= 1e-6
    # the default cut-off (max(m, n)·ε) is within a factor 20 of the noise: no iteration
    # count separates them, so it must not claim convergence — but returns its best iterate
    with pytest.warns(UserWarning, match="failed"):
        Z, info = pinv(A, on_fail="warn", return_info=True)
    assert not bool(info.converged) and torch.isfinite(Z).all()
    assert rel(Z, torch.linalg.pinv(A)) <= 1e-10  # the best iterate (smallest step)


@pytest.mark.parametrize("order", [2, 3, 4, 7])
@pytest.mark.parametrize("init", ["razavi", "frobenius", "spectral", "auto"])
def test_every_order_and_init_converges(order, init):
    A = softmax_matrix(24, seed=3)
    Z, info = pinv(A, order=order, init=init, return_info=True)
    assert bool(info.converged) and not bool(info.diverged)
    assert rel(Z, torch.linalg.pinv(A, rtol=info.rcond)) <= info.bound <= 1e-8


def test_higher_order_needs_fewer_iterations():
    A = softmax_matrix(48, seed=4)
    its = [int(pinv(A, order=p, return_info=True)[1].iterations) for p in (2, 3, 7)]
    assert its[0] > its[1] > its[2]


@settings(max_examples=15, deadline=None)
@given(n=st.integers(1, 20), batch=st.integers(1, 3), seed=st.integers(0, 10_000))
def test_converged_flag_means_close_on_well_conditioned_matrices(n, batch, seed):
    g = torch.Generator().manual_seed(seed)
    A = torch.eye(n, dtype=D) + 0.4 * torch.randn(batch, n, n, generator=g, dtype=D) / n**0.5
    Z, info = pinv(A, return_info=True)
    assert info.converged.shape == (batch,)
    assert info.converged.all()
    assert (rel(Z, torch.linalg.pinv(A, rtol=info.rcond)) <= info.bound).all()
    assert (info.bound <= 1e-8).all()


def test_diagnostics_have_the_batch_shape():
    A = softmax_matrix(8, batch=(2, 3))
    Z, info = pinv(A, iters=4, return_info=True)
    assert Z.shape == (2, 3, 8, 8)
    for t in (info.iterations, info.residual, info.penrose, info.converged, info.diverged):
        assert t.shape == (2, 3)
    assert torch.all(info.iterations == 4)
    torch.testing.assert_close(info.penrose, penrose_residual(A, Z))


def test_float32_stagnation_is_reported_not_claimed_as_convergence():
    # cond ~1e5: float32 cannot reach 1e-7; it must stop early and say so
    A = torch.rand(256, 256, generator=torch.Generator().manual_seed(7), dtype=D)
    with pytest.warns(UserWarning, match="stagnated: 1"):
        Z, info = pinv(A.float(), tol=1e-7, max_iter=200, on_fail="warn", return_info=True)
    assert Z.dtype == torch.float32
    assert not bool(info.converged) and bool(info.stagnated)
    assert int(info.iterations) < 60  # stopped, did not loop to max_iter
    err = rel(Z, torch.linalg.pinv(A)).item()
    assert err < 1e-2  # as close as float32 allows for this conditioning
    assert err / 10 <= info.residual.item() <= err * 10  # the residual estimates the error


def test_float32_well_conditioned_converges_to_1e_5():
    A = softmax_matrix(16, std=0.5, seed=5)  # cond 3e2
    Z, info = pinv(A.float(), return_info=True)
    assert bool(info.converged)
    assert rel(Z, torch.linalg.pinv(A.float().double(), rtol=info.rcond)) <= info.bound <= 1e-5


def test_float32_sharp_bound_certifies_what_the_iterate_reaches():
    # cond 2.4e3: the float32 iterate is 6.4e-6 off; the bound from the spectrum of AZ
    # (computed in float64) shows it, so 1e-5 is certified (the bound propagated from the
    # initial scale said ~3e-5 and refused)
    A = softmax_matrix(32, std=0.5, seed=5).float()
    Z, info = pinv(A, return_info=True)
    err = rel(Z, torch.linalg.pinv(A.double(), rtol=info.rcond))
    assert bool(info.converged) and err <= info.bound <= 1e-5
    assert info.bound <= 2 * err


def test_low_precision_inputs_are_computed_in_float32_and_returned_in_their_dtype():
    A = softmax_matrix(16, std=0.5)
    for dtype in (torch.float16, torch.bfloat16):
        Z, info = pinv(A.to(dtype), return_info=True)
        assert Z.dtype == dtype and bool(info.converged)
        assert torch.isfinite(Z).all()


def test_global_init_warns_and_stalls_small_matrices_of_a_mixed_batch():
    g = torch.Generator().manual_seed(2)
    base = torch.eye(16, dtype=D) + 0.1 * torch.randn(3, 16, 16, generator=g, dtype=D) / 4
    A = base * torch.tensor([1e-3, 1.0, 1e3], dtype=D)[:, None, None]
    ref = torch.linalg.pinv(A)
    per_matrix = pinv(A, init="razavi", iters=6)
    assert (rel(per_matrix, ref) < 1e-8).all()
    with pytest.warns(UserWarning, match="global"):
        glob = pinv(A, init="global", iters=6)
    errs = rel(glob, ref)
    assert errs[0] > 0.99 and errs[1] > 0.5  # smaller scales barely moved
    assert errs[2] < 1e-8  # the matrix that set the global scale is fine


def test_divergence_is_detected_and_follows_on_fail():
    # float32, numerically rank-deficient: after converging, the iteration starts to
    # invert rounding noise and eventually blows up; fixed 60 iterations hit that
    g = torch.Generator().manual_seed(0)
    A = (torch.randn(32, 6, generator=g, dtype=D) @ torch.randn(6, 32, generator=g, dtype=D)).float()
    with pytest.raises(PinvError, match=r"1 of 1 matrices failed \(diverged: 1") as caught:
        pinv(A, iters=60)
    assert bool(caught.value.info.diverged)
    at = int(caught.value.info.extra["diverged_at"])
    assert 0 < at < 60
    with pytest.warns(UserWarning, match="diverged: 1"):
        Z, info = pinv(A, iters=60, on_fail="warn", return_info=True)
    assert torch.isfinite(Z).all() and int(info.iterations) == at - 1
    Z, info = pinv(A, iters=60, on_fail="exact", return_info=True)
    assert bool(info.fallback) and torch.isfinite(Z).all()
    assert rel(Z, torch.linalg.pinv(A.double(), rtol=info.rcond)) < 1e-6


def test_exact_fallback_only_replaces_failed_matrices():
    good = softmax_matrix(16, std=0.5, seed=1)
    bad = torch.rand(256, 256, generator=torch.Generator().manual_seed(7), dtype=D)
    small_bad = bad[:16, :16] @ torch.diag(torch.logspace(0, -9, 16, dtype=D))
    A = torch.stack([good, small_bad]).float()
    Z, info = pinv(A, tol=1e-5, on_fail="exact", return_info=True)
    assert info.fallback.tolist() == [False, True]
    assert info.converged.all()  # the replaced one counts as converged (exact)
    ref = torch.linalg.pinv(A[1].double(), rtol=info.rcond)
    assert rel(Z[1], ref) < 1e-6  # the float64 pinv with the same cut-off
    assert rel(Z[0], torch.linalg.pinv(A[0].double(), rtol=info.rcond)) <= info.bound[0] <= 1e-5


def test_zero_matrix_has_zero_pseudoinverse():
    Z, info = pinv(torch.zeros(2, 3, 3), return_info=True)
    assert torch.equal(Z, torch.zeros(2, 3, 3)) and info.converged.all()


def test_iterates_match_fixed_iteration_counts():
    A = softmax_matrix(10)
    it = pinv_iterates(A)
    for k in range(5):
        torch.testing.assert_close(next(it), pinv(A, iters=k))


def test_bad_arguments_raise_value_errors_naming_them():
    A = torch.rand(4, 4)
    for kwargs, name in [
        ({"order": 1}, "order"), ({"init": "bogus"}, "init"), ({"backward": "x"}, "backward"),
        ({"on_fail": "ignore"}, "on_fail"), ({"iters": -1}, "iters"), ({"tol": 0.0}, "tol"),
        ({"max_iter": 0}, "max_iter"),
    ]:
        with pytest.raises(ValueError, match=name):
            pinv(A, **kwargs)
    with pytest.raises(ValueError, match="non-finite"):
        pinv(torch.tensor([[1.0, float("nan")], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="floating"):
        pinv(torch.ones(3, 3, dtype=torch.long))


def well_conditioned(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(*shape, generator=g, dtype=D) * 0.3
    m, n = shape[-2:]
    A[..., range(min(m, n)), range(min(m, n))] += 2.0
    return A.requires_grad_()


def test_gradcheck_unrolled_fixed_iterations_and_to_tolerance():
    A = well_conditioned((2, 5, 5))
    assert torch.autograd.gradcheck(lambda a: pinv(a, iters=5), (A,))
    assert torch.autograd.gradcheck(lambda a: pinv(a, rcond=1e-2), (A,))


@pytest.mark.parametrize("shape", [(2, 5, 5), (3, 6), (6, 3)])
def test_gradcheck_implicit_backward(shape):
    A = well_conditioned(shape, seed=1)
    assert torch.autograd.gradcheck(lambda a: pinv(a, rcond=1e-2, backward="implicit"), (A,))


def test_implicit_gradient_equals_gradient_of_torch_pinv():
    A = well_conditioned((4, 7), seed=2)
    G = torch.randn(7, 4, dtype=D)
    (g1,) = torch.autograd.grad((pinv(A, backward="implicit") * G).sum(), A)
    (g2,) = torch.autograd.grad((torch.linalg.pinv(A) * G).sum(), A)
    torch.testing.assert_close(g1, g2, atol=1e-9, rtol=1e-7)


def graph_size(t):
    seen, stack = set(), [t.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        stack += [n for n, _ in node.next_functions]
    return len(seen)


def test_implicit_graph_does_not_grow_with_iterations_unlike_unroll():
    A = well_conditioned((5, 5), seed=3)
    B = (A.detach() * torch.logspace(0, -4, 5, dtype=D)).requires_grad_()  # cond ~1e4
    runs = [pinv(X, backward="implicit", return_info=True) for X in (A, B)]
    assert runs[1][1].iterations > runs[0][1].iterations + 5
    assert graph_size(runs[0][0]) == graph_size(runs[1][0])
    unrolled = [graph_size(pinv(A, iters=k)) for k in (3, 30)]
    assert unrolled[1] > unrolled[0] + 100


def test_implicit_backward_with_fixed_iterations_is_refused():
    A = well_conditioned((5, 5), seed=3)
    with pytest.raises(ValueError, match=r"backward='implicit' is not allowed with iters=6"):
        pinv(A, iters=6, backward="implicit")


def _with_and_without_the_unguarded_run(monkeypatch, A, **kw):
    """pinv(A) and its gradient as computed, and with the unguarded fixed-count run off."""
    import importlib

    P = importlib.import_module("formerlab.linalg.pinv.iteration")  # where _iterate looks it up

    def solve():
        a = A.clone().requires_grad_()
        Z, info = pinv(a, return_info=True, **kw)
        (g,) = torch.autograd.grad(Z.square().sum(), a)
        return Z.detach(), info, g

    fast = solve()
    with monkeypatch.context() as patch:
        patch.setattr(P, "_unguarded", lambda *args: None)
        guarded = solve()
    return fast, guarded


@pytest.mark.parametrize("dtype", [torch.float32, D])
def test_fixed_count_unguarded_run_equals_the_guarded_loop(monkeypatch, dtype):
    g = torch.Generator().manual_seed(3)
    A = torch.randn(3, 4, 16, 16, generator=g, dtype=D).mul(3).softmax(-1).to(dtype)
    (Z, info, grad), (Z_ref, info_ref, grad_ref) = _with_and_without_the_unguarded_run(
        monkeypatch, A, iters=6)
    torch.testing.assert_close(Z, Z_ref, rtol=0, atol=0)
    torch.testing.assert_close(grad, grad_ref, rtol=0, atol=0)
    for name in ("iterations", "residual", "bound", "converged", "diverged"):
        assert torch.equal(getattr(info, name), getattr(info_ref, name)), name


def test_fixed_count_run_with_a_diverging_matrix_falls_back_to_the_guarded_loop(monkeypatch):
    # batch: a matrix that blows up in 60 float32 steps (see the divergence test) and a
    # benign one; the guarded loop stops the first at its last good iterate
    g = torch.Generator().manual_seed(0)
    bad = (torch.randn(32, 6, generator=g, dtype=D) @ torch.randn(6, 32, generator=g, dtype=D))
    good = torch.randn(32, 32, generator=g, dtype=D) + 8 * torch.eye(32, dtype=D)
    A = torch.stack([bad, good]).float()
    with pytest.warns(UserWarning, match="diverged: 1"):
        (Z, info, grad), (Z_ref, info_ref, grad_ref) = _with_and_without_the_unguarded_run(
            monkeypatch, A, iters=60, on_fail="warn")
    assert bool(info.diverged[0]) and not bool(info.diverged[1])
    assert torch.equal(Z, Z_ref) and torch.equal(grad, grad_ref)
    assert torch.equal(info.iterations, info_ref.iterations)
    assert int(info.iterations[1]) == 60 and torch.isfinite(grad).all()


def test_fixed_count_run_that_grows_past_the_limit_but_stays_finite_is_caught(monkeypatch):
    # a spectral init fooled by the power iteration (α·σ_max² ≈ 3.7 > 2): Newton–Schulz
    # grows, still finite after 3 steps; only the ‖AZ‖_F <= 2√m test can stop it
    from formerlab.linalg.pinv import power_start

    n = 6
    v0 = power_start(n, D)
    basis = torch.linalg.qr(torch.cat([v0[:, None], torch.randn(n, n - 1, dtype=D)], 1))[0]
    U = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(1), dtype=D))[0]
    A = U @ torch.diag(torch.tensor([1.0, 0.5, 0.4, 0.3, 0.2, 0.1], dtype=D)) @ basis[:, [1, 0, 2, 3, 4, 5]].mT
    with pytest.warns(UserWarning, match="diverged: 1"):
        (Z, info, grad), (Z_ref, info_ref, grad_ref) = _with_and_without_the_unguarded_run(
            monkeypatch, A, init="spectral", order=2, iters=3, on_fail="warn")
    assert bool(info.diverged) and int(info.iterations) < 3
    assert torch.equal(Z, Z_ref) and torch.equal(grad, grad_ref)


# ------------------------------------------------------------------ deferred certificate


def _pending(info) -> bool:
    return info._certificate is not None


def test_fixed_count_certificate_is_computed_on_first_read_and_is_honest():
    # iters only: nothing is decided by the certificate, so it waits until it is read
    A = torch.stack([softmax_matrix(12, std=0.3, seed=1), softmax_matrix(12, std=2.0, seed=2)])
    Z, info = pinv(A, iters=30, return_info=True)
    assert _pending(info)
    ref = torch.linalg.pinv(A, rtol=info.rcond)
    assert bool(info.converged[0]) and not _pending(info)
    assert (rel(Z, ref)[info.converged] <= info.bound[info.converged]).all()
    torch.testing.assert_close(info.penrose, penrose_residual(A, Z))
    # 6 iterations of the ill-conditioned one: far off, and not called converged
    Z6, info6 = pinv(A, iters=6, return_info=True)
    assert rel(Z6, ref)[1] > 1e-3 and not bool(info6.converged[1])


def test_deferred_certificate_is_that_of_the_call_not_of_later_changes_to_the_input():
    A = softmax_matrix(10, std=0.5, batch=(3,), seed=4)
    before = A.clone()
    Z, info = pinv(A, iters=8, return_info=True)
    A.mul_(1e-3).add_(torch.eye(10, dtype=D))  # the caller reuses its buffer
    _, fresh = pinv(before, iters=8, return_info=True)
    for name in ("bound", "reach", "converged", "penrose"):
        assert torch.equal(getattr(info, name), getattr(fresh, name)), name


def test_pending_certificate_does_not_keep_the_autograd_graph_alive():
    import gc
    import weakref

    class Box:  # holds a detached tensor: a saved output itself would form a cycle
        def __init__(self, t):
            self.t = t.detach()

    boxes = []

    def pack(t):
        box = Box(t)
        boxes.append(weakref.ref(box))
        return box

    x = softmax_matrix(8, batch=(4,), seed=2).requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda box: box.t):
        Z, info = pinv(x * 2.0, iters=6, return_info=True)
    assert info._certificate is not None and boxes
    del Z
    gc.collect()
    assert all(ref() is None for ref in boxes)  # the graph went with Z, info holds none of it
    _, fresh = pinv(x.detach() * 2.0, iters=6, return_info=True)
    assert torch.equal(info.bound, fresh.bound)


def test_deferred_certificate_survives_reshape_and_is_not_differentiable():
    W = softmax_matrix(8, batch=(2, 3), seed=6).requires_grad_()
    Z, info = pinv(W * 1.0, iters=5, return_info=True)
    flat = info.reshape((6,))
    assert _pending(flat)
    assert flat.bound.shape == (6,) and info.bound.shape == (2, 3)
    assert torch.equal(flat.bound, info.bound.reshape(6))
    assert not any(t.requires_grad for t in (flat.penrose, flat.bound))
    summary = pinv(W.detach(), iters=5, return_info=True)[1].summary()
    assert summary["pinv_bound_max"] == info.bound.max().item()


def test_failure_handling_settles_the_certificate_first():
    # on_fail="exact" edits converged and bound of the failed matrices: they must be
    # the settled values, and the replaced matrix is exact (bound 0, converged)
    g = torch.Generator().manual_seed(0)
    bad = torch.randn(32, 6, generator=g, dtype=D) @ torch.randn(6, 32, generator=g, dtype=D)
    A = torch.stack([bad, torch.eye(32, dtype=D) * 2]).float()
    Z, info = pinv(A, iters=60, on_fail="exact", return_info=True)
    assert bool(info.fallback[0]) and bool(info.converged[0]) and info.bound[0] == 0
    assert bool(info.converged[1])
    torch.testing.assert_close(Z[1], torch.eye(32) / 2)


def test_pending_info_pickles_with_its_certificate():
    import pickle

    A = softmax_matrix(6, batch=(2,), seed=3)
    _, info = pinv(A, iters=6, return_info=True)
    _, fresh = pinv(A, iters=6, return_info=True)
    back = pickle.loads(pickle.dumps(info))
    assert torch.equal(back.bound, fresh.bound) and torch.equal(back.converged, fresh.converged)


def test_pinv_warnings_point_at_the_caller():
    """The autocast guard around pinv adds a frame; the warnings still name this file."""
    import warnings

    a = torch.randn(8, 8, generator=torch.Generator().manual_seed(0))
    a[:, 0] = 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pinv(a, init="global", on_fail="warn", max_iter=3)
    assert len(caught) == 2
    assert all(w.filename == __file__ for w in caught), [w.filename for w in caught]
