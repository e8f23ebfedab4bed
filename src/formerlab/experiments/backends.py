"""Where trials run: this process, N spawned worker processes, or Ray tasks.

A backend's ``run(jobs, on_event, on_done)`` runs every ``TrialJob``, calls ``on_event``
(unless None) with progress events (``start`` / ``step``) as they arrive and ``on_done``
with each result dict as soon as its trial ends, in the calling thread. A trial never raises (see
``trial.run_trial``); a worker that dies outright (killed, out of memory) turns its trial
into a failed result and the rest go on.

Worker processes (``LocalBackend(workers > 1)``): one spawned process per trial, each with
its own one-way pipe to the parent (a worker killed mid-message corrupts only its own pipe;
a shared queue would leave its lock held and hang every other worker). Workers die with
their parent, however it ends (SIGKILL included), by two independent means:

* ``prctl(PR_SET_PDEATHSIG, SIGKILL)`` (Linux, via ctypes): the kernel kills the worker the
  moment its parent dies, even while it is deep in a C kernel holding the GIL;
* a pipe-EOF watchdog thread (any POSIX system): the worker blocks reading a pipe whose only
  write end the parent holds; the kernel closes it when the parent dies, the read returns
  EOF and the worker exits at once. Unlike polling ``getppid()`` this has no delay and no
  pid-reuse race.

Only the trial whose worker died is charged: it gets one more try (continuing from its
checkpoint), and at its second death is recorded as failed; the trials running beside it
are not affected.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import pickle
import signal
import sys
import threading
from collections.abc import Callable
from datetime import datetime
from multiprocessing.connection import wait as wait_for
from pathlib import Path
from typing import Any

from formerlab.experiments.results import FAILED, RESULT_FILE, read_result, write_json
from formerlab.experiments.trial import TrialJob, read_attempts, release_dead_lock, run_trial

EventFn = Callable[[dict[str, Any]], None] | None
DoneFn = Callable[[dict[str, Any]], None]

#: environment variables a remote worker needs to find data and the tracking server
FORWARDED_ENV = ("FORMERLAB_DATA", "MLFLOW_TRACKING_URI")
#: exit status of a worker that found its parent gone
EXIT_ORPHANED = 75
#: a trial whose worker dies this many times is recorded as failed
MAX_WORKER_DEATHS = 2


def crashed_result(job: TrialJob, message: str, attempts: int = 0) -> dict[str, Any]:
    """The failed result of a trial whose worker died without reporting; written to disk.
    ``attempts``: the processes started on it as far as the caller knows."""
    previous = read_result(Path(job.trial_dir)) or {}
    result = {
        "index": job.index, "label": job.label, "labels": job.labels, "hash": job.key,
        "mechanism": job.mechanism, "dir": job.trial_dir, "config": job.config,
        "task": {"name": job.config.get("task", {}).get("name"), "main_metric": "accuracy"},
        "status": FAILED, "error": message, "duration_s": 0.0,
        # every start of a worker on the trial counted itself in TRIAL_DIR/attempts
        "attempts": max(read_attempts(job.trial_dir), previous.get("attempts", 0) + 1, attempts),
        "finished": datetime.now().isoformat(timespec="seconds"),
    }
    release_dead_lock(job.trial_dir)
    write_json(Path(job.trial_dir) / RESULT_FILE, result)
    return result


def _attempts_on_disk(job: TrialJob) -> int:
    previous = read_result(Path(job.trial_dir)) or {}
    return max(read_attempts(job.trial_dir), previous.get("attempts", 0))


def describe_exit(code: int | None) -> str:
    """``killed by SIGKILL`` / ``exit status 3`` for a worker's ``exitcode``."""
    if code is not None and code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        hint = " (killed, or out of memory?)" if -code == signal.SIGKILL else ""
        return f"killed by {name}{hint}"
    return f"exit status {code}"


class _Worker:
    """One running trial: its process and the pipe it reports through."""

    def __init__(self, job: TrialJob, process: Any, conn: Any) -> None:
        self.job, self.process, self.conn = job, process, conn
        self.result: dict[str, Any] | None = None

    def receive(self, on_event: Callable[[dict[str, Any]], None]) -> None:
        """Read every message waiting on the pipe; a broken pipe is closed."""
        while self.conn is not None:
            try:
                if not self.conn.poll():
                    return
                message = self.conn.recv()
            except (EOFError, OSError, ValueError, TypeError, AttributeError, ImportError,
                    pickle.UnpicklingError):
                self.conn.close()
                self.conn = None  # closed, or a message cut short by a kill
                return
            if message.get("kind") == "result":
                self.result = message["result"]
            else:
                on_event(message)


class LocalBackend:
    """``workers=1``: trials one after another in this process. ``workers>1``: up to that
    many spawned processes at a time (spawn, not fork: torch and MLflow state must not be
    inherited), a fresh process for every trial. A trial's torch thread count is part of its
    config (``train.threads``, pinned by the sweep), not derived from ``workers``."""

    def __init__(self, workers: int = 1) -> None:
        self.workers = workers

    def run(self, jobs: list[TrialJob], on_event: EventFn, on_done: DoneFn) -> None:
        if self.workers == 1:
            for job in jobs:
                on_done(run_trial(job, report=on_event))
            return
        self._run_processes(jobs, on_event or (lambda event: None), on_done)

    def _run_processes(self, jobs: list[TrialJob], on_event: Callable, on_done: DoneFn) -> None:
        context = multiprocessing.get_context("spawn")
        alive_read, alive_write = context.Pipe(duplex=False)  # EOF in a worker = parent gone
        pending = list(jobs)
        running: list[_Worker] = []
        deaths: dict[int, int] = {}
        # processes started on each trial before this call (from disk) and by this call
        earlier = {job.index: _attempts_on_disk(job) for job in jobs}
        starts: dict[int, int] = {}
        try:
            while pending or running:
                while pending and len(running) < self.workers:
                    job = pending.pop(0)
                    job.attempts_before = earlier[job.index] + starts.get(job.index, 0)
                    starts[job.index] = starts.get(job.index, 0) + 1
                    reader, writer = context.Pipe(duplex=False)
                    process = context.Process(
                        target=_worker_main, args=(job, writer, alive_read, os.getpid()),
                        name=f"formerlab-trial-{job.index}",
                    )
                    process.start()
                    writer.close()  # the worker holds the only write end: EOF when it ends
                    running.append(_Worker(job, process, reader))
                waitables = [w.conn for w in running if w.conn is not None]
                wait_for(waitables + [w.process.sentinel for w in running], timeout=0.5)
                for worker in list(running):
                    worker.receive(on_event)
                    if worker.process.exitcode is None:
                        continue
                    worker.process.join()
                    worker.receive(on_event)  # whatever it sent just before exiting
                    running.remove(worker)
                    if worker.conn is not None:
                        worker.conn.close()
                    job = worker.job
                    if worker.result is not None:
                        on_done(worker.result)
                        continue
                    deaths[job.index] = deaths.get(job.index, 0) + 1
                    how = describe_exit(worker.process.exitcode)
                    if deaths[job.index] >= MAX_WORKER_DEATHS:
                        on_done(crashed_result(
                            job, f"worker process died {deaths[job.index]} times while running "
                            f"this trial (last: {how})", attempts=earlier[job.index] + starts[job.index]))
                    else:  # only this trial is charged; it continues from its checkpoint
                        on_event({"kind": "worker-died", "index": job.index, "label": job.label,
                                  "how": how})
                        release_dead_lock(job.trial_dir)
                        pending.insert(0, job)
        finally:
            _stop(running)
            alive_write.close()
            alive_read.close()


def _stop(running: list[_Worker], grace_s: float = 10.0) -> None:
    """On an interrupt: give workers ``grace_s`` to checkpoint (they got the Ctrl-C too),
    then kill what is left."""
    import time

    deadline = time.monotonic() + grace_s
    for worker in running:
        worker.process.join(max(0.0, deadline - time.monotonic()))
    for worker in running:
        if worker.process.is_alive():
            worker.process.kill()
            worker.process.join(5)
        if worker.conn is not None:
            worker.conn.close()


def die_with_parent(alive: Any, parent_pid: int, pdeathsig: bool = True) -> None:
    """Make this worker exit when ``parent_pid`` dies (see the module docstring): the
    parent-death signal (``pdeathsig``, Linux) and, given the read end ``alive`` of a pipe
    only the parent writes to, the pipe-EOF watchdog. A third, slower net: a worker whose
    progress report finds the pipe to the parent broken exits too (``_worker_main``)."""
    if pdeathsig and sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent_pid:  # it died before the line above took effect
        os._exit(EXIT_ORPHANED)
    if alive is None:
        return

    def watch() -> None:
        try:
            alive.recv()  # the parent never writes: this returns only with EOF
        except (EOFError, OSError):
            pass
        os._exit(EXIT_ORPHANED)

    threading.Thread(target=watch, name="formerlab-parent-watchdog", daemon=True).start()


def _worker_main(job: TrialJob, conn: Any, alive: Any, parent_pid: int) -> None:
    die_with_parent(alive, parent_pid)

    def report(event: dict[str, Any]) -> None:
        try:
            conn.send(event)
        except (BrokenPipeError, OSError):
            os._exit(EXIT_ORPHANED)  # nobody reads any more

    try:
        result = run_trial(job, report=report)
    except KeyboardInterrupt:  # Ctrl-C reached the whole process group; checkpoint is saved
        os._exit(130)
    report({"kind": "result", "result": result})
    conn.close()


class RayBackend:
    """Each trial is a Ray task (1 CPU, no retries). Without ``address`` a local Ray
    instance with ``workers`` CPUs is started and shut down afterwards; with ``address``
    (``auto`` or ``ray://host:port``) the trials go to that cluster. On a cluster, trial
    folders live where the trial ran unless the sweep folder is on shared storage; the
    result dicts always come back and are written into the sweep folder here."""

    def __init__(self, workers: int | None = None, address: str | None = None) -> None:
        self.workers = workers
        self.address = address

    def run(self, jobs: list[TrialJob], on_event: EventFn, on_done: DoneFn) -> None:
        try:
            import ray
            from ray.util.queue import Empty, Queue
        except ImportError:
            raise ValueError(
                "backend='ray' needs Ray: pip install 'formerlab[ray]'"
            ) from None

        started_here = not ray.is_initialized()
        if started_here:
            env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
            ray.init(
                address=self.address,
                num_cpus=None if self.address else (self.workers or os.cpu_count() or 1),
                include_dashboard=False, log_to_driver=False, configure_logging=False,
                runtime_env={"env_vars": env} if env else None,
            )
        refs: dict[Any, TrialJob] = {}
        try:
            # progress events travel through a queue actor, only when someone shows them
            events = Queue(actor_options={"num_cpus": 0}) if on_event is not None else None
            remote = ray.remote(num_cpus=1, max_retries=0)(_ray_run)
            refs = {remote.remote(job, events): job for job in jobs}

            def drain() -> None:
                while events is not None:
                    try:
                        on_event(events.get_nowait())
                    except Empty:
                        return

            while refs:
                ready, _ = ray.wait(list(refs), num_returns=1, timeout=0.25)
                drain()
                for ref in ready:
                    job = refs.pop(ref)
                    try:
                        result = ray.get(ref)
                    except Exception as error:  # noqa: BLE001 - the worker died: record it
                        result = crashed_result(job, f"Ray task failed: {type(error).__name__}: {error}")
                    # the trial ran maybe on another machine: keep its result here too
                    write_json(Path(job.trial_dir) / RESULT_FILE, result)
                    on_done(result)
        finally:
            for ref in refs:
                ray.cancel(ref, force=True)
            if started_here:
                ray.shutdown()


def _ray_run(job: TrialJob, events: Any) -> dict[str, Any]:
    def report(event: dict[str, Any]) -> None:
        events.put_nowait(event)

    return run_trial(job, report=report if events is not None else None)


def make_backend(name: str, workers: int | None = 1, address: str | None = None):
    """``"local"`` or ``"ray"``; ``workers`` processes / CPUs, ``address`` a Ray cluster."""
    if name == "local":
        return LocalBackend(workers or 1)
    if name == "ray":
        return RayBackend(workers, address)
    raise ValueError(f"backend={name!r} is not allowed; expected one of ['local', 'ray']")
