"""Property tests of the pinv certificate on hard inputs (prescribed singular values).

converged ⇒ ‖Z − A⁺_rcond‖_F/‖A⁺_rcond‖_F <= info.bound (<= tol), against float64
``torch.linalg.pinv`` of the matrix actually passed (after the cast to its dtype) with the
same cut-off; not converged ⇒ a finite best iterate. Plus reproductions of earlier certificate failures.
"""

import math
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from formerlab.linalg.pinv import PinvError, pinv, power_start

D = torch.float64
DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
# decimal exponents of the scale each dtype can hold with room for cond 1e12 matrices
SCALE_EXP = {torch.float16: (-3, 3), torch.bfloat16: (-30, 30), torch.float32: (-30, 30),
             torch.float64: (-30, 30)}


def rel(a, b):
    return ((a.double() - b).flatten(-2).norm(dim=-1) / b.flatten(-2).norm(dim=-1)).item()


def orthogonal(n, gen):
    q, r = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=D))
    return q * torch.sign(torch.diagonal(r))


def prescribed(m, n, singular_values, scale, seed):
    """U·diag(s)·Vᵀ·scale with Haar-random U, V (float64)."""
    gen = torch.Generator().manual_seed(seed)
    k = min(m, n)
    s = torch.zeros(k, dtype=D)
    s[: len(singular_values)] = torch.tensor(singular_values, dtype=D)
    return (orthogonal(m, gen)[:, :k] * s) @ orthogonal(n, gen)[:, :k].mT * scale


@st.composite
def matrices(draw):
    dtype = draw(st.sampled_from(DTYPES))
    m, n = draw(st.integers(1, 10)), draw(st.integers(1, 10))
    rank = draw(st.integers(1, min(m, n)))
    log_cond = draw(st.floats(0, 12))
    # the largest singular value is 1, the smallest 10^-log_cond, the rest in between
    inner = draw(st.lists(st.floats(0, 1), min_size=max(rank - 2, 0), max_size=max(rank - 2, 0)))
    exps = sorted([0.0] + ([log_cond] if rank > 1 else []) + [log_cond * t for t in inner])
    lo, hi = SCALE_EXP[dtype]
    scale = 10.0 ** draw(st.floats(lo, hi))
    seed = draw(st.integers(0, 2**20))
    A = prescribed(m, n, [10.0 ** -e for e in exps], scale, seed).to(dtype)
    return A, dtype


@pytest.mark.filterwarnings("ignore:pinv")
@settings(max_examples=60, deadline=None)
@given(case=matrices(), order=st.sampled_from([2, 3, 5]))
def test_converged_means_within_the_bound_of_the_cut_off_pinv(case, order):
    A, dtype = case
    Z, info = pinv(A, order=order, on_fail="warn", return_info=True)
    assert Z.dtype == dtype and Z.shape == A.shape[::-1]
    assert torch.isfinite(Z).all()  # converged or not: never inf or NaN
    if bool(info.converged):
        ref = torch.linalg.pinv(A.double(), rtol=info.rcond)
        if ref.norm() == 0:
            assert Z.abs().max() == 0
        else:
            assert rel(Z, ref) <= info.bound.item() <= info.tol
    else:
        assert info.bound.item() > info.tol or bool(info.unrepresentable)


@pytest.mark.filterwarnings("ignore:pinv")
@settings(max_examples=25, deadline=None)
@given(case=matrices(), rcond=st.sampled_from([1e-6, 1e-3, 1e-1]))
def test_the_bound_holds_for_any_cut_off(case, rcond):
    A, _ = case
    Z, info = pinv(A, rcond=rcond, on_fail="warn", return_info=True)
    assert torch.isfinite(Z).all()
    if bool(info.converged):
        ref = torch.linalg.pinv(A.double(), rtol=rcond)
        assert ref.norm() == 0 or rel(Z, ref) <= info.bound.item()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scale", [1e-30, 1.0, 1e30])
def test_well_separated_spectra_converge_at_every_scale_and_dtype(dtype, scale):
    lo, hi = SCALE_EXP[dtype]
    scale = min(max(scale, 10.0**lo), 10.0**hi)
    # singular values 1 … 0.1 (and, in float32/64, an exact zero: the cast to a half
    # dtype would make it a noise value ~1e-3, too close to any usable cut-off)
    half = dtype in (torch.float16, torch.bfloat16)
    spectrum = [1.0, 0.7, 0.5, 0.3, 0.2] if half else [1.0, 0.7, 0.3, 0.1]
    A = prescribed(7, 5, spectrum, scale, seed=3).to(dtype)
    # float32: the rounding allowance for a rank-deficient rectangular A is ~4e-5
    Z, info = pinv(A, rcond=1e-2, tol=1e-4 if dtype == torch.float32 else None, return_info=True)
    assert bool(info.converged)
    assert rel(Z, torch.linalg.pinv(A.double(), rtol=1e-2)) <= info.bound.item() <= info.tol


# ------------------------------------------------------ earlier certificate failures


def test_repro_unreached_small_singular_value_is_not_called_converged():
    # σ = 1e-9 is kept by the cut-off; it is reached only after ~40 iterations, when
    # the relative step was already tiny at iteration 7
    A = prescribed(6, 6, [1, 0.9, 0.8, 0.5, 0.3, 1e-9], 1.0, seed=0)
    ref = torch.linalg.pinv(A)
    for k in range(1, 60):
        Z, info = pinv(A, iters=k, tol=1e-6, return_info=True)
        if bool(info.converged):
            assert rel(Z, ref) <= info.bound.item() <= 1e-6
    # κ = 1e9: the rounding allowance (~u·κ) is above 1e-6, so certify 1e-5
    Z, info = pinv(A, tol=1e-5, return_info=True)
    assert bool(info.converged) and int(info.iterations) > 30  # σ = 1e-9 takes ~35
    assert rel(Z, ref) <= info.bound.item() <= 1e-5
    # the step of iteration 7 is small, yet the iterate is 100 % off: never converged
    Z7, info7 = pinv(A, iters=7, tol=1e-6, return_info=True)
    assert rel(Z7, ref) > 0.99 and not bool(info7.converged)


@pytest.mark.parametrize("scale", [1e20, 1e-25])
def test_repro_extreme_scales_float32(scale):
    A = (torch.rand(8, 8, generator=torch.Generator().manual_seed(0)) + torch.eye(8)) * scale
    Z, info = pinv(A, return_info=True)
    ref = torch.linalg.pinv(A.double(), rtol=info.rcond)
    assert bool(info.converged) and Z.abs().max() > 0
    assert rel(Z, ref) <= info.bound.item() <= 1e-5


def test_repro_float64_1e160_frobenius_init():
    A = (torch.rand(8, 8, generator=torch.Generator().manual_seed(0), dtype=D) + torch.eye(8)) * 1e160
    Z, info = pinv(A, init="frobenius", return_info=True)
    assert bool(info.converged)
    assert rel(Z, torch.linalg.pinv(A, rtol=info.rcond)) <= info.bound.item() <= 1e-8


def test_repro_half_overflow_is_reported_never_inf_with_success():
    A = torch.eye(4).half() * 1e-5  # A⁺ = 1e5·I > float16's max 65504
    with pytest.raises(PinvError, match="overflow in the output dtype: 1"):
        pinv(A)
    with pytest.warns(UserWarning, match="overflow"):
        Z, info = pinv(A, on_fail="warn", return_info=True)
    assert not bool(info.converged) and bool(info.unrepresentable)
    assert torch.isfinite(Z).all() and math.isinf(info.bound.item())
    Z, info = pinv(A, on_fail="exact", return_info=True)  # the exact one overflows too
    assert not bool(info.converged) and torch.isfinite(Z).all()
    Z, info = pinv(torch.eye(4).half() * 1e-4, return_info=True)  # 1e4 fits
    assert bool(info.converged) and rel(Z, torch.eye(4, dtype=D) * 1e4) < 1e-3


def test_power_of_two_scaling_is_exact():
    A = torch.rand(5, 6, generator=torch.Generator().manual_seed(4), dtype=D)
    Z1 = pinv(A, iters=9)
    for e in (-900, -300, 300, 900):
        Z2 = pinv(A * 2.0**e, iters=9)
        assert torch.equal(Z2 * 2.0**e, Z1)  # bit for bit: only exponents change


@pytest.mark.parametrize("order", [2, 3])
def test_a_half_inverted_value_just_below_the_cut_off_is_never_certified(order):
    # σ = 0.9–0.99 × the cut-off is dropped by the target but grows like the kept ones;
    # while it is half inverted the iterate is far from A⁺_rcond, so whatever tolerance
    # is asked, a converged claim must come with a bound that covers the error
    for ratio in (0.9, 0.95, 0.99):
        A = prescribed(4, 4, [1.0, 0.3, 0.1, 0.01 * ratio], 1.0, seed=5)
        ref = torch.linalg.pinv(A, rtol=0.01)
        for k in range(1, 40):
            Z, info = pinv(A, iters=k, tol=100.0, rcond=0.01, return_info=True)
            if bool(info.converged):
                assert rel(Z, ref) <= info.bound.item()


@pytest.mark.parametrize("shape,spectrum", [
    ((2, 8), [1.0, 1e-3]), ((3, 9), [1.0, 0.1, 1e-3]), ((6, 6), [1.0, 0.3, 1e-2, 1e-3]),
    ((8, 2), [1.0, 3e-4]),
])
def test_float32_rounding_in_null_directions_is_covered_by_the_bound(shape, spectrum):
    # rectangular or rank-deficient: rounding puts components of Z into directions
    # Z − ZAZ does not see (null space of A), amplified ~κ while the small values grow
    for seed in range(6):
        A = prescribed(*shape, spectrum, 1.0, seed=seed).float()
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            Z, info = pinv(A, tol=1e-3, on_fail="warn", return_info=True)
        # on_fail="warn": a warning exactly when the matrix is not certified
        assert bool(seen) == (not bool(info.converged)), [str(w.message) for w in seen]
        if bool(info.converged):
            ref = torch.linalg.pinv(A.double(), rtol=info.rcond)
            assert rel(Z, ref) <= info.bound.item()


def test_spectral_init_fooled_by_the_power_iteration_diverges_at_once_and_says_so():
    # the top right singular vector is orthogonal to the power iteration's fixed start
    # vector: σ̂ = 0.5 instead of 1, α·σ_max² ≈ 3.7 > 2, Newton–Schulz must diverge; the
    # ‖AZ‖_F > 2√m test catches it at the first iteration, long before inf/NaN
    n = 6
    v0 = power_start(n, D)
    basis = torch.linalg.qr(torch.cat([v0[:, None], torch.randn(n, n - 1, dtype=D)], 1))[0]
    V = basis[:, [1, 0, 2, 3, 4, 5]]  # σ_max on a direction ⟂ v0
    A = orthogonal(n, torch.Generator().manual_seed(1)) @ torch.diag(
        torch.tensor([1.0, 0.5, 0.4, 0.3, 0.2, 0.1], dtype=D)) @ V.mT
    with pytest.warns(UserWarning, match="diverged: 1"):
        Z, info = pinv(A, init="spectral", order=2, on_fail="warn", return_info=True)
    assert bool(info.diverged) and not bool(info.converged)
    assert int(info.extra["diverged_at"]) <= 2 and torch.isfinite(Z).all()


def test_a_stagnated_iteration_that_never_got_going_returns_its_last_iterate():
    # singular values running continuously through the cut-off: the step stays large
    # (values keep being inverted) until stagnation stops it; the iterate with the
    # smallest step is then the first one, which says nothing — return the last
    A = prescribed(16, 16, [1.0] + torch.logspace(-1.5, -3, 15).tolist(), 1.0, seed=2)
    with pytest.warns(UserWarning, match="stagnated: 1"):
        Z, info = pinv(A, rcond=1e-2, tol=1e-6, on_fail="warn", return_info=True)
    assert not bool(info.converged) and info.residual.item() > 1e-2
    assert int(info.iterations) > int(info.reach)  # not the first iterate


@settings(max_examples=20, deadline=None)
@given(m=st.integers(1, 12), n=st.integers(1, 12), seed=st.integers(0, 2**20),
       log_cond=st.floats(0, 8))
def test_spectral_norm_bounds_bracket_sigma_max_tightly(m, n, seed, log_cond):
    from formerlab.linalg.pinv import spectral_norm_estimate, spectral_norm_upper

    k = min(m, n)
    s = torch.logspace(0, -log_cond, k, dtype=D).tolist()
    A = prescribed(m, n, s, 3.0, seed)[None]
    lo, hi = spectral_norm_estimate(A).item(), spectral_norm_upper(A).item()
    assert lo <= 3.0 * (1 + 1e-12) and 3.0 <= hi <= 3.0 * k ** (1 / 16) * (1 + 1e-9)
