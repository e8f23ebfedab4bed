"""The sharp certificate of square matrices (bound from the spectrum of AZ) and empty inputs.

Ground truth is float64 ``torch.linalg.pinv`` of the matrix actually passed (after the cast
to its dtype) with the same cut-off. The bound must never be below the error against it
(whenever it is finite, converged or not), and must be within 100× of it: in float64 over
condition numbers 1 … 1e8, in float32 over 1 … 1e4 (the same fraction, about half, of the
digits of the dtype).
"""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from formerlab.linalg.pinv import pinv

D = torch.float64


def rel(Z, ref):
    diff = (Z.double() - ref).flatten(-2).norm(dim=-1)
    return diff / ref.flatten(-2).norm(dim=-1)


def orthogonal(n, gen):
    q, r = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=D))
    return q * torch.sign(torch.diagonal(r))


def spectrum(kind, n, cond):
    if kind == "logspaced":
        return torch.logspace(0, -math.log10(cond), n, dtype=D)
    s = torch.ones(n, dtype=D)
    if kind == "one-small":
        s[-1] = 1 / cond
    else:  # "two-level": half of the values 1, half 1/cond
        s[n // 2:] = 1 / cond
    return s


def square(kind, n, cond, seed, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    return (orthogonal(n, gen) * spectrum(kind, n, cond)) @ orthogonal(n, gen).mT * scale


# ---------------------------------------- torch.rand matrices the old bound could not certify


@pytest.mark.parametrize("n", [128, 256])
def test_repro_rand_float64_certifies_tol_1e_10(n):
    # cond ~2e3 … 1e4: the bound propagated from the initial scale was 1.5e-11 … 3e-10
    # (stagnated, PinvError, at 512) for an error of ~1e-14; asking 1e-10 now gets it
    A = torch.rand(1, 1, n, n, generator=torch.Generator().manual_seed(n), dtype=D)
    Z, info = pinv(A, init="razavi", tol=1e-10, max_iter=1000, return_info=True)
    err = rel(Z, torch.linalg.pinv(A, rtol=info.rcond)).item()
    assert bool(info.converged) and err <= info.bound.item() <= 1e-10


@pytest.mark.filterwarnings("ignore:pinv")
def test_repro_rand_float64_bound_at_the_limit_is_within_100x():
    A = torch.rand(128, 128, generator=torch.Generator().manual_seed(128), dtype=D)
    Z, info = pinv(A, tol=1e-16, on_fail="warn", return_info=True)  # best certified iterate
    err = rel(Z, torch.linalg.pinv(A, rtol=info.rcond)).item()
    assert err <= info.bound.item() <= 100 * err


# ------------------------------------------------------------------ ratio by condition number


@pytest.mark.filterwarnings("ignore:pinv")
@pytest.mark.parametrize("dtype,conds", [
    (torch.float64, [1.0, 1e2, 1e4, 1e6, 1e8]),
    (torch.float32, [1.0, 1e1, 1e2, 1e3, 1e4]),
])
@pytest.mark.parametrize("kind", ["logspaced", "one-small", "two-level"])
def test_bound_is_within_100x_of_the_true_error_over_condition_numbers(dtype, conds, kind):
    # per condition number a batch of 4 random 32 × 32 matrices, iterated to the limit of
    # the dtype (a tol below it: each returns its best certified iterate with its bound)
    tol = 1e-16 if dtype == D else 1e-9
    for cond in conds:
        A = torch.stack([square(kind, 32, cond, seed) for seed in range(4)]).to(dtype)
        Z, info = pinv(A, tol=tol, max_iter=200, on_fail="warn", return_info=True)
        err = rel(Z, torch.linalg.pinv(A.double(), rtol=info.rcond))
        ratio = info.bound / err
        assert (ratio >= 1).all() and (ratio <= 100).all(), (cond, ratio)


def test_a_reachable_tol_is_certified_as_soon_as_the_error_is_below_it():
    # float64, cond 1e6: the error is ~1e-11 at the limit, the bound ~2e-10; 1e-9 is
    # certified (the bound propagated from the initial scale said ~1e-8 and refused)
    A = torch.stack([square("logspaced", 32, 1e6, seed) for seed in range(3)])
    Z, info = pinv(A, tol=1e-9, return_info=True)
    err = rel(Z, torch.linalg.pinv(A, rtol=info.rcond))
    assert bool(info.converged.all()) and (err <= info.bound).all() and (info.bound <= 1e-9).all()


# ------------------------------------------------------------------ property: never below


@st.composite
def square_batches(draw):
    """A batch of square matrices of one size with their own condition number, scale,
    spectrum shape and rank (some rank-deficient: their exact zeros are dropped)."""
    dtype = draw(st.sampled_from([torch.float64, torch.float32, torch.float16]))
    n = draw(st.integers(1, 12))
    lo, hi = (-3, 3) if dtype == torch.float16 else (-30, 30)
    mats = []
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["logspaced", "one-small", "two-level"]))
        cond = 10.0 ** draw(st.floats(0, 12))
        s = spectrum(kind, n, cond)
        if draw(st.booleans()) and n > 1:  # rank-deficient
            s[draw(st.integers(1, n - 1)):] = 0
        gen = torch.Generator().manual_seed(draw(st.integers(0, 2**20)))
        scale = 10.0 ** draw(st.floats(lo, hi))
        mats.append((orthogonal(n, gen) * s) @ orthogonal(n, gen).mT * scale)
    return torch.stack(mats).to(dtype)


@pytest.mark.filterwarnings("ignore:pinv")
@settings(max_examples=50, deadline=None)
@given(A=square_batches(), order=st.sampled_from([2, 3, 7]),
       tol=st.sampled_from([None, 1e-3, 1e-8, 1e-12, 1e-16]))
def test_a_finite_bound_is_never_below_the_error_against_torch_pinv(A, order, tol):
    Z, info = pinv(A, order=order, tol=tol, on_fail="warn", return_info=True)
    assert torch.isfinite(Z).all() and Z.dtype == A.dtype
    ref = torch.linalg.pinv(A.double(), rtol=info.rcond)
    ref_norm = ref.flatten(-2).norm(dim=-1)
    err = torch.where(ref_norm > 0, rel(Z, ref), Z.double().flatten(-2).norm(dim=-1))
    finite = torch.isfinite(info.bound)
    assert (err[finite] <= info.bound[finite]).all(), (err, info.bound)
    assert (info.bound[info.converged] <= info.tol).all()


# ------------------------------------------------------------------ empty matrices


@pytest.mark.parametrize("shape", [(4, 0), (0, 4), (0, 0), (2, 0, 5), (3, 2, 6, 0), (0, 3, 3)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_empty_matrices_give_the_shape_of_torch_pinv(shape, dtype):
    A = torch.zeros(shape, dtype=dtype, requires_grad=True)
    Z, info = pinv(A, return_info=True)
    ref = torch.linalg.pinv(A.detach().float())
    assert Z.shape == ref.shape and Z.dtype == dtype and (Z == 0).all()
    assert info.converged.shape == shape[:-2] and bool(info.converged.all())
    assert bool((info.iterations == 0).all()) and bool((info.bound == 0).all())
    assert not bool(info.diverged.any()) and bool((info.penrose == 0).all())
    Z.sum().backward()
    assert A.grad.shape == A.shape
    # every mode of the call returns the same
    for options in ({"iters": 3}, {"backward": "implicit"}, {"on_fail": "exact"}):
        assert pinv(A, **options).shape == ref.shape
