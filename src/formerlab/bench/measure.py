"""Measurement primitives shared by the benchmarks: timing, peak memory, isolation.

Peak memory on a GPU is ``torch.cuda.max_memory_allocated`` above the allocation at the
start; on a CPU it is the growth of the process's peak resident set (Linux ``VmHWM``,
reset through ``/proc/self/clear_refs``) — approximate, so benchmarks run each case in a
fresh process (``run_json_worker``) and compare cases of the same run.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class Result:
    """What one benchmark case measured; ``skipped`` holds the reason when it was not run."""

    method: str
    n: int
    time_s: float | None = None
    peak_bytes: int | None = None
    skipped: str | None = None
    info: dict[str, float] = field(default_factory=dict)


#: exact attention pinned to one of SDPA's fused backends (``torch.nn.attention.sdpa_kernel``):
#: the GPU baselines of the attention benchmarks
SDPA_METHODS = ("sdpa-flash", "sdpa-efficient")
#: device types whose flash kernel takes float16 / bfloat16 only (CUDA has no float32 one;
#: the CPU's takes float32)
FLASH_HALF_ONLY = ("cuda",)


@contextlib.contextmanager
def pinned_sdpa(method: str, device: str | torch.device):
    """Run the block with SDPA pinned to ``method``'s backend (``"sdpa-flash"`` or
    ``"sdpa-efficient"``). Flash on a device without a float32 flash kernel runs under
    bf16 autocast (what a flash user runs), so the method works there instead of failing
    with "No available kernel"."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {"sdpa-flash": SDPBackend.FLASH_ATTENTION,
               "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION}[method]
    kind = torch.device(device).type
    half = method == "sdpa-flash" and kind in FLASH_HALF_ONLY
    precision = torch.autocast(kind, dtype=torch.bfloat16) if half else contextlib.nullcontext()
    with sdpa_kernel(backend), precision:
        yield


#: fewer timing rounds than this cannot separate a ratio from machine noise
MIN_REPEATS_FOR_RATIO = 3


class FewRepeatsWarning(UserWarning):
    """A benchmark runs too few timing rounds for its ratios to mean much."""


def check_repeats(repeats: Any, arg: str = "repeats", minimum: int = MIN_REPEATS_FOR_RATIO) -> int:
    """The shared check of a benchmark's timing rounds: ``ValueError`` below 1 (naming
    ``arg``), a ``FewRepeatsWarning`` below ``minimum``: with one or two rounds a median or
    minimum is a single noisy sample, and a ratio of two such samples can be off by more
    than the effect measured (on a busy machine easily 2x). Returns ``repeats``."""
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"{arg}={repeats!r} is not allowed; expected an integer >= 1 "
                         f"(>= {minimum} for meaningful ratios)")
    if repeats < minimum:
        warnings.warn(
            f"{arg}={repeats} is too few timing rounds for a meaningful ratio: one or two "
            f"samples per case cannot tell a speed-up from machine noise; use --repeats "
            f"{minimum} or more (5+ on a busy machine)", FewRepeatsWarning, stacklevel=2,
        )
    return repeats


def sync(device: str | torch.device) -> None:
    """Wait for queued GPU work so that wall-clock times are honest."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def status_kib(field: str) -> int | None:
    """A ``/proc/self/status`` field in KiB (e.g. ``VmRSS``, ``VmHWM``); None off Linux."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def start_peak_memory(device: str | torch.device) -> int | None:
    """Reset the peak-memory reading; returns the baseline for ``peak_memory_bytes``.

    Freed heap is handed back to the OS first (glibc ``malloc_trim``) so that re-using
    it after the reset still shows up in the resident set.
    """
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")  # resets VmHWM to the current resident set (Linux >= 4.0)
    except OSError:
        return None
    return status_kib("VmRSS")


def peak_memory_bytes(device: str | torch.device, base: int | None) -> int | None:
    """Peak bytes above ``base`` (from ``start_peak_memory``) since that call."""
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated() - (base or 0)
    hwm = status_kib("VmHWM")
    return None if hwm is None or base is None else max(hwm - base, 0) * 1024


def timed_passes(step: Callable[[], Any], repeats: int, device: str | torch.device) -> list[float]:
    """Wall-clock seconds of ``repeats`` calls of ``step``."""
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - start)
    return times


def run_json_worker(module: str, payload: dict[str, Any], timeout_s: float) -> tuple[dict | None, str]:
    """Run ``python -m module JSON`` in a fresh process; its last stdout line is JSON.

    Returns ``(result, "")`` or ``(None, reason)`` on a failure or time-out.
    """
    try:
        proc = subprocess.run(
            [sys.executable, "-m", module, json.dumps(payload)],
            capture_output=True, text=True, timeout=timeout_s,
        )
    except subprocess.TimeoutExpired:
        return None, f"timeout after {timeout_s:g} s"
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return None, "failed: " + " | ".join(tail)
    return json.loads(proc.stdout.strip().splitlines()[-1]), ""


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """Rows (dicts with the same keys) as a GitHub markdown table."""
    if not rows:
        return ""
    header = list(rows[0])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(row.get(h, "")) for h in header) + " |" for row in rows]
    return "\n".join(lines)
