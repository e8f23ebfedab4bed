"""Regularised pseudoinverses (:func:`pinv_reg`): Tikhonov, solved directly or as the
iterative pseudoinverse of the stacked matrix [A; √λ'·I], and truncated SVD."""

from __future__ import annotations

import torch
from torch import Tensor

from formerlab.errors import check_choice, check_positive_float
from formerlab.linalg.numerics import compute_dtype
from formerlab.linalg.pinv.iteration import pinv
from formerlab.linalg.pinv.options import check_matrix, in_given_dtypes

REG_METHODS = ("tikhonov", "tsvd")


@in_given_dtypes
def pinv_reg(
    A: Tensor,
    *,
    method: str = "tikhonov",
    lam: float = 1e-3,
    rcond: float = 1e-3,
    solver: str = "direct",
    **pinv_options,
) -> Tensor:
    """Regularised pseudoinverse of every matrix of a (..., m, n) batch.

    * ``method="tikhonov"``: (AᵀA + λ'I)⁻¹Aᵀ with λ' = ``lam``·‖A‖₂² (so ``lam`` is relative
      to the largest squared singular value and the result is scale invariant). Each
      singular value σ is inverted as σ/(σ² + λ'): large ones ≈ 1/σ, those below √λ'
      damped to ≈ σ/λ' instead of amplified (Tikhonov regularisation; e.g. Hansen,
      *Rank-Deficient and Discrete Ill-Posed Problems*, 1998, §5.1). ``solver="direct"``
      solves the (smaller) Gram system; ``"iterative"`` applies :func:`pinv` to the
      stacked matrix [A; √λ'·I], whose pseudoinverse's first m columns are the same
      thing and whose condition number is at most √(1 + 1/lam) — so it converges fast.
    * ``method="tsvd"``: truncated SVD — singular values below ``rcond``·σ_max are
      dropped (``torch.linalg.pinv(A, rtol=rcond)``); direct only.

    ``lam`` / ``rcond`` may be floats or tensors with the batch shape of A (one value per
    matrix). Computed in float32 (float64 for float64 input); returns A's dtype. λ' is
    treated as a constant for gradients.
    """
    check_matrix(A)
    check_choice("method", method, REG_METHODS)
    check_choice("solver", solver, ("direct", "iterative"))
    work = compute_dtype(A.dtype)
    a = A.to(work)
    if method == "tsvd":
        rcond_t = _reg_param("rcond", rcond, a)
        if solver != "direct":
            raise ValueError("solver='iterative' is not available for method='tsvd'; use 'direct'")
        return torch.linalg.pinv(a, rtol=rcond_t).to(A.dtype)
    lam_t = _reg_param("lam", lam, a)
    m, n = a.shape[-2:]
    with torch.no_grad():
        sigma2 = torch.linalg.matrix_norm(a.detach(), ord=2).square()
        lam_abs = (lam_t * sigma2)[..., None, None]
    if solver == "iterative":
        eye = torch.eye(n, dtype=work, device=a.device).expand(*a.shape[:-2], n, n)
        Z = pinv(torch.cat([a, lam_abs.sqrt() * eye], dim=-2), **pinv_options)
        return Z[..., :m].to(A.dtype)
    if m >= n:  # (AᵀA + λ'I)⁻¹Aᵀ, an n×n system
        gram = a.mT @ a + lam_abs * torch.eye(n, dtype=work, device=a.device)
        return torch.linalg.solve(gram, a.mT).to(A.dtype)
    gram = a @ a.mT + lam_abs * torch.eye(m, dtype=work, device=a.device)  # Aᵀ(AAᵀ + λ'I)⁻¹
    return torch.linalg.solve(gram, a).mT.to(A.dtype)


def _reg_param(arg: str, value: float | Tensor, a: Tensor) -> float | Tensor:
    """A positive float, or a positive tensor with the batch shape of ``a`` (per matrix)."""
    if isinstance(value, Tensor):
        if value.shape != a.shape[:-2] or not bool((value > 0).all() & torch.isfinite(value).all()):
            raise ValueError(
                f"{arg} as a tensor must be positive and finite with the batch shape "
                f"{tuple(a.shape[:-2])}; got shape {tuple(value.shape)}"
            )
        return value.to(a.dtype)
    return check_positive_float(arg, value)
