"""Autograd of :func:`~formerlab.linalg.pinv.pinv` with ``backward="implicit"``: a custom
:class:`torch.autograd.Function` that is the identity on Z = A⁺ forward and differentiates
A⁺ analytically backward.

Backward. ``"unroll"`` differentiates through the iterations; ``"implicit"`` (only when
iterating to tolerance) runs them without autograd and uses the derivative of the
pseudoinverse at the result (Golub & Pereyra 1973, Thm. 4.3): dA⁺ = −A⁺dA A⁺ +
A⁺A⁺ᵀdAᵀ(I − AA⁺) + (I − A⁺A)dAᵀA⁺ᵀA⁺, memory independent of the iteration count (exact for
a locally constant rank with the dropped singular values 0). With a fixed ``iters`` the
returned Z is a truncated iterate, not A⁺, and this formula would be the derivative of a
different function, so that combination raises a ``ValueError``.
"""

from __future__ import annotations

import torch
from torch import Tensor


class _ImplicitPinv(torch.autograd.Function):
    """Identity on Z = A⁺ forward; backward by the analytic derivative of A⁺."""

    @staticmethod
    def forward(ctx, A: Tensor, Z: Tensor) -> Tensor:
        ctx.save_for_backward(A, Z)
        return Z.clone()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, G: Tensor) -> tuple[Tensor, None]:
        A, Z = ctx.saved_tensors
        Zt = Z.mT
        eye_m = torch.eye(A.shape[-2], dtype=A.dtype, device=A.device)
        eye_n = torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)
        # adjoint of dA ↦ −Z dA Z + Z Zᵀ dAᵀ (I − AZ) + (I − ZA) dAᵀ Zᵀ Z (Golub & Pereyra)
        grad = -Zt @ G @ Zt
        grad = grad + (eye_m - A @ Z) @ G.mT @ (Z @ Zt)
        grad = grad + (Zt @ Z) @ G.mT @ (eye_n - Z @ A)
        return grad, None
