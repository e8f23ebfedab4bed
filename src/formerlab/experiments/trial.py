"""One sweep trial, run wherever a backend puts it (this process, a worker process, a Ray
worker): train with an MLflow child run, never let an error escape, write ``result.json``.

Everything a trial needs travels in a plain, picklable ``TrialJob``; everything it
produces is a plain dict (also written to ``TRIAL_DIR/result.json``), so reports and
``--resume`` never need MLflow or the process that ran the trial.

Ownership. A trial folder belongs to one process at a time: ``TRIAL_DIR/owner.lock`` holds
the owner's pid, host and process start time, and is created with ``O_CREAT | O_EXCL`` (of
processes racing for it exactly one succeeds). A lock whose owner is no longer running (same
host; a zombie or a pid reused by another process counts as gone) is taken over, and the
take-over is reported; a lock of a live owner is never touched. ``TRIAL_DIR/attempts``
counts every process start on the trial, so ``attempts`` in ``result.json`` is truthful
across crashes and resumes.
"""

from __future__ import annotations

import fcntl
import json
import os
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

from formerlab.experiments.results import COMPLETED, FAILED, RESULT_FILE, read_result, write_json
from formerlab.train import loop
from formerlab.train.build import build_task
from formerlab.train.checkpoint import CheckpointError, has_checkpoint, read_config
from formerlab.train.config import validate_config
from formerlab.train.tracker import Tracker

Reporter = Callable[[dict[str, Any]], None]

#: keep at most this many points of the training-loss history in result.json
MAX_HISTORY = 2000
LOCK_FILE = "owner.lock"
ATTEMPTS_FILE = "attempts"


# --- ownership of a trial folder ----------------------------------------------------------


class TrialLocked(RuntimeError):
    """The trial folder is owned by another process that is still running."""

    def __init__(self, trial_dir: Path, owner: dict[str, Any]) -> None:
        self.trial_dir, self.owner = Path(trial_dir), owner
        super().__init__(
            f"trial folder {str(trial_dir)!r} is in use by process {owner.get('pid')} on "
            f"{owner.get('host')} (lock {str(Path(trial_dir) / LOCK_FILE)!r}); wait for it to "
            "finish or stop it, then --resume (delete the lock only if that process is gone)"
        )


def _start_time(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (Linux), to tell a reused pid from the owner."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def pid_alive(pid: int, start: str | None = None) -> bool:
    """Whether process ``pid`` runs (not a zombie; with ``start``, not a reused pid)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    if state in ("Z", "X"):
        return False
    return start is None or _start_time(pid) in (None, start)


def read_owner(trial_dir: str | Path) -> dict[str, Any] | None:
    """The owner recorded in a trial's lock file (``{}`` while it is being written), or None."""
    try:
        text = (Path(trial_dir) / LOCK_FILE).read_text()
    except FileNotFoundError:
        return None
    try:
        owner = json.loads(text)
    except json.JSONDecodeError:
        return {}
    return owner if isinstance(owner, dict) else {}


def owner_alive(owner: dict[str, Any], lock: Path | None = None) -> bool:
    """Whether a lock's owner still runs. Owners on other hosts cannot be checked: alive. A
    lock left half-written (empty) counts as alive for 30 s, then as abandoned."""
    if not owner:
        try:
            return lock is not None and time.time() - lock.stat().st_mtime < 30
        except OSError:
            return False
    if owner.get("host") != socket.gethostname():
        return True
    return isinstance(owner.get("pid"), int) and pid_alive(owner["pid"], owner.get("start"))


def _create_lock(lock: Path) -> bool:
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    me = {"pid": os.getpid(), "host": socket.gethostname(), "start": _start_time(os.getpid()),
          "since": datetime.now().isoformat(timespec="seconds")}
    with os.fdopen(fd, "w") as handle:
        handle.write(json.dumps(me))
        handle.flush()
        os.fsync(handle.fileno())
    return True


def acquire_lock(trial_dir: str | Path) -> dict[str, Any] | None:
    """Make this process the owner of ``trial_dir``; returns the dead owner it took over
    from (or None). Raises ``TrialLocked`` while another live process owns it."""
    trial_dir = Path(trial_dir)
    trial_dir.mkdir(parents=True, exist_ok=True)
    lock = trial_dir / LOCK_FILE
    if _create_lock(lock):
        return None
    # take-overs are serialised by a kernel lock (released by the kernel if we die)
    with open(trial_dir / (LOCK_FILE + ".guard"), "a") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)
        owner = read_owner(trial_dir)
        if owner is not None and owner_alive(owner, lock):
            raise TrialLocked(trial_dir, owner)
        lock.unlink(missing_ok=True)
        if not _create_lock(lock):  # a fresh owner slipped in between
            raise TrialLocked(trial_dir, read_owner(trial_dir) or {})
    return owner or {"pid": None}


def release_lock(trial_dir: str | Path) -> None:
    """Remove the lock if this process owns it."""
    owner = read_owner(trial_dir)
    if owner and owner.get("pid") == os.getpid() and owner.get("host") == socket.gethostname():
        (Path(trial_dir) / LOCK_FILE).unlink(missing_ok=True)


def release_dead_lock(trial_dir: str | Path) -> None:
    """Remove the lock of an owner that is no longer running (after its worker died)."""
    lock = Path(trial_dir) / LOCK_FILE
    owner = read_owner(trial_dir)
    if owner is not None and not owner_alive(owner, lock):
        lock.unlink(missing_ok=True)


def read_attempts(trial_dir: str | Path) -> int:
    """How many processes have started on this trial so far."""
    try:
        return int((Path(trial_dir) / ATTEMPTS_FILE).read_text().strip() or 0)
    except (FileNotFoundError, ValueError):
        return 0


def _clear_folder(trial_dir: Path) -> None:
    """Delete a trial folder's contents except the lock and the attempt count."""
    keep = {LOCK_FILE, LOCK_FILE + ".guard", ATTEMPTS_FILE}
    for child in trial_dir.iterdir():
        if child.name in keep:
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


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
    #: processes its launcher started on this trial before (a worker killed before it
    #: could count itself still counts)
    attempts_before: int = 0


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

    The trial folder is locked for the run (see the module docstring); a folder owned by a
    live process is left alone (the result says so and nothing is written). A folder with a
    checkpoint but no completed result (an interrupted trial) is continued from the
    checkpoint; one whose last attempt failed starts again from scratch.
    ``KeyboardInterrupt`` is not caught: the training loop checkpoints and re-raises it.
    """
    trial_dir = Path(job.trial_dir)
    result: dict[str, Any] = {
        "index": job.index, "label": job.label, "labels": job.labels, "hash": job.key,
        "mechanism": job.mechanism, "dir": str(trial_dir), "config": job.config,
        "host": socket.gethostname(), "pid": os.getpid(),
        "task": {"name": job.config.get("task", {}).get("name"), "main_metric": "accuracy"},
    }
    try:
        stolen = acquire_lock(trial_dir)
    except (TrialLocked, OSError) as error:  # not ours: write nothing into the folder
        return {**result, "status": FAILED, "error": f"{type(error).__name__}: {error}",
                "duration_s": 0.0, "attempts": read_attempts(trial_dir), "locked": True}
    threads = torch.get_num_threads()
    try:
        if stolen is not None:
            result["took_over_lock_of_pid"] = stolen.get("pid")
        return _run_locked(job, trial_dir, result, report, console)
    finally:
        torch.set_num_threads(threads)  # in-process trials pin their own thread count
        release_lock(trial_dir)


def _run_locked(job: TrialJob, trial_dir: Path, result: dict[str, Any], report: Reporter | None,
                console) -> dict[str, Any]:
    from formerlab.experiments.tracking import make_tracker

    started_wall, started = datetime.now().isoformat(timespec="seconds"), time.perf_counter()
    result["started"] = started_wall
    previous = read_result(trial_dir)
    attempts = max(read_attempts(trial_dir), (previous or {}).get("attempts", 0), job.attempts_before) + 1
    (trial_dir / ATTEMPTS_FILE).write_text(str(attempts))
    result["attempts"] = attempts
    tracker: Tracker | None = None
    try:
        cfg = validate_config(job.config)
        resume = None
        if previous is not None:
            _clear_folder(trial_dir)  # a failed attempt: start afresh (new MLflow child run too)
        elif has_checkpoint(trial_dir):
            try:
                stored = read_config(trial_dir)
            except CheckpointError:
                stored = None  # a damaged checkpoint: start the trial afresh
            if stored == cfg:
                resume = trial_dir  # interrupted: continue exactly where it stopped
            else:
                _clear_folder(trial_dir)  # a stale folder of another config
        result["task"], task = _task_facts(cfg)
        inner = make_tracker(cfg, parent_run_id=job.parent_run_id, tags={
            "formerlab.trial": job.label, "formerlab.trial_hash": job.key,
            "formerlab.mechanism": job.mechanism,
        })
        tracker = ReportingTracker(inner, job, cfg.train.steps, report)
        train_started = time.perf_counter()
        out = loop.train(cfg, run_dir=None if resume else trial_dir, resume=resume,
                         tracker=tracker, progress=False, console=console)
        result.update(
            status=COMPLETED, steps=out.step, metrics=out.metrics, evals=out.evals,
            history=_thin(out.history), parameters=out.parameters,
            tokens_per_s=out.tokens_per_s, train_s=time.perf_counter() - train_started,
            batch_size=cfg.train.batch_size, threads=torch.get_num_threads(),
            # the work's peak (model, optimizer, activations) above what the process held
            # before the model was built: not torch's imports nor earlier trials
            # (formerlab.train.memory; allocator peak on CUDA, resident-set peak on CPU)
            work_memory_mb=out.peak_memory_mb,
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
        if result["status"] != COMPLETED:
            setter("formerlab.error", result["error"][:4000])
            inner.log_artifact(Path(job.trial_dir) / "config.yaml")
            inner.finish("FAILED")
        else:
            inner.log_metrics({"trial/duration_s": result["duration_s"],
                               "trial/work_memory_mb": result["work_memory_mb"]}, result["steps"])
    except Exception as error:  # noqa: BLE001 - tracking trouble must not lose the result
        result["tracking_error"] = f"{type(error).__name__}: {error}"
