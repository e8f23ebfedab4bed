"""Token mixers (B, N, C) -> (B, N, C): the plug-in of the MetaFormer block.

Every module of this package registers its mixers on import; the package imports them all.
The mixer classes are exported here too (``mixers.SelfAttention(256, 4, kernel="nystrom",
num_landmarks=64)`` equals ``mixers.build("attention", dim=256, heads=4, ...)``).
"""

import importlib
import pkgutil

from formerlab.mixers.base import TokenMixer
from formerlab.mixers.metric import MetricAttention
from formerlab.mixers.pooling import Pooling, PoolingState
from formerlab.mixers.quadratic import QuadraticAttention
from formerlab.mixers.registry import MIXERS, available, build, describe, register
from formerlab.mixers.self_attention import SelfAttention
from formerlab.mixers.streaming import AttentionMixerState

_INFRASTRUCTURE = {"base", "registry"}
for _module in pkgutil.iter_modules(__path__):
    if not _module.name.startswith("_") and _module.name not in _INFRASTRUCTURE:
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "AttentionMixerState",
    "MIXERS",
    "MetricAttention",
    "Pooling",
    "PoolingState",
    "QuadraticAttention",
    "SelfAttention",
    "TokenMixer",
    "available",
    "build",
    "describe",
    "register",
]
