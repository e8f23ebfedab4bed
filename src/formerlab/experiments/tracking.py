"""MLflow tracking: a local SQLite store inside the runs directory by default (no server),
any MLflow tracking server when ``tracking.uri`` is set, nothing with ``tracking: none``.

Concurrency. Several processes may share one SQLite store (parallel ``formerlab train`` runs,
sweep workers). MLflow creates the schema and the experiment on first use, and two processes
doing so at once collide (``duplicate column name``, ``experiment already exists``), so that
first use happens under a file lock beside the database (``mlflow.db.lock``, via
``filelock``); later writes are ordinary SQLite transactions. One shared store (rather than
a store per run merged later) keeps every run visible in one ``mlflow ui`` at once.

Resumed runs. A run resumed from its checkpoint replays the steps between that checkpoint
and the interruption; metrics of a step already logged for a key are dropped, so each step
appears once in MLflow.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from formerlab.train.config import RunConfig
from formerlab.train.tracker import Tracker


def default_tracking_uri(runs_dir: str | Path) -> str:
    """``sqlite:///<runs_dir>/mlflow.db`` as an absolute URI."""
    return f"sqlite:///{(Path(runs_dir) / 'mlflow.db').resolve()}"


class MLflowTracker(Tracker):
    """Logs params, metrics (per step), artifacts and the final status to one MLflow run.

    ``parent_run_id`` nests the run under a sweep's parent run. Uses ``MlflowClient``
    directly (no global "active run"), so several trackers can live in one process.
    """

    def __init__(
        self,
        uri: str,
        experiment: str = "formerlab",
        artifact_root: str | Path | None = None,
        parent_run_id: str | None = None,
        tags: dict[str, str] | None = None,
    ) -> None:
        from mlflow.tracking import MlflowClient

        logging.getLogger("mlflow").setLevel(logging.WARNING)
        logging.getLogger("alembic").setLevel(logging.WARNING)
        self.uri = uri
        with store_lock(uri):  # the client may create the schema as it starts
            self.client = MlflowClient(tracking_uri=uri)
            found = self.client.get_experiment_by_name(experiment)
            if found is None:
                location = None
                if artifact_root is not None:
                    location = Path(artifact_root).resolve().as_uri()
                self.experiment_id = self.client.create_experiment(experiment, artifact_location=location)
            else:
                self.experiment_id = found.experiment_id
        self.parent_run_id = parent_run_id
        self.tags = dict(tags or {})
        self.run_id: str | None = None
        self.location = None
        #: drop metrics of steps already logged (a resumed run replays a few); see module doc
        self.skip_logged_steps = True
        self._logged: dict[str, int] = {}

    def start(self, run_name: str, run_dir: Path, params: dict[str, Any]) -> None:
        tags = {"formerlab.run_dir": str(Path(run_dir).resolve()), **self.tags}
        if self.parent_run_id:
            tags["mlflow.parentRunId"] = self.parent_run_id
        marker = Path(run_dir) / "mlflow_run_id"
        if marker.is_file():  # a resumed run continues its MLflow record
            self.run_id = marker.read_text().strip()
            self.client.update_run(self.run_id, status="RUNNING")
            if self.skip_logged_steps:
                self._logged = self._last_logged_steps()
        else:
            run = self.client.create_run(self.experiment_id, run_name=run_name, tags=tags)
            self.run_id = run.info.run_id
            marker.write_text(self.run_id)
            self.log_params(params)
        self.location = f"{self.uri} (experiment id {self.experiment_id}, run id {self.run_id})"

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def _last_logged_steps(self) -> dict[str, int]:
        """The last step logged for each metric of the (resumed) run."""
        keys = self.client.get_run(self.run_id).data.metrics
        return {key: max((m.step for m in self.client.get_metric_history(self.run_id, key)), default=-1)
                for key in keys}

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k.replace("/", "."), float(v), now, step) for k, v in metrics.items()]
        items = [m for m in items if m.step > self._logged.get(m.key, -1)]
        if items:
            self.client.log_batch(self.run_id, metrics=items)

    def log_artifact(self, path: Path) -> None:
        if Path(path).exists():
            self.client.log_artifact(self.run_id, str(path))

    def set_tag(self, key: str, value: str) -> None:
        self.client.set_tag(self.run_id, key, value)

    def finish(self, status: str) -> None:
        if self.run_id is not None:
            self.client.set_terminated(self.run_id, status=status)


def store_lock(uri: str):
    """A file lock beside a ``sqlite:///`` store (a no-op context for other stores)."""
    import contextlib

    from filelock import FileLock

    if not uri.startswith("sqlite:///"):
        return contextlib.nullcontext()
    db = Path(uri.removeprefix("sqlite:///"))
    db.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(db) + ".lock", timeout=120)


def make_tracker(
    cfg: RunConfig, parent_run_id: str | None = None, tags: dict[str, str] | None = None
) -> Tracker:
    """The tracker ``cfg.tracking`` asks for."""
    if cfg.tracking.backend == "none":
        return Tracker()
    uri = cfg.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(cfg.runs_dir)
    Path(cfg.runs_dir).mkdir(parents=True, exist_ok=True)
    return MLflowTracker(
        uri, cfg.tracking.experiment, artifact_root=Path(cfg.runs_dir) / "mlartifacts",
        parent_run_id=parent_run_id, tags=tags,
    )
