"""Jacobian regularisation and Jacobian diagnostics for implicit layers.

Bai, Koltun & Kolter (2021), "Stabilizing Equilibrium Models by Jacobian Regularization",
ICML: penalising ||df/dz||_F^2 at the fixed point keeps f well-conditioned, so solvers
converge in few iterations during the whole of training. The Frobenius norm is estimated
with Hutchinson's trick (Hutchinson, 1989): for v ~ N(0, I), E ||v^T J||^2 = ||J||_F^2,
and v^T J is one vector-Jacobian product (no d x d Jacobian is formed).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from formerlab.errors import check_positive_int
from formerlab.linalg.numerics import seeded_randn


def jacobian_frobenius(
    f_out: Tensor,
    z_in: Tensor,
    samples: int = 1,
    create_graph: bool = True,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Hutchinson estimate of ||df/dz||_F^2 / d, averaged over the batch (a scalar).

    ``f_out = f(z_in)`` must have been computed with ``z_in.requires_grad``; d is the
    number of elements per sample. With ``create_graph=True`` (training) the estimate can
    be differentiated w.r.t. f's parameters; it is computed in float32 at least.
    """
    check_positive_int("samples", samples)
    if not z_in.requires_grad:
        raise ValueError("z_in must require grad (compute f_out = f(z_in) after requires_grad_())")
    total = f_out.new_zeros((), dtype=torch.promote_types(f_out.dtype, torch.float32))
    for _ in range(samples):
        v = seeded_randn(f_out.shape, generator, dtype=f_out.dtype, device=f_out.device)
        (vjp,) = torch.autograd.grad(
            f_out, z_in, v, retain_graph=True, create_graph=create_graph
        )
        total = total + vjp.to(total.dtype).pow(2).sum()
    return total / (samples * z_in.numel())


@torch.no_grad()
def _normalise(v: Tensor) -> Tensor:
    return v / v.flatten(1).norm(dim=1).clamp_min(1e-30).view(-1, *([1] * (v.dim() - 1)))


def jacobian_spectral_norm(
    f: Callable[[Tensor], Tensor],
    z: Tensor,
    iters: int = 20,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Per-sample estimate of ||df/dz||_2 at ``z`` by power iteration on J^T J (B,).

    Uses one Jacobian-vector and one vector-Jacobian product per iteration (forward- and
    reverse-mode autodiff), so it works for any f. A value below 1 means f is locally a
    contraction, which plain fixed-point iteration needs (Banach). A lower bound that
    tightens with ``iters``.
    """
    check_positive_int("iters", iters)
    z = z.detach()
    v = _normalise(seeded_randn(z.shape, generator, dtype=z.dtype, device=z.device))
    sigma = z.new_zeros(z.shape[0])
    for _ in range(iters):
        with torch.enable_grad():
            _, jv = torch.func.jvp(f, (z,), (v,))
            _, pullback = torch.func.vjp(f, z)
            (jtjv,) = pullback(jv)
        sigma = jv.detach().flatten(1).norm(dim=1)
        v = _normalise(jtjv.detach())
    return sigma
