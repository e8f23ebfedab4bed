"""A tracked training run: the config's tracker around ``formerlab.train.train``."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from formerlab.experiments.tracking import make_tracker
from formerlab.train import RunConfig, TrainResult, train
from formerlab.train.checkpoint import read_config


def run_training(
    cfg: RunConfig | None = None,
    resume: str | Path | None = None,
    progress: bool = True,
    console: Console | None = None,
    **train_options,
) -> tuple[TrainResult, str | None]:
    """Train with tracking as configured; returns ``(result, where the record is)``."""
    tracked_cfg = read_config(resume) if resume is not None else cfg
    if tracked_cfg is None:
        raise ValueError("run_training() needs cfg=... or resume=RUN_DIR")
    tracker = make_tracker(tracked_cfg)
    result = train(cfg, resume=resume, tracker=tracker, progress=progress, console=console, **train_options)
    return result, tracker.location
