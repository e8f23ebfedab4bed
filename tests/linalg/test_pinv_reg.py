"""Regularised pseudoinverses against their SVD definitions."""

import pytest
import torch

from formerlab.linalg.pinv import pinv_reg

D = torch.float64


def tikhonov_svd(A, lam):
    U, S, Vh = torch.linalg.svd(A, full_matrices=False)
    lam_abs = lam * S[..., :1] ** 2
    return Vh.mT @ torch.diag_embed(S / (S**2 + lam_abs)) @ U.mT


@pytest.mark.parametrize("shape", [(3, 12, 12), (10, 6), (6, 10)])
@pytest.mark.parametrize("solver", ["direct", "iterative"])
def test_tikhonov_matches_svd_filter_factors(shape, solver):
    A = torch.rand(*shape, generator=torch.Generator().manual_seed(0), dtype=D)
    Z = pinv_reg(A, method="tikhonov", lam=1e-3, solver=solver)
    torch.testing.assert_close(Z, tikhonov_svd(A, 1e-3), rtol=1e-7, atol=1e-9)


def test_tikhonov_is_scale_invariant_and_tends_to_pinv():
    A = torch.rand(8, 8, generator=torch.Generator().manual_seed(1), dtype=D) + torch.eye(8, dtype=D)
    torch.testing.assert_close(pinv_reg(1e4 * A, lam=1e-3), pinv_reg(A, lam=1e-3) / 1e4)
    torch.testing.assert_close(pinv_reg(A, lam=1e-14), torch.linalg.pinv(A), rtol=1e-8, atol=1e-8)


def test_tikhonov_damps_what_the_exact_inverse_amplifies():
    U, _ = torch.linalg.qr(torch.randn(6, 6, dtype=D))
    S = torch.tensor([1.0, 0.5, 0.1, 1e-4, 1e-6, 1e-8], dtype=D)
    A = U @ torch.diag(S) @ U.mT
    assert torch.linalg.matrix_norm(pinv_reg(A, lam=1e-4), ord=2) <= 50.1  # 1/(2√λ)
    assert torch.linalg.matrix_norm(torch.linalg.pinv(A), ord=2) > 1e7


def tsvd(A, rcond):
    """V·diag(1/σ for σ >= rcond·σ_max, else 0)·Uᵀ from an SVD truncated here."""
    U, S, Vh = torch.linalg.svd(A, full_matrices=False)
    keep = S >= rcond * S[..., :1]
    inv = torch.where(keep, 1.0 / S.clamp(min=1e-300), torch.zeros_like(S))
    return Vh.mT @ torch.diag_embed(inv) @ U.mT


@pytest.mark.parametrize("shape", [(4, 9, 9), (7, 4), (4, 7)])
def test_tsvd_matches_a_hand_truncated_svd(shape):
    # singular values 1, 0.1, …, 1e-k: rcond = 3e-3 keeps exactly those >= 1e-2
    g = torch.Generator().manual_seed(2)
    m, n = shape[-2:]
    k = min(m, n)
    U, _ = torch.linalg.qr(torch.randn(*shape[:-2], m, k, generator=g, dtype=D))
    V, _ = torch.linalg.qr(torch.randn(*shape[:-2], n, k, generator=g, dtype=D))
    S = 10.0 ** -torch.arange(k, dtype=D)
    A = U @ torch.diag_embed(S) @ V.mT
    Z = pinv_reg(A, method="tsvd", rcond=3e-3)
    torch.testing.assert_close(Z, tsvd(A, 3e-3), rtol=1e-9, atol=1e-9)
    assert torch.linalg.matrix_norm(Z, ord=2).max() <= 100 * (1 + 1e-9)  # 1/σ of the kept
    # per-matrix rcond: a tensor with the batch shape
    if len(shape) == 3:
        rc = torch.tensor([0.5, 3e-2, 3e-3, 3e-9], dtype=D)
        Z = pinv_reg(A, method="tsvd", rcond=rc)
        for b in range(4):  # b = 3 keeps σ = 1e-8: compare relative to its norm 1e8
            ref = tsvd(A[b], rc[b].item())
            assert (Z[b] - ref).norm() <= 1e-7 * ref.norm()


def test_tikhonov_per_matrix_parameters():
    A = torch.rand(4, 9, 9, generator=torch.Generator().manual_seed(2), dtype=D)
    lam = torch.tensor([1e-6, 1e-4, 1e-2, 1.0], dtype=D)
    Z = pinv_reg(A, lam=lam)
    for b in range(4):
        torch.testing.assert_close(Z[b], tikhonov_svd(A[b], lam[b].item()))


def test_low_precision_input_returns_its_dtype():
    A = torch.rand(6, 6, dtype=torch.bfloat16) + torch.eye(6, dtype=torch.bfloat16)
    assert pinv_reg(A).dtype == torch.bfloat16


def test_bad_arguments():
    A = torch.rand(4, 4)
    with pytest.raises(ValueError, match="method"):
        pinv_reg(A, method="ridge")
    with pytest.raises(ValueError, match="lam"):
        pinv_reg(A, lam=0.0)
    with pytest.raises(ValueError, match="lam"):
        pinv_reg(A, lam=torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="solver='iterative' is not available"):
        pinv_reg(A, method="tsvd", solver="iterative")
