"""Token mixers (B, N, C) -> (B, N, C): the plug-in of the MetaFormer block.

Every module of this package registers its mixers on import; the package imports them all.
The mixer classes are exported here too (``mixers.SelfAttention(256, 4, kernel="nystrom",
num_landmarks=64)`` equals ``mixers.build("attention", dim=256, heads=4, ...)``).
"""

import importlib
import pkgutil

from formerlab.mixers.base import TokenMixer
from formerlab.mixers.deltanet import DeltaNet, GatedDeltaNet
from formerlab.mixers.gla import GLA
from formerlab.mixers.mamba2 import Mamba2
from formerlab.mixers.metric import MetricAttention
from formerlab.mixers.pooling import Pooling, PoolingState
from formerlab.mixers.quadratic import QuadraticAttention
from formerlab.mixers.recurrent import RecurrentState
from formerlab.mixers.registry import (
    MIXERS,
    available,
    build,
    describe,
    is_causal_only,
    register,
)
from formerlab.mixers.retention import Retention
from formerlab.mixers.self_attention import SelfAttention
from formerlab.mixers.short_conv import ShortConv
from formerlab.mixers.streaming import AttentionMixerState

_INFRASTRUCTURE = {"base", "registry"}
for _module in pkgutil.iter_modules(__path__):
    if not _module.name.startswith("_") and _module.name not in _INFRASTRUCTURE:
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "is_causal_only",
    "AttentionMixerState",
    "DeltaNet",
    "GLA",
    "GatedDeltaNet",
    "MIXERS",
    "Mamba2",
    "MetricAttention",
    "Pooling",
    "PoolingState",
    "QuadraticAttention",
    "RecurrentState",
    "Retention",
    "SelfAttention",
    "ShortConv",
    "TokenMixer",
    "available",
    "build",
    "describe",
    "register",
]
