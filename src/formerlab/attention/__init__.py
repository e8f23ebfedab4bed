"""Attention kernels on per-head tensors (B, H, N, D); one module per mechanism.

Every module of this package registers its kernels on import; the package imports them
all, so ``available()`` lists every mechanism without a hand-kept list. The kernel classes
are also exported here for direct use (``attention.NystromAttention(num_landmarks=32)``
equals ``attention.build("nystrom", num_landmarks=32)``).
"""

import importlib
import pkgutil

from formerlab.attention.base import AttentionKernel, check_kernel_options, compute_dtype
from formerlab.attention.causal_nystrom import CausalNystromAttention
from formerlab.attention.conv_skip import DepthwiseConvSkip
from formerlab.attention.double_softmax import DoubleSoftmaxAttention
from formerlab.attention.landmark import LandmarkAttention
from formerlab.attention.linear import LinearAttention
from formerlab.attention.nystrom import NystromAttention
from formerlab.attention.nystrom_product import NystromProduct, nystrom_product
from formerlab.attention.nystrom_projected import NystromScoresProduct, nystrom_projected
from formerlab.attention.performer import PerformerAttention
from formerlab.attention.registry import KERNELS, available, build, describe, register
from formerlab.attention.softmax import SoftmaxAttention

_INFRASTRUCTURE = {"base", "registry"}
for _module in pkgutil.iter_modules(__path__):
    if not _module.name.startswith("_") and _module.name not in _INFRASTRUCTURE:
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "KERNELS",
    "AttentionKernel",
    "CausalNystromAttention",
    "DepthwiseConvSkip",
    "DoubleSoftmaxAttention",
    "LandmarkAttention",
    "LinearAttention",
    "NystromAttention",
    "NystromProduct",
    "NystromScoresProduct",
    "PerformerAttention",
    "SoftmaxAttention",
    "available",
    "build",
    "check_kernel_options",
    "compute_dtype",
    "describe",
    "nystrom_product",
    "nystrom_projected",
    "register",
]
