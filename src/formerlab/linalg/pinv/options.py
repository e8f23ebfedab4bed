"""The settings of :func:`~formerlab.linalg.pinv.pinv` and its relatives: the allowed choices,
the default tolerance and cut-off, the cost model of an iteration order, and the argument
checks (with the guard that keeps the computation out of ``torch.autocast``).

The lowest module of :mod:`formerlab.linalg.pinv`: it imports none of the others.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from formerlab.errors import check_positive_float, check_positive_int
from formerlab.linalg.numerics import autocast_off, compute_dtype

INITS = ("auto", "razavi", "frobenius", "spectral", "global")
ON_FAIL = ("raise", "warn", "exact")
BACKWARDS = ("unroll", "implicit")
AUTO_INIT = "razavi"


def default_tol(dtype: torch.dtype) -> float:
    """Default tolerance on the certified bound: float64 1e-8, float32 1e-5, and for
    float16 / bfloat16 8× their unit roundoff (the output rounding alone is one unit).

    float64: for a rectangular or rank-deficient A the rounding allowance of the bound is
    ~√n·u·κ, 1e-10 … 1e-9 for matrices of condition ~10⁵ whose actual error is ~1e-12, so a
    tighter default would refuse them (a square A gets the sharp bound, within ~100× of its
    error: :mod:`~formerlab.linalg.pinv.certificate`)."""
    work = compute_dtype(dtype)
    if work == torch.float64:
        return 1e-8
    if dtype in (torch.float16, torch.bfloat16):
        return 8 * unit_roundoff(dtype)
    return 1e-5


def default_rcond(dtype: torch.dtype, m: int, n: int) -> float:
    """Default cut-off max(m, n)·ε of the compute dtype (``torch.linalg.pinv``'s rule)."""
    return max(m, n) * torch.finfo(compute_dtype(dtype)).eps


def unit_roundoff(dtype: torch.dtype) -> float:
    """u = ε/2, the relative rounding error of round-to-nearest in ``dtype``."""
    return torch.finfo(dtype).eps / 2


def matmuls_per_iteration(order: int) -> int:
    """Matrix products one iteration of ``order`` costs (AZ included)."""
    return 4 if order == 3 else order


def growth_factor(order: int) -> float:
    """Factor by which a small eigenvalue of AZ grows per iteration (3.25 for Razavi, p)."""
    return 3.25 if order == 3 else float(order)


def in_given_dtypes(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Run ``fn(A, ...)`` with autocast off on A's device: the iteration, its certificate and
    the regularised solves stay in the compute dtype under ``torch.autocast`` too (autocast
    would run their products in bfloat16, where the tolerances mean nothing)."""

    @functools.wraps(fn)
    def run(A: Any, *args: Any, **kwargs: Any) -> Any:
        guard = autocast_off(A.device) if isinstance(A, Tensor) else contextlib.nullcontext()
        with guard:
            return fn(A, *args, **kwargs)

    return run


def check_matrix(A: Tensor, arg: str = "A") -> None:
    """``A`` must be a finite floating tensor of shape (..., m, n)."""
    if not isinstance(A, Tensor) or A.dim() < 2:
        shape = tuple(A.shape) if isinstance(A, Tensor) else type(A).__name__
        raise ValueError(f"{arg} must be a tensor of shape (..., m, n); got {shape}")
    if not A.is_floating_point():
        raise ValueError(f"{arg} must be floating point; got dtype {A.dtype}")
    finite = torch.isfinite(A)
    if not torch.compiler.is_compiling() and not bool(finite.all()):  # no graph break
        bad = int((~finite).flatten(-2).any(-1).sum())
        raise ValueError(f"{arg} has non-finite entries in {bad} matrices; expected finite values")


def check_order(order: int) -> int:
    """``order`` must be an integer >= 2."""
    return check_positive_int("order", order, minimum=2)


def check_rcond(rcond: float) -> float:
    """``rcond`` must be a float in (0, 1)."""
    value = check_positive_float("rcond", rcond)
    if value >= 1.0:
        raise ValueError(f"rcond={rcond!r} is not allowed; expected a float in (0, 1)")
    return value
