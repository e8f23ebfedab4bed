"""Where trials run: this process, N spawned worker processes, or Ray tasks.

A backend's ``run(jobs, on_event, on_done)`` runs every ``TrialJob``, calls ``on_event``
(unless None) with progress events (``start`` / ``step``) as they arrive and ``on_done``
with each result dict as soon as its trial ends, in the calling thread. A trial never raises (see
``trial.run_trial``); a worker that dies outright (killed, out of memory) turns its trial
into a failed result and the rest go on.
"""

from __future__ import annotations

import multiprocessing
import os
import queue as queue_module
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from datetime import datetime
from pathlib import Path
from typing import Any

from formerlab.experiments.trial import TrialJob, run_trial

EventFn = Callable[[dict[str, Any]], None] | None
DoneFn = Callable[[dict[str, Any]], None]

#: environment variables a remote worker needs to find data and the tracking server
FORWARDED_ENV = ("FORMERLAB_DATA", "MLFLOW_TRACKING_URI")


def crashed_result(job: TrialJob, message: str) -> dict[str, Any]:
    """The failed result of a trial whose worker died without reporting; written to disk."""
    from formerlab.experiments.sweep import FAILED, RESULT_FILE, read_result, write_json

    previous = read_result(Path(job.trial_dir)) or {}
    result = {
        "index": job.index, "label": job.label, "labels": job.labels, "hash": job.key,
        "mechanism": job.mechanism, "dir": job.trial_dir, "config": job.config,
        "task": {"name": job.config.get("task", {}).get("name"), "main_metric": "accuracy"},
        "status": FAILED, "error": message, "duration_s": 0.0,
        "attempts": previous.get("attempts", 0) + 1,
        "finished": datetime.now().isoformat(timespec="seconds"),
    }
    write_json(Path(job.trial_dir) / RESULT_FILE, result)
    return result


class LocalBackend:
    """``workers=1``: trials one after another in this process. ``workers>1``: a pool of
    that many spawned processes (spawn, not fork: torch and MLflow state must not be
    inherited), each with ``cpu_count // workers`` torch threads and a fresh process for
    every trial."""

    def __init__(self, workers: int = 1) -> None:
        self.workers = workers

    def run(self, jobs: list[TrialJob], on_event: EventFn, on_done: DoneFn) -> None:
        if self.workers == 1:
            for job in jobs:
                on_done(run_trial(job, report=on_event))
            return
        on_event = on_event or (lambda event: None)
        self._run_pool(jobs, on_event, on_done)

    def _run_pool(self, jobs: list[TrialJob], on_event: EventFn, on_done: DoneFn) -> None:
        context = multiprocessing.get_context("spawn")
        events = context.Queue()
        threads = max(1, (os.cpu_count() or 1) // self.workers)
        pending = list(jobs)
        claimed: set[int] = set()
        crashes: dict[int, int] = {}

        def drain() -> None:
            while True:
                try:
                    event = events.get_nowait()
                except queue_module.Empty:
                    return
                if event["kind"] == "claimed":
                    claimed.add(event["index"])
                else:
                    on_event(event)

        while pending:
            # a fresh process per trial: nothing leaks between trials, and each trial's
            # peak memory is its own (the cost: one interpreter start-up per trial)
            pool = ProcessPoolExecutor(
                max_workers=min(self.workers, len(pending)), mp_context=context,
                initializer=_init_worker, initargs=(events, threads), max_tasks_per_child=1,
            )
            futures = {pool.submit(_pool_run, job): job for job in pending}
            broken = False
            try:
                while futures:
                    finished, _ = wait(futures, timeout=0.25, return_when=FIRST_COMPLETED)
                    drain()
                    for future in finished:
                        job = futures.pop(future)
                        try:
                            result = future.result()
                        except BrokenProcessPool:
                            broken = True  # decided below, once every event is in
                            continue
                        pending.remove(job)
                        on_done(result)
                    if broken:
                        break
            except BaseException:
                pool.shutdown(wait=False, cancel_futures=True)
                raise
            pool.shutdown(wait=not broken, cancel_futures=True)
            if broken:
                drain()
                for future, job in futures.items():  # finished just before the pool broke
                    if future.done() and not future.cancelled() and future.exception() is None:
                        pending.remove(job)
                        on_done(future.result())
                # A dead worker breaks the whole pool, so the trials running beside the one
                # that died are cut short too. Each trial running at a crash gets one more
                # try; at its second crash it is recorded as failed. The rest simply rerun.
                for job in [j for j in pending if j.index in claimed]:
                    crashes[job.index] = crashes.get(job.index, 0) + 1
                    if crashes[job.index] >= 2:
                        pending.remove(job)
                        on_done(crashed_result(job, "worker process died while running this "
                                                    "trial, twice (killed or out of memory?)"))
                claimed.clear()


_EVENTS: Any = None


def _init_worker(events: Any, threads: int) -> None:
    global _EVENTS
    _EVENTS = events
    import torch

    torch.set_num_threads(threads)


def _pool_run(job: TrialJob) -> dict[str, Any]:
    _EVENTS.put({"kind": "claimed", "index": job.index})
    return run_trial(job, report=_EVENTS.put)


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
        from formerlab.experiments.sweep import RESULT_FILE, write_json

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
