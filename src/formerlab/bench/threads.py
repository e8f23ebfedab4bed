"""Thread scaling: the same cases timed at several torch thread counts, side by side.

``--threads 1,2`` on ``formerlab bench nystrom|causal|deq`` runs through here. Every round
visits every thread count and, within it, every method, one pass each (the visiting order
is reversed on alternate rounds); a method's time at a thread count is its minimum over
the rounds. A burst of load from other processes then hits all cases alike, and the
minimum estimates the undisturbed cost — on a shared machine the multi-thread numbers are
still the noisiest (a second thread is the first thing another job takes away).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence

import torch

from formerlab.bench.measure import sync


def parse_threads(value: str | int | Sequence[int]) -> tuple[int, ...]:
    """``"1,2"`` -> ``(1, 2)``; a ``ValueError`` naming ``--threads`` otherwise."""
    if isinstance(value, int):
        parts: list[object] = [value]
    elif isinstance(value, str):
        parts = [p.strip() for p in value.split(",") if p.strip()]
    else:
        parts = list(value)
    try:
        counts = tuple(int(p) for p in parts)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        counts = ()
    if not counts or any(c < 1 for c in counts) or len(set(counts)) != len(counts):
        raise ValueError(
            f"--threads={value!r} is not allowed; expected distinct positive thread counts "
            f"separated by commas, e.g. 1,2 (this machine has {available_cores()} cores)"
        )
    return counts


def available_cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def time_over_threads(
    steps: dict[str, Callable[[], object]], threads: Sequence[int], warmup: int = 1,
    repeats: int = 5, device: str = "cpu",
) -> dict[str, dict[int, float]]:
    """``{method: {threads: ms}}``: the minimum over ``repeats`` interleaved rounds."""
    if repeats < 1:
        raise ValueError(f"repeats={repeats} must be at least 1")
    before = torch.get_num_threads()
    best = {name: {t: float("inf") for t in threads} for name in steps}
    try:
        for t in threads:
            torch.set_num_threads(t)
            for step in steps.values():
                for _ in range(warmup):
                    step()
        for round_ in range(repeats):
            order = list(threads) if round_ % 2 == 0 else list(reversed(threads))
            for t in order:
                torch.set_num_threads(t)
                for name, step in steps.items():
                    sync(device)
                    start = time.perf_counter()
                    step()
                    sync(device)
                    best[name][t] = min(best[name][t], (time.perf_counter() - start) * 1e3)
    finally:
        torch.set_num_threads(before)
    return best


def scaling_table(
    times: dict[str, dict[int, float]], reference: str | None = None, label: str = "method"
) -> str:
    """Markdown: ms per thread count, the speed-up over the fewest threads, and each
    method's time over ``reference``'s at the same thread count (how many times slower)."""
    threads = sorted(next(iter(times.values())))
    head = [label] + [f"{t} thr ms" for t in threads] + [f"speed-up {threads[0]}→{t}" for t in threads[1:]]
    if reference is not None:
        head += [f"/ {reference} @{t}" for t in threads]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, by in times.items():
        cells = [name] + [f"{by[t]:.1f}" for t in threads]
        cells += [f"{by[threads[0]] / by[t]:.2f}×" for t in threads[1:]]
        if reference is not None:
            cells += [f"{by[t] / times[reference][t]:.2f}×" for t in threads]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


__all__ = ["available_cores", "parse_threads", "scaling_table", "time_over_threads"]
