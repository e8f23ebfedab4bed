"""One sweep trial, run wherever a backend puts it (this process, a worker process, a Ray
worker): train with an MLflow child run, never let an error escape, write ``result.json``.

Everything a trial needs travels in a plain, picklable ``TrialJob``; everything it
produces is a plain dict (also written to ``TRIAL_DIR/result.json``), so reports and
``--resume`` never need MLflow or the process that ran the trial.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from formerlab.train import loop
from formerlab.train.build import build_task
from formerlab.train.checkpoint import read_config
from formerlab.train.config import validate_config
from formerlab.train.tracker import Tracker

Reporter = Callable[[dict[str, Any]], None]

#: keep at most this many points of the training-loss history in result.json
MAX_HISTORY = 2000


@dataclass
class TrialJob:
    """A trial as data: its config (a JSON-able dict), where it runs, how it is tracked."""

    index: int
    label: str
    labels: dict[str, str]
    key: str
    mechanism: str
    config: dict[str, Any]
    trial_dir: str
    parent_run_id: str | None = None


class ReportingTracker(Tracker):
    """Forwards to the real tracker and reports start / step events for progress bars."""

    def __init__(self, inner: Tracker, job: TrialJob, steps: int, report: Reporter | None) -> None:
        self.inner, self.job, self.steps, self.report = inner, job, steps, report

    @property
    def location(self) -> str | None:  # type: ignore[override]
        return self.inner.location

    def _emit(self, kind: str, **fields: Any) -> None:
        if self.report is not None:
            try:
                self.report({"kind": kind, "index": self.job.index, "label": self.job.label,
                             "steps": self.steps, **fields})
            except Exception:  # noqa: BLE001 - progress display must never fail a trial
                pass

    def start(self, run_name: str, run_dir: Path, params: dict[str, Any]) -> None:
        self.inner.start(run_name, run_dir, params)
        self._emit("start", step=0)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.inner.log_metrics(metrics, step)
        if "train/loss" in metrics:
            self._emit("step", step=step, loss=metrics["train/loss"])

    def log_artifact(self, path: Path) -> None:
        self.inner.log_artifact(path)

    def finish(self, status: str) -> None:
        self.inner.finish(status)


def _reset_peak_rss() -> bool:
    """Reset this process's peak resident set size (Linux), so a trial's peak is its own
    even in a process that ran other trials before."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _rss_mb(field: str = "VmHWM") -> float | None:
    """``VmHWM`` (peak) or ``VmRSS`` (current) resident memory of this process, MiB."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return None
    found = re.search(rf"{field}:\s+(\d+)\s+kB", status)
    return int(found.group(1)) / 1024 if found else None


def _thin(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    if len(history) <= MAX_HISTORY:
        return [{"step": h["step"], "loss": h["loss"]} for h in history]
    stride = -(-len(history) // MAX_HISTORY)
    return [{"step": h["step"], "loss": h["loss"]} for h in history[::stride]]


def _task_facts(cfg) -> tuple[dict[str, Any], Any]:
    task = build_task(cfg)
    facts = {"name": task.name, "kind": task.kind, "main_metric": task.main_metric,
             "higher_is_better": task.higher_is_better, "seq_len": task.max_len,
             "options": cfg.task.options}
    return facts, task


def run_trial(job: TrialJob, report: Reporter | None = None, console=None) -> dict[str, Any]:
    """Train one trial and return its result dict; exceptions become ``status: failed``.

    A trial folder with a checkpoint but no completed result (an interrupted trial) is
    continued from the checkpoint; one whose last attempt failed starts again from scratch.
    ``KeyboardInterrupt`` is not caught: the training loop checkpoints and re-raises it.
    """
    from formerlab.experiments.sweep import COMPLETED, FAILED, RESULT_FILE, read_result, write_json
    from formerlab.experiments.tracking import make_tracker

    trial_dir = Path(job.trial_dir)
    started_wall, started = datetime.now().isoformat(timespec="seconds"), time.perf_counter()
    result: dict[str, Any] = {
        "index": job.index, "label": job.label, "labels": job.labels, "hash": job.key,
        "mechanism": job.mechanism, "dir": str(trial_dir), "config": job.config,
        "started": started_wall, "host": socket.gethostname(), "pid": os.getpid(),
        "task": {"name": job.config.get("task", {}).get("name"), "main_metric": "accuracy"},
    }
    previous = read_result(trial_dir)
    attempts = (previous or {}).get("attempts", 0) + 1
    result["attempts"] = attempts
    tracker: Tracker | None = None
    try:
        cfg = validate_config(job.config)
        resume = None
        if previous is not None:
            shutil.rmtree(trial_dir)  # a failed attempt: start afresh (new MLflow child run too)
        elif (trial_dir / "checkpoint" / "state.json").is_file():
            if read_config(trial_dir) == cfg:
                resume = trial_dir  # interrupted: continue exactly where it stopped
            else:
                shutil.rmtree(trial_dir)  # a stale folder of another config
        trial_dir.mkdir(parents=True, exist_ok=True)
        result["task"], task = _task_facts(cfg)
        inner = make_tracker(cfg, parent_run_id=job.parent_run_id, tags={
            "formerlab.trial": job.label, "formerlab.trial_hash": job.key,
            "formerlab.mechanism": job.mechanism,
        })
        tracker = ReportingTracker(inner, job, cfg.train.steps, report)
        measured_rss = _reset_peak_rss() and not cfg.train.device.startswith("cuda")
        rss_start = _rss_mb("VmRSS") if measured_rss else None
        if cfg.train.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        train_started = time.perf_counter()
        out = loop.train(cfg, run_dir=None if resume else trial_dir, resume=resume,
                         tracker=tracker, progress=False, console=console)
        peak = _rss_mb() if measured_rss else None
        result.update(
            status=COMPLETED, steps=out.step, metrics=out.metrics, evals=out.evals,
            history=_thin(out.history), parameters=out.parameters,
            tokens_per_s=out.tokens_per_s, train_s=time.perf_counter() - train_started,
            batch_size=cfg.train.batch_size,
            peak_memory_mb=peak if peak is not None else out.peak_memory_mb,
            # what the trial added on top of the process it ran in (imports, earlier trials)
            memory_increase_mb=peak - rss_start if peak is not None and rss_start is not None else None,
            diagnostics=out.diagnostics, resumed_from_checkpoint=resume is not None,
        )
        result["task"]["baseline"] = task.baseline()
    except Exception as error:  # noqa: BLE001 - fault isolation: record and go on
        result.update(status=FAILED, error=f"{type(error).__name__}: {error}",
                      traceback=traceback.format_exc(limit=8))
    result["finished"] = datetime.now().isoformat(timespec="seconds")
    result["duration_s"] = time.perf_counter() - started
    _close_tracker(tracker, job, result)
    write_json(trial_dir / RESULT_FILE, result)
    return result


def _close_tracker(tracker: ReportingTracker | None, job: TrialJob, result: dict[str, Any]) -> None:
    """Record the outcome on the child run (creating it if the trial failed before start)."""
    if tracker is None:
        return
    inner = tracker.inner
    try:
        if hasattr(inner, "run_id") and inner.run_id is None:
            inner.start(job.config.get("name", job.label), Path(job.trial_dir), {"trial": job.label})
        setter = getattr(inner, "set_tag", None)
        if setter is None:
            return
        setter("formerlab.status", result["status"])
        if result["status"] != "completed":
            setter("formerlab.error", result["error"][:4000])
            inner.log_artifact(Path(job.trial_dir) / "config.yaml")
            inner.finish("FAILED")
        else:
            inner.log_metrics({"trial/duration_s": result["duration_s"],
                               "trial/peak_memory_mb": result["peak_memory_mb"]}, result["steps"])
    except Exception as error:  # noqa: BLE001 - tracking trouble must not lose the result
        result["tracking_error"] = f"{type(error).__name__}: {error}"
