"""Iterative Moore–Penrose pseudoinverse for batches of matrices, with a certified error bound.

The public entry points, re-exported here (import them from ``formerlab.linalg.pinv``):
:func:`pinv`, :func:`pinv_iterates`, :func:`pinv_reg`, :class:`PinvInfo`, :class:`PinvError`
and the helpers other modules use. The implementation is split by concern; each module
imports only those listed before it:

* :mod:`~formerlab.linalg.pinv.options` — choices, default ``tol`` / ``rcond``, argument checks;
* :mod:`~formerlab.linalg.pinv.info` — the diagnostics types :class:`PinvInfo`, :class:`PinvError`;
* :mod:`~formerlab.linalg.pinv.autograd` — the implicit backward (custom autograd Function);
* :mod:`~formerlab.linalg.pinv.inits` — power-of-two scaling, the initial scale α, norm estimates;
* :mod:`~formerlab.linalg.pinv.certificate` — reach count, the general and the sharp
  (square A) bound with their derivation, the deferred certificate;
* :mod:`~formerlab.linalg.pinv.iteration` — order-p steps, stopping, stagnation and
  divergence, ``on_fail``, :func:`pinv` and :func:`pinv_iterates`;
* :mod:`~formerlab.linalg.pinv.regularized` — :func:`pinv_reg` (Tikhonov, truncated SVD).
"""

# the names marked F401 are outside __all__ but stay importable from here (other modules
# import them from formerlab.linalg.pinv, as before the split)
from formerlab.linalg.pinv.certificate import (
    GAP,
    SHARP_NOISE,
    certify,
    penrose_residual,
    reach_and_upper_norm,  # noqa: F401
    reach_count,
)
from formerlab.linalg.pinv.info import PinvError, PinvInfo
from formerlab.linalg.pinv.inits import (
    SPECTRAL_MARGIN,  # noqa: F401
    SPECTRAL_POWER_STEPS,  # noqa: F401
    binary_exponent,
    initial_scale,
    power_start,  # noqa: F401
    scale_pow2,
    spectral_norm_estimate,
    spectral_norm_upper,
)
from formerlab.linalg.pinv.iteration import (
    PATIENCE,  # noqa: F401
    pinv,
    pinv_iterates,
)
from formerlab.linalg.pinv.options import (
    AUTO_INIT,
    BACKWARDS,
    INITS,
    ON_FAIL,
    check_matrix,  # noqa: F401
    check_order,  # noqa: F401
    check_rcond,  # noqa: F401
    default_rcond,
    default_tol,
    growth_factor,
    in_given_dtypes,  # noqa: F401
    matmuls_per_iteration,
    unit_roundoff,
)
from formerlab.linalg.pinv.regularized import REG_METHODS, pinv_reg

__all__ = [
    "AUTO_INIT", "BACKWARDS", "GAP", "INITS", "ON_FAIL", "PinvError", "PinvInfo", "REG_METHODS",
    "SHARP_NOISE",
    "binary_exponent", "certify", "default_rcond", "default_tol", "growth_factor",
    "initial_scale", "matmuls_per_iteration", "penrose_residual", "pinv", "pinv_iterates",
    "pinv_reg", "reach_count", "scale_pow2", "spectral_norm_estimate", "spectral_norm_upper",
    "unit_roundoff",
]
