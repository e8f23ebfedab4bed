"""``train.compile: true``: the model under ``torch.compile`` (inductor).

Inductor turns the graphs it captures into C++ (CPU) or Triton (CUDA) kernels; on CPU that
needs a C++ compiler, so its absence is reported before training rather than as a long
inductor traceback at the first step. Only the training forward/backward runs compiled:
checkpoints hold the plain module's weights (no ``_orig_mod.`` prefixes), and evaluation
and sampling stay eager (they would otherwise recompile for ``eval()`` and every length).
"""

from __future__ import annotations

import os
import shutil

import torch
from torch import nn

COMPILERS = ("g++", "c++", "clang++")


def find_cxx() -> str | None:
    """The C++ compiler inductor would use: ``$CXX``, else the first of ``COMPILERS``."""
    if os.environ.get("CXX"):
        return shutil.which(os.environ["CXX"])
    return next((path for name in COMPILERS if (path := shutil.which(name))), None)


def compile_model(model: nn.Module, device: str, backend: str = "inductor") -> nn.Module:
    """``torch.compile(model)``; a clear ``ValueError`` if inductor on CPU has no compiler."""
    if backend == "inductor" and not device.startswith("cuda") and find_cxx() is None:
        raise ValueError(
            "train.compile=true needs a C++ compiler for inductor on CPU, and none was found "
            f"(looked for $CXX and {', '.join(COMPILERS)}); install one (e.g. apt install g++) "
            "or set train.compile=false"
        )
    return torch.compile(model, backend=backend)
