"""Thread scaling: the same cases timed at several torch thread counts, side by side.

``--threads 1,2`` on ``formerlab bench nystrom|causal|deq`` runs through here. Every round
visits every thread count and, within it, every method, one pass each (both visiting
orders are reversed on alternate rounds); a method's time at a thread count is its minimum over
the rounds. A burst of load from other processes then hits all cases alike, and the
minimum estimates the undisturbed cost — on a shared machine the multi-thread numbers are
still the noisiest (a second thread is the first thing another job takes away).

A ratio of two minima favours the method whose times scatter more (its luckiest round is
further below its typical one), so the tables also give the *paired* ratio: within each
round the two methods ran back to back at the same thread count, and the median of those
per-round ratios (with their range) follows load that drifts between rounds.
"""

from __future__ import annotations

import os
import statistics
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


class ThreadTimes(dict):
    """``{method: {threads: ms}}``, the minimum over the rounds, with every round's time
    kept in ``rounds``: ``{method: {threads: [ms, one per round]}}``."""

    def __init__(self, rounds: dict[str, dict[int, list[float]]]) -> None:
        super().__init__({name: {t: min(ms) for t, ms in by.items()} for name, by in rounds.items()})
        self.rounds = rounds

    def paired_ratios(self, name: str, reference: str, threads: int) -> list[float]:
        """``name``'s time over ``reference``'s, round by round, at ``threads``."""
        return [a / b for a, b in zip(self.rounds[name][threads], self.rounds[reference][threads])]


def _wake_threads() -> None:
    """One untimed parallel op, so that starting the thread pool at a new count is not
    charged to the first method timed there."""
    torch.ones(1 << 20).add_(1.0)


def time_over_threads(
    steps: dict[str, Callable[[], object]], threads: Sequence[int], warmup: int = 1,
    repeats: int = 5, device: str = "cpu",
) -> ThreadTimes:
    """``{method: {threads: ms}}``: the minimum over ``repeats`` interleaved rounds, each
    round's times in ``.rounds`` (:class:`ThreadTimes`)."""
    if repeats < 1:
        raise ValueError(f"repeats={repeats} must be at least 1")
    before = torch.get_num_threads()
    rounds: dict[str, dict[int, list[float]]] = {name: {t: [] for t in threads} for name in steps}
    try:
        for t in threads:
            torch.set_num_threads(t)
            for step in steps.values():
                for _ in range(warmup):
                    step()
        for round_ in range(repeats):
            # alternate rounds reverse both orders: each method is as often the first
            # after a change of thread count (and after the other method) as not
            forward = round_ % 2 == 0
            methods = list(steps.items()) if forward else list(reversed(steps.items()))
            for t in (threads if forward else list(reversed(threads))):
                torch.set_num_threads(t)
                _wake_threads()
                for name, step in methods:
                    sync(device)
                    start = time.perf_counter()
                    step()
                    sync(device)
                    rounds[name][t].append((time.perf_counter() - start) * 1e3)
    finally:
        torch.set_num_threads(before)
    return ThreadTimes(rounds)


def scaling_table(
    times: dict[str, dict[int, float]], reference: str | None = None, label: str = "method"
) -> str:
    """Markdown: ms per thread count, the speed-up over the fewest threads, and each
    method's time over ``reference``'s at the same thread count (how many times slower):
    the ratio of the minima and, when ``times`` kept its rounds (:class:`ThreadTimes`), the
    median of the paired per-round ratios with their range."""
    threads = sorted(next(iter(times.values())))
    paired = reference is not None and isinstance(times, ThreadTimes)
    head = [label] + [f"{t} thr ms" for t in threads] + [f"speed-up {threads[0]}→{t}" for t in threads[1:]]
    if reference is not None:
        head += [f"/ {reference} @{t}" for t in threads]
    if paired:
        head += [f"paired @{t}: median (range)" for t in threads]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, by in times.items():
        cells = [name] + [f"{by[t]:.1f}" for t in threads]
        cells += [f"{by[threads[0]] / by[t]:.2f}×" for t in threads[1:]]
        if reference is not None:
            cells += [f"{by[t] / times[reference][t]:.2f}×" for t in threads]
        if paired:
            for t in threads:
                ratios = times.paired_ratios(name, reference, t)
                cells.append(f"{statistics.median(ratios):.2f}× ({min(ratios):.2f}–{max(ratios):.2f})")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


__all__ = ["ThreadTimes", "available_cores", "parse_threads", "scaling_table", "time_over_threads"]
