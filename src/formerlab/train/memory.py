"""The memory a run's work uses: model, optimizer state and activations, not the process.

A Python process with torch imported already holds hundreds of MiB, so the process's peak
resident memory says little about a model. ``WorkMemory(device)`` takes a baseline when it
is created (right before the model is built) and ``peak_mb()`` is the peak *above* it:

* CUDA: ``torch.cuda.max_memory_allocated`` (reset at the baseline) minus the memory
  allocated at the baseline: the caching allocator's tensor peak of the work;
* CPU (Linux): the process's resident-set high-water mark (``VmHWM``, reset at the
  baseline through ``/proc/self/clear_refs``) minus the resident set at the baseline
  (``VmRSS``); elsewhere the growth of ``ru_maxrss`` (a lower bound).
"""

from __future__ import annotations

import re
import resource
import sys
from pathlib import Path

import torch


def _status_mb(field: str) -> float | None:
    """``VmHWM`` (peak) or ``VmRSS`` (current) resident memory of this process, MiB."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return None
    found = re.search(rf"{field}:\s+(\d+)\s+kB", status)
    return int(found.group(1)) / 1024 if found else None


def _reset_peak_rss() -> bool:
    """Reset this process's resident-set high-water mark (Linux)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _maxrss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS


class WorkMemory:
    """Peak memory of the work done after construction, in MiB (see the module docstring)."""

    def __init__(self, device: str) -> None:
        self.cuda = str(device).startswith("cuda")
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.baseline = torch.cuda.memory_allocated() / 2**20
            self.method = "cuda allocator peak"
            return
        self.proc = _reset_peak_rss() and _status_mb("VmRSS") is not None
        if self.proc:
            self.baseline = _status_mb("VmRSS") or 0.0
            self.method = "resident-set peak above the baseline"
        else:
            self.baseline = _maxrss_mb()
            self.method = "growth of the process's peak resident set"

    def peak_mb(self) -> float:
        """The work's peak so far, MiB above the baseline (never negative)."""
        if self.cuda:
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() / 2**20
        else:
            peak = (_status_mb("VmHWM") if self.proc else None) or _maxrss_mb()
        return max(0.0, peak - self.baseline)
