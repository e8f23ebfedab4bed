"""Small numerical helpers shared by every layer: the working dtype, autocast control, the
relative step and seeded normal draws.

One definition each, so the pseudoinverse, the solvers and the kernels cannot drift apart
on what "compute in float32" or "the iterate stopped moving" means.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype for numerically delicate work: float64 stays, every other dtype -> float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def autocast_off(device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast disabled on ``device``'s type, for work that must run in the dtypes it was
    given (pseudoinverses, solver updates, hand-written backwards): autocast would run
    their matmuls in bfloat16 behind the explicit float32. A no-op on device types without
    autocast (``meta``)."""
    if not torch.amp.is_autocast_available(device.type):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, enabled=False)


def with_callers_autocast(device: torch.device) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Wrap a callable so that it runs under the autocast state active *now* on ``device``.

    A solver captures its caller's state before it switches autocast off for its own
    updates, so the user's function (a layer) still runs in bfloat16 where asked. With
    autocast off now, the callable is returned as it is (off is what it will run under).
    """
    off = not torch.amp.is_autocast_available(device.type)
    if off or not torch.is_autocast_enabled(device.type):
        return lambda fn: fn
    dtype = torch.get_autocast_dtype(device.type)

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            with torch.autocast(device_type=device.type, dtype=dtype):
                return fn(*args, **kwargs)

        return wrapped

    return wrap


def relative_step(new: Tensor, old: Tensor, dims: tuple[int, ...] = (-2, -1)) -> Tensor:
    """‖new − old‖_F / ‖new‖_F over ``dims``, per remaining index; 0 where ``new`` is 0.

    A zero ``new`` gives 0 only when ``old`` is zero too (nothing moved); otherwise the
    step is reported as infinite, so a collapse to zero never reads as convergence.
    """
    num = torch.linalg.vector_norm(new - old, dim=dims)
    den = torch.linalg.vector_norm(new, dim=dims)
    tiny = torch.finfo(den.dtype).tiny
    ratio = num / den.clamp(min=tiny)
    collapsed = torch.where(num > 0, torch.full_like(num, float("inf")), torch.zeros_like(num))
    return torch.where(den > 0, ratio, collapsed)


def seeded_randn(
    shape: tuple[int, ...] | torch.Size,
    generator: torch.Generator | None,
    *,
    dtype: torch.dtype,
    device: torch.device | str,
) -> Tensor:
    """Standard normal draws on ``device``, from ``generator`` wherever that lives.

    A generator draws only on its own device, so a CPU generator draws on the CPU and the
    result moves: the same seed gives the same numbers on every device, and neither the
    tensors' device nor ``torch.set_default_device`` can make the call fail.
    """
    where = device if generator is None else generator.device
    return torch.randn(shape, generator=generator, dtype=dtype, device=where).to(device)
