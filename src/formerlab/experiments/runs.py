"""A table of training runs read from their folders: progress, best validation and the test
score at it (``train.test_at_best``), wall time; and their validation curves.

Reads only what a run writes (``checkpoint/state.json``, ``test.json``), so it works on
runs still in progress and on runs copied from another machine.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from formerlab.train.best import TEST_FILE
from formerlab.train.checkpoint import checkpoint_folder, read_state


@dataclass
class RunSummary:
    """What one run folder says about its run."""

    run_dir: Path
    name: str
    mechanism: str
    step: int
    steps: int
    metric: str
    #: (step, validation score of ``metric``) per evaluation
    curve: list[tuple[int, float]] = field(default_factory=list)
    best_step: int | None = None
    best: float | None = None
    test: float | None = None
    elapsed_s: float | None = None

    @property
    def finished(self) -> bool:
        return self.step >= self.steps


def mechanism_of(config: dict[str, Any]) -> str:
    """``mixer`` or ``mixer/kernel`` as the config sets it, e.g. ``attention/nystrom``."""
    model = config.get("model", {})
    mixer = model.get("mixer", "attention")
    return f"{mixer}/{model.get('kernel')}" if mixer == "attention" else mixer


def summarize_run(run_dir: str | Path, metric: str = "accuracy") -> RunSummary:
    """Read ``run_dir``: its config, step, evaluations and (if written) ``test.json``."""
    run_dir = Path(run_dir)
    state = read_state(checkpoint_folder(run_dir))
    config = state["config"]
    evals = [h for h in state["history"] if "eval" in h and metric in h["eval"]]
    summary = RunSummary(
        run_dir=run_dir, name=config.get("name", run_dir.name), mechanism=mechanism_of(config),
        step=state["step"], steps=config["train"]["steps"], metric=metric,
        curve=[(e["step"], e["eval"][metric]) for e in evals],
        elapsed_s=evals[-1].get("elapsed_s") if evals else None,
    )
    test_file = run_dir / TEST_FILE
    if test_file.is_file():
        import json

        record = json.loads(test_file.read_text())
        summary.best_step, summary.best = record["best_step"], record["val"].get(metric)
        summary.test = record["test"].get(metric)
    elif summary.curve:
        summary.best_step, summary.best = max(summary.curve, key=lambda point: point[1])
    return summary


def table(summaries: list[RunSummary]) -> tuple[list[str], list[list[str]]]:
    """Columns and rows of the runs table (scores in %)."""
    metric = summaries[0].metric if summaries else "accuracy"
    columns = ["run", "mechanism", "steps", f"best val {metric}", "at step",
               f"test {metric} at best val", "wall time"]
    rows = []
    for s in summaries:
        rows.append([
            s.name, s.mechanism, f"{s.step:,}/{s.steps:,}" + ("" if s.finished else " (running)"),
            _percent(s.best), "" if s.best_step is None else f"{s.best_step:,}",
            _percent(s.test) if s.test is not None else "not yet", _hours(s.elapsed_s),
        ])
    return columns, rows


def plot_curves(summaries: list[RunSummary], path: str | Path, title: str = "") -> Path:
    """Validation score against step, one line per run; written to ``path`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6.4, 4.0))
    for s in summaries:
        if s.curve:
            steps, scores = zip(*s.curve)
            axes.plot(steps, [100 * v for v in scores], marker=".", label=s.name)
    axes.set_xlabel("step")
    axes.set_ylabel(f"validation {summaries[0].metric if summaries else ''} (%)")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def _percent(value: float | None) -> str:
    return "" if value is None else f"{100 * value:.2f}"


def _hours(seconds: float | None) -> str:
    return "" if seconds is None else f"{seconds / 3600:.2f} h"
