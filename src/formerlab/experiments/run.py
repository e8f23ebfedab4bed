"""A tracked training run: the config's tracker around ``formerlab.train.train``."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from formerlab.experiments.tracking import make_tracker
from formerlab.train import RunConfig, TrainResult, train
from formerlab.train.resume import resume_config


def run_training(
    cfg: RunConfig | None = None,
    resume: str | Path | None = None,
    progress: bool = True,
    console: Console | None = None,
    overrides: list[str] | None = None,
    **train_options,
) -> tuple[TrainResult, str | None]:
    """Train with tracking as configured; returns ``(result, where the record is)``.

    ``resume=RUN_DIR, overrides=["train.steps=2000"]`` continues a run with the keys a
    resumed run may change (``formerlab.train.resume.RESUMABLE_KEYS``), e.g. to extend a
    finished run; an edited ``RUN_DIR/config.yaml`` or another key is refused (``ConfigError``).
    """
    if overrides and resume is None:
        raise ValueError("run_training(overrides=...) is for resume=RUN_DIR; apply them to cfg "
                         "with load_config(path, overrides) for a new run")
    tracked_cfg = resume_config(resume, overrides) if resume is not None else cfg
    if tracked_cfg is None:
        raise ValueError("run_training() needs cfg=... or resume=RUN_DIR")
    tracker = make_tracker(tracked_cfg)
    result = train(cfg, resume=resume, tracker=tracker, progress=progress, console=console,
                   overrides=overrides, **train_options)
    return result, tracker.location
