"""The report's figures, drawn with matplotlib's Agg canvas directly (no pyplot, no global
backend switch, so importing this never changes a user's interactive matplotlib)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import NullLocator


def new_figure(width: float = 7.0, height: float = 4.2) -> Figure:
    """A figure attached to an Agg canvas."""
    figure = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def save(figure: Figure, path: str | Path) -> Path:
    """Write ``figure`` as PNG (creating the folder) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    return path


def smooth(values: Sequence[float], window: int) -> list[float]:
    """Trailing moving average (the first points average what there is)."""
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def loss_curves(
    path: str | Path, title: str, series: dict[str, tuple[list[int], list[float]]]
) -> Path:
    """Training loss against step, one line per series (moving average over ~5% of steps)."""
    figure = new_figure()
    ax = figure.add_subplot()
    for label, (steps, losses) in series.items():
        if steps:
            ax.plot(steps, smooth(losses, max(1, len(losses) // 20)), label=label, linewidth=1.4)
    ax.set(title=title, xlabel="training step", ylabel="training loss (smoothed)")
    ax.grid(alpha=0.3)
    if series:
        ax.legend(fontsize="small", ncol=2 if len(series) > 6 else 1)
    return save(figure, path)


def metric_bars(
    path: str | Path,
    title: str,
    labels: list[str],
    means: list[float],
    stds: list[float | None],
    metric: str,
    baseline: float | None = None,
) -> Path:
    """One bar per mechanism (error bar = std over seeds), the task baseline dashed."""
    figure = new_figure(max(5.0, 0.8 * len(labels) + 2.5), 4.2)
    ax = figure.add_subplot()
    positions = list(range(len(labels)))
    errors = [s if s is not None and math.isfinite(s) else 0.0 for s in stds]
    has_errors = any(errors)  # single-seed rows: no error bars rather than empty caps
    bars = ax.bar(positions, means, yerr=errors if has_errors else None, capsize=3,
                  color="tab:blue", alpha=0.85)
    for bar, mean, error in zip(bars, means, errors):
        if math.isfinite(mean):  # the value above its error bar
            ax.annotate(f"{mean:.3g}", (bar.get_x() + bar.get_width() / 2, mean + error),
                        xytext=(0, 2), textcoords="offset points",
                        ha="center", va="bottom", fontsize="small")
    if baseline is not None and math.isfinite(baseline):
        ax.axhline(baseline, color="tab:red", linestyle="--", label=f"baseline {baseline:.3g}")
        ax.legend(fontsize="small")
    ax.set_xticks(positions, labels, rotation=30 if len(labels) > 4 else 0, ha="right" if len(labels) > 4 else "center")
    ax.set(title=title, ylabel=metric)
    ax.grid(axis="y", alpha=0.3)
    return save(figure, path)


def scaling(
    path: str | Path,
    title: str,
    series: dict[str, list[tuple[float, float, float]]],
    time_label: str = "wall time per training step (ms)",
    memory_label: str = "peak memory (MiB)",
) -> Path:
    """Time and memory against sequence length N, log-log, one line per mechanism.
    ``series`` maps a label to points ``(N, time, memory)``."""
    figure = new_figure(10.0, 4.2)
    time_ax, memory_ax = figure.subplots(1, 2)
    lengths = sorted({p[0] for points in series.values() for p in points})
    for label, points in series.items():
        points = sorted(p for p in points if all(math.isfinite(v) and v > 0 for v in p))
        if not points:
            continue
        n, t, m = zip(*points)
        time_ax.plot(n, t, marker="o", label=label)
        memory_ax.plot(n, m, marker="o", label=label)
    for ax, ylabel in ((time_ax, time_label), (memory_ax, memory_label)):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set(xlabel="sequence length N", ylabel=ylabel)
        ax.set_xticks(lengths, [f"{n:g}" for n in lengths])  # the N values the sweep ran
        ax.xaxis.set_minor_locator(NullLocator())
        ax.grid(alpha=0.3, which="both")
    if time_ax.get_legend_handles_labels()[0]:  # nothing plotted: no empty legend
        time_ax.legend(fontsize="small")
    figure.suptitle(title)
    return save(figure, path)
