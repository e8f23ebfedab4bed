"""Attention kernels on per-head tensors (B, H, N, D); one module per mechanism.

Every module of this package registers its kernels on import; the package imports them
all, so ``available()`` lists every mechanism without a hand-kept list.
"""

import importlib
import pkgutil

from formerlab.attention.base import AttentionKernel
from formerlab.attention.registry import KERNELS, available, build, describe, register

_INFRASTRUCTURE = {"base", "registry"}
for _module in pkgutil.iter_modules(__path__):
    if not _module.name.startswith("_") and _module.name not in _INFRASTRUCTURE:
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["AttentionKernel", "KERNELS", "available", "build", "describe", "register"]
