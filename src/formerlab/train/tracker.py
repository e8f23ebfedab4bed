"""What the training loop reports to. The loop knows only this interface; concrete
trackers (MLflow) live in ``formerlab.experiments.tracking``."""

from __future__ import annotations

from pathlib import Path
from typing import Any


class Tracker:
    """A tracker that records nothing; subclasses override what they store."""

    #: Human-readable location of the record (printed at the end of a run), or None.
    location: str | None = None

    def start(self, run_name: str, run_dir: Path, params: dict[str, Any]) -> None:
        """Called once before the first step (also on resume)."""

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Scalar metrics at a training step."""

    def log_artifact(self, path: Path) -> None:
        """A file produced by the run (config, sample, plots)."""

    def finish(self, status: str) -> None:
        """``"FINISHED"``, ``"FAILED"`` or ``"KILLED"``."""
