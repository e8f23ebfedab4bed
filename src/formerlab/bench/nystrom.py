"""Speed and memory of Nyström attention against exact softmax attention and against the
``nystrom-attention`` package (``formerlab bench nystrom``).

Forward + backward of the whole attention module, projections included, on x of shape
(B, N, dim) with dim = heads·64:

* ``nystrom``: ``SelfAttention(dim, heads, kernel="nystrom", num_landmarks=m,
  pinv_iters=6, conv_kernel=33, conv_heads=heads)``;
* ``softmax``: ``SelfAttention(dim, heads, kernel="softmax")`` (fused SDPA);
* ``nystrom-attention``: the PyPI package's ``NystromAttention(dim, dim_head=64, heads,
  num_landmarks=m, pinv_iterations=6, residual=True, residual_conv_kernel=33)``, when it is
  installed (optional; ``pip install --no-deps nystrom-attention``, it needs einops).

Time and memory are measured separately, each the way that is robust on a shared machine:

* time: for each N the methods are timed **interleaved** in one process — round after
  round, one forward+backward of each method — and each method's time is its minimum over
  the rounds (after ``warmup`` passes). A burst of load from other jobs then hits all
  methods alike instead of one, and the minimum estimates the undisturbed cost;
* peak memory: one pass per case in a fresh subprocess, ``torch.cuda.max_memory_allocated``
  on a GPU, the process's peak resident set (VmHWM) minus the resident set before the pass
  on a CPU (Linux; ``None`` elsewhere).

Exact attention is skipped above ``max_exact_n`` (it is quadratic) and reported as skipped.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

import torch

from formerlab.bench.measure import (
    SDPA_METHODS,
    check_repeats,
    peak_memory_bytes,
    pinned_sdpa,
    start_peak_memory,
    sync,
)
from formerlab.bench.threads import ThreadTimes, time_over_threads
from formerlab.errors import check_choice, check_positive_int

METHODS = ("nystrom", "softmax", "nystrom-attention")
ALL_METHODS = METHODS + SDPA_METHODS
DEFAULT_SIZES = (1024, 4096, 8192, 16384, 32768)


@dataclass
class Result:
    """One (method, N) measurement; ``time_ms``/``peak_mib`` None when skipped."""

    method: str
    n: int
    time_ms: float | None
    peak_mib: float | None
    note: str = ""


def peer_available() -> bool:
    """Whether the optional ``nystrom-attention`` package can be imported."""
    try:
        import nystrom_attention  # noqa: F401
    except Exception:
        return False
    return True


class PinnedSDPA(torch.nn.Module):
    """``module`` run with SDPA pinned to ``method``'s backend (:func:`pinned_sdpa`)."""

    def __init__(self, module: torch.nn.Module, method: str) -> None:
        super().__init__()
        self.module, self.method = module, method

    def forward(self, x):
        with pinned_sdpa(self.method, x.device):
            return self.module(x)


def build_module(method: str, dim: int, heads: int, landmarks: int, conv_kernel: int):
    """The module a case times (see the module docs)."""
    check_choice("method", method, ALL_METHODS)
    if method in SDPA_METHODS:
        from formerlab.mixers.self_attention import SelfAttention

        return PinnedSDPA(SelfAttention(dim, heads, kernel="softmax"), method)
    if method == "nystrom-attention":
        from nystrom_attention import NystromAttention as PeerNystrom

        return PeerNystrom(
            dim=dim, dim_head=dim // heads, heads=heads, num_landmarks=landmarks,
            pinv_iterations=6, residual=True, residual_conv_kernel=conv_kernel,
        )
    from formerlab.mixers.self_attention import SelfAttention

    if method == "softmax":
        return SelfAttention(dim, heads, kernel="softmax")
    return SelfAttention(
        dim, heads, kernel="nystrom", num_landmarks=landmarks, pinv_iters=6,
        conv_kernel=conv_kernel, conv_heads=heads,
    )


def _step_fn(module, x):
    def step() -> None:
        out = module(x)
        out.square().mean().backward()
        module.zero_grad(set_to_none=True)
        x.grad = None

    return step


def time_interleaved(
    methods: tuple[str, ...], n: int, batch: int, dim: int, heads: int, landmarks: int,
    conv_kernel: int, warmup: int, repeats: int, device: str, seed: int = 0,
) -> dict[str, float]:
    """Minimum fwd+bwd time (ms) of each method over ``repeats`` interleaved rounds."""
    dev = torch.device(device)
    torch.manual_seed(seed)
    x = torch.randn(batch, n, dim, device=dev, requires_grad=True)
    steps = {
        m: _step_fn(build_module(m, dim, heads, landmarks, conv_kernel).to(dev), x)
        for m in methods
    }
    for step in steps.values():
        for _ in range(warmup):
            step()
    best = {m: float("inf") for m in methods}
    for _ in range(repeats):
        for m, step in steps.items():
            sync(dev)
            t0 = time.perf_counter()
            step()
            sync(dev)
            best[m] = min(best[m], (time.perf_counter() - t0) * 1e3)
    return best


def measure_memory(
    method: str, n: int, batch: int, dim: int, heads: int, landmarks: int, conv_kernel: int,
    threads: int, device: str, seed: int = 0,
) -> float | None:
    """Peak memory (MiB) of one fwd+bwd pass, measured in this process (run it fresh)."""
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    dev = torch.device(device)
    step = _step_fn(build_module(method, dim, heads, landmarks, conv_kernel).to(dev),
                    torch.randn(batch, n, dim, device=dev, requires_grad=True))
    base = start_peak_memory(dev)
    step()
    sync(dev)
    peak = peak_memory_bytes(dev, base)
    return None if peak is None else peak / 2**20


def memory_subprocess(**kwargs: Any) -> tuple[float | None, str]:
    """:func:`measure_memory` in a fresh interpreter; ``(MiB or None, error note)``."""
    code = (
        "import json, sys\n"
        "from formerlab.bench.nystrom import measure_memory\n"
        "print(json.dumps(measure_memory(**json.loads(sys.argv[1]))))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, json.dumps(kwargs)], capture_output=True, text=True
    )
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["failed"])[-1]
        return None, f"error: {last}"[:160]
    return json.loads(proc.stdout.strip().splitlines()[-1]), ""


def run_benchmark(
    sizes: tuple[int, ...] = DEFAULT_SIZES,
    methods: tuple[str, ...] = METHODS,
    batch: int = 1,
    heads: int = 4,
    head_dim: int = 64,
    landmarks: int = 64,
    conv_kernel: int = 33,
    warmup: int = 1,
    repeats: int = 5,
    threads: int = 1,
    device: str = "cpu",
    max_exact_n: int = 16384,
    memory: bool = True,
    progress=None,
) -> list[Result]:
    """Measure every (method, N); the peer is skipped with a note when not installed."""
    for s in sizes:
        check_positive_int("sizes", s, minimum=2)
    for m in methods:
        check_choice("method", m, ALL_METHODS)
    for arg, val in (("batch", batch), ("heads", heads), ("head_dim", head_dim),
                     ("landmarks", landmarks), ("repeats", repeats), ("threads", threads)):
        check_positive_int(arg, val)
    check_positive_int("warmup", warmup, minimum=0)
    check_positive_int("conv_kernel", conv_kernel)
    check_repeats(repeats)
    has_peer = peer_available()
    torch.set_num_threads(threads)
    dim = heads * head_dim
    results = []
    for n in sizes:
        notes = {}
        if "nystrom-attention" in methods and not has_peer:
            notes["nystrom-attention"] = "not installed"
        for exact in ("softmax", *SDPA_METHODS):
            if exact in methods and n > max_exact_n:
                notes[exact] = f"skipped (N > {max_exact_n})"
        run = tuple(m for m in methods if m not in notes)
        if progress is not None:
            progress(f"N={n}: timing {', '.join(run)} interleaved")
        times = time_interleaved(run, n, batch, dim, heads, landmarks, conv_kernel, warmup,
                                 repeats, device) if run else {}
        for method in methods:
            if method in notes:
                results.append(Result(method, n, None, None, notes[method]))
                continue
            peak, note = None, ""
            if memory:
                if progress is not None:
                    progress(f"N={n}: peak memory of {method}")
                peak, note = memory_subprocess(
                    method=method, n=n, batch=batch, dim=dim, heads=heads, landmarks=landmarks,
                    conv_kernel=conv_kernel, threads=threads, device=device,
                )
            results.append(Result(method, n, times[method], peak, note))
    return results


def summary_rows(results: list[Result]) -> list[dict[str, Any]]:
    """Per N: time and peak memory of each method and the speed/memory ratios vs nystrom."""
    rows = []
    for n in sorted({r.n for r in results}):
        by = {r.method: r for r in results if r.n == n}
        row: dict[str, Any] = {"N": n}
        ours = by.get("nystrom")
        for method, r in by.items():
            row[f"{method} ms"] = r.time_ms
            row[f"{method} MiB"] = r.peak_mib
            if r.note:
                row[f"{method} note"] = r.note
            if method != "nystrom" and ours and ours.time_ms and r.time_ms:
                row[f"{method}/nystrom time"] = r.time_ms / ours.time_ms
        rows.append(row)
    return rows


def linearity(results: list[Result], method: str = "nystrom") -> list[tuple[int, float]]:
    """(N, time per 1k tokens in ms) for ``method``: flat means time linear in N."""
    return [(r.n, r.time_ms / (r.n / 1024)) for r in results if r.method == method and r.time_ms]


def markdown_table(results: list[Result]) -> str:
    """The table as markdown (for the README)."""
    methods = [m for m in ALL_METHODS if any(r.method == m for r in results)]
    head = ["N"] + [f"{m} ms (MiB)" for m in methods] + [
        f"{m} / nystrom" for m in methods if m != "nystrom"
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in summary_rows(results):
        cells = [str(row["N"])]
        for m in methods:
            t, mem = row.get(f"{m} ms"), row.get(f"{m} MiB")
            cells.append(
                f"{t:.0f} ({mem:.0f})" if t is not None and mem is not None
                else (f"{t:.0f}" if t is not None else row.get(f"{m} note", "–"))
            )
        for m in methods:
            if m != "nystrom":
                ratio = row.get(f"{m}/nystrom time")
                cells.append(f"{ratio:.2f}×" if ratio else "–")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def thread_scaling(
    n: int, threads: tuple[int, ...], methods: tuple[str, ...] = METHODS, batch: int = 1,
    heads: int = 4, head_dim: int = 64, landmarks: int = 64, conv_kernel: int = 33,
    warmup: int = 1, repeats: int = 5, device: str = "cpu", seed: int = 0,
) -> ThreadTimes:
    """``{method: {threads: ms}}`` at one N: every method at every thread count,
    interleaved (``bench.threads``); the peer is left out when not installed."""
    check_positive_int("n", n, minimum=2)
    for m in methods:
        check_choice("method", m, ALL_METHODS)
    run = tuple(m for m in methods if m != "nystrom-attention" or peer_available())
    torch.manual_seed(seed)
    dim = heads * head_dim
    x = torch.randn(batch, n, dim, device=device, requires_grad=True)
    steps = {m: _step_fn(build_module(m, dim, heads, landmarks, conv_kernel).to(device), x)
             for m in run}
    return time_over_threads(steps, threads, warmup, repeats, device)


__all__ = [
    "ALL_METHODS", "DEFAULT_SIZES", "METHODS", "PinnedSDPA", "SDPA_METHODS", "thread_scaling", "Result", "build_module", "linearity", "markdown_table",
    "measure_memory", "peer_available", "run_benchmark", "summary_rows", "time_interleaved",
]
