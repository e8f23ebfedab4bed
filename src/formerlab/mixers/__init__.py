"""Token mixers (B, N, C) -> (B, N, C): the plug-in of the MetaFormer block.

Every module of this package registers its mixers on import; the package imports them all.
"""

import importlib
import pkgutil

from formerlab.mixers.base import TokenMixer
from formerlab.mixers.pooling import PoolingState
from formerlab.mixers.registry import MIXERS, available, build, describe, register
from formerlab.mixers.streaming import AttentionMixerState

_INFRASTRUCTURE = {"base", "registry"}
for _module in pkgutil.iter_modules(__path__):
    if not _module.name.startswith("_") and _module.name not in _INFRASTRUCTURE:
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "MIXERS", "AttentionMixerState", "PoolingState", "TokenMixer", "available", "build",
    "describe", "register",
]
