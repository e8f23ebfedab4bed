"""Tasks behind one ``Task`` interface: corpora (tinyshakespeare, SST-2) and generated ones.

Every module of this package that registers a task is imported here.
"""

import importlib
import pkgutil

from formerlab.data.base import IGNORE_INDEX, Batch, Task
from formerlab.data.registry import TASKS, available, build, describe, register

_INFRASTRUCTURE = {"base", "registry", "paths"}
for _module in pkgutil.iter_modules(__path__):
    if not _module.name.startswith("_") and _module.name not in _INFRASTRUCTURE:
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["IGNORE_INDEX", "TASKS", "Batch", "Task", "available", "build", "describe", "register"]
