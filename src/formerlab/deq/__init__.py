"""Implicit (deep equilibrium) layers: the ``DEQ`` wrapper with implicit, phantom and
unrolled gradients, Jacobian regularisation, and weight/spectral-norm helpers."""

from formerlab.deq.layer import BACKWARDS, DEQ, NonConvergenceError
from formerlab.deq.norm import apply_norm, apply_spectral_norm, apply_weight_norm, remove_norm
from formerlab.deq.regularization import jacobian_frobenius, jacobian_spectral_norm

__all__ = [
    "BACKWARDS",
    "DEQ",
    "NonConvergenceError",
    "apply_norm",
    "apply_spectral_norm",
    "apply_weight_norm",
    "jacobian_frobenius",
    "jacobian_spectral_norm",
    "remove_norm",
]
