"""Double backward for autograd functions with a hand-written first backward.

A hand-written backward (``nystrom_product``, the conv skip) computes its gradients from
intermediates saved without a graph, so differentiating those gradients again would be
wrong. Under ``create_graph=True`` such a backward calls :func:`grads_by_recompute`
instead: the forward again from the saved inputs, with plain autograd ops, and its
gradients with their graph — exact higher derivatives at the cost of a recomputation.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from formerlab.linalg.numerics import autocast_off


def grads_by_recompute(
    forward: Callable[..., Tensor], inputs: Sequence[Tensor], needs: Sequence[bool], grad: Tensor
) -> tuple[Tensor | None, ...]:
    """Gradients of ``forward(*inputs)`` against ``grad``, differentiable (create_graph).

    Autocast is off, as in the hand-written forwards; None for inputs whose ``needs`` is
    False (``ctx.needs_input_grad``).
    """
    wanted = [t for t, need in zip(inputs, needs) if need]
    with torch.enable_grad(), autocast_off(inputs[0].device):
        out = forward(*inputs)
        grads = iter(torch.autograd.grad(out, wanted, grad, create_graph=True))
    return tuple(next(grads) if need else None for need in needs)


__all__ = ["grads_by_recompute"]
