"""Sweeps under faults: a killed parent leaves no orphans, a killed worker charges only its
own trial, trial folders have one owner, resume refuses other settings, exit status."""

import io
import json
import os
import signal
import time
from pathlib import Path

import pytest
import yaml
from rich.console import Console
from typer.testing import CliRunner

from formerlab.cli import EXIT_TRIALS_FAILED, app
from formerlab.experiments.sweep import COMPLETED, FAILED, expand, load_sweep, run_sweep
from formerlab.experiments.trial import LOCK_FILE, TrialLocked, acquire_lock, pid_alive, read_owner
from formerlab.train import ConfigError

from .conftest import fork_cli, forked_result

BASE = {
    "task": {"name": "sort", "options": {"length": 4, "num_values": 5}},
    "model": {"dim": 16, "depth": 1, "heads": 2},
    "train": {"steps": 12, "batch_size": 8, "warmup": 2, "eval_every": 6, "eval_batches": 1,
              "log_every": 3},
    "tracking": "none",
}
# long enough to be killed mid-training, checkpointed often enough to resume cheaply
SLOW = {"train.steps": 300, "train.eval_every": 300, "train.checkpoint_every": 20}
LONG = {**SLOW, "train.steps": 600, "train.eval_every": 600}


def write_sweep(tmp_path, trials, name="faults"):
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"name": name, "base": BASE, "trials": trials}, sort_keys=False))
    return path


def wait_until(predicate, timeout=180.0, what="condition", process=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if process is not None and process.exitcode is not None:
            raise AssertionError(f"the sweep ended while waiting for {what}")
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def owner_pid(trial_dir):
    owner = read_owner(trial_dir)
    return owner.get("pid") if owner else None


def trial_dirs(out):
    return sorted((out / "trials").glob("*-*"), key=lambda p: p.name)


def test_killed_parent_takes_its_workers_along_and_resume_takes_over_their_locks(tmp_path):
    path = write_sweep(tmp_path, [{"label": "a", **LONG}, {"label": "b", "model.dim": 8, **LONG}])
    out = tmp_path / "sweep"
    parent = fork_cli(["ablate", str(path), "--out", str(out), "--workers", "2", "--no-progress"],
                      tmp_path / "parent.txt")

    def training():  # both trials started, at least one checkpointed and still running
        dirs = trial_dirs(out)
        if len(dirs) == 2 and all(owner_pid(d) for d in dirs) and any(
                (d / "checkpoint" / "state.json").is_file() and not (d / "result.json").exists()
                for d in dirs):
            return dirs
        return None

    dirs = wait_until(training, what="the trials to checkpoint", process=parent)
    os.kill(parent.pid, signal.SIGKILL)
    parent.join(10)
    running = {d: owner_pid(d) for d in dirs if not (d / "result.json").exists()}
    assert running and parent.pid not in running.values()
    wait_until(lambda: not any(pid_alive(pid) for pid in running.values()), timeout=10,
               what="the orphaned workers to die")
    assert not any((d / "result.json").exists() for d in running)  # no "failed" from orphans

    log = io.StringIO()
    outcome = run_sweep(path, out=out, resume=True, progress=False,
                        console=Console(file=log, width=1000))
    said = log.getvalue()
    assert outcome.completed == 2
    for d, pid in running.items():
        assert f"taking over the lock of process {pid}, which is no longer running" in said
        result = json.loads((d / "result.json").read_text())
        assert result["took_over_lock_of_pid"] == pid and result["steps"] == 600
        assert result["attempts"] == 2  # the killed process, then this one
    assert not any((d / LOCK_FILE).exists() for d in dirs)  # released when done


def test_a_worker_killed_twice_fails_only_its_own_trial_and_ablate_exits_non_zero(tmp_path):
    path = write_sweep(tmp_path, [{"label": "victim", **SLOW},
                                  {"label": "neighbour", "model.dim": 8, **SLOW}])
    out = tmp_path / "sweep"
    parent = fork_cli(["ablate", str(path), "--out", str(out), "--workers", "2", "--no-progress"],
                      tmp_path / "parent.txt")
    victim = wait_until(lambda: next(iter((out / "trials").glob("victim-*")), None), what="victim",
                        process=parent)
    killed = []
    for _ in range(2):
        pid = wait_until(lambda: (p := owner_pid(victim)) not in (None, *killed) and p,
                         what="a worker", process=parent)
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)
    parent.join(240)
    code, output = forked_result(tmp_path / "parent.txt", parent)
    assert code == EXIT_TRIALS_FAILED, output
    assert "1 trial(s) failed" in output and "worker died" in output
    results = {p.parent.name.split("-")[0]: json.loads(p.read_text())
               for p in (out / "trials").glob("*/result.json")}
    assert results["victim"]["status"] == FAILED
    assert "died 2 times" in results["victim"]["error"] and "SIGKILL" in results["victim"]["error"]
    assert results["victim"]["attempts"] == 2
    assert results["neighbour"]["status"] == COMPLETED and results["neighbour"]["attempts"] == 1


def test_a_trial_folder_has_one_live_owner(tmp_path):
    folder = tmp_path / "trial"
    assert acquire_lock(folder) is None
    with pytest.raises(TrialLocked, match=f"in use by process {os.getpid()}"):
        acquire_lock(folder)  # this (live) process owns it
    (folder / LOCK_FILE).write_text(json.dumps({"pid": 2**22 + 12345, "host": os.uname().nodename}))
    assert acquire_lock(folder)["pid"] == 2**22 + 12345  # a dead owner's lock is taken over
    assert read_owner(folder)["pid"] == os.getpid()


def test_resume_with_other_settings_refuses_and_names_the_keys(tmp_path):
    path = write_sweep(tmp_path, [{"label": "only", "model.kernel": "softmax"}])
    out = tmp_path / "sweep"
    run_sweep(path, out=out, progress=False)
    before = (out / "sweep.json").read_text()
    with pytest.raises(ConfigError, match=r"train\.steps \(12 -> 20\).*drop --resume"):
        run_sweep(path, out=out, resume=True, progress=False, overrides=["train.steps=20"])
    result = CliRunner().invoke(app, ["ablate", str(path), "--out", str(out), "--resume",
                                      "--set", "train.steps=20"], env={"COLUMNS": "1000"})
    assert result.exit_code == 2 and "train.steps (12 -> 20)" in result.output
    assert (out / "sweep.json").read_text() == before  # nothing rewritten
    assert run_sweep(path, out=out, resume=True, progress=False).skipped  # same settings: fine


def test_per_trial_threads_are_pinned_in_the_config_whatever_the_workers(tmp_path):
    spec = load_sweep(write_sweep(tmp_path, [{"label": "x", "model.kernel": "softmax"},
                                             {"label": "y", "train.threads": 2}]))
    trials = expand(spec, tmp_path / "s", check_models=False)
    assert [t.config.train.threads for t in trials] == [1, 2]  # pinned; an explicit value kept


def _sleeper(alive, write_end, parent_pid, pdeathsig):
    from formerlab.experiments.backends import die_with_parent

    write_end.close()  # a forked child inherits it; a spawned worker never holds it
    die_with_parent(alive, parent_pid, pdeathsig=pdeathsig)
    time.sleep(120)


def _middle(pid_file, mechanism):
    import multiprocessing

    fork = multiprocessing.get_context("fork")
    read, write = fork.Pipe(duplex=False)
    alive = read if mechanism == "pipe-eof" else None
    child = fork.Process(target=_sleeper, args=(alive, write, os.getpid(), mechanism == "pdeathsig"))
    child.start()
    Path(pid_file).write_text(str(child.pid))
    time.sleep(120)


@pytest.mark.parametrize("mechanism", ["pdeathsig", "pipe-eof"])
def test_each_mechanism_alone_kills_a_worker_whose_parent_is_killed(mechanism, tmp_path):
    import multiprocessing

    middle = multiprocessing.get_context("fork").Process(target=_middle, args=(tmp_path / "pid", mechanism))
    middle.start()
    worker = int(wait_until(lambda: (tmp_path / "pid").is_file() and (tmp_path / "pid").read_text(),
                            timeout=30, what="the worker"))
    time.sleep(0.5)  # let it arm its mechanism
    assert pid_alive(worker)
    os.kill(middle.pid, signal.SIGKILL)
    middle.join(10)
    wait_until(lambda: not pid_alive(worker), timeout=10, what=f"{mechanism} to kill the orphan")
