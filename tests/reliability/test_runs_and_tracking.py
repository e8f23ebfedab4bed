"""Concurrent `formerlab train` processes, MLflow steps after kill + resume, Ctrl-C."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from formerlab.experiments.run import run_training
from formerlab.experiments.tracking import MLflowTracker, default_tracking_uri
from formerlab.train import load_config, train
from formerlab.train.checkpoint import CheckpointError, checkpoint_folder, read_state
from formerlab.train.loop import new_run_dir

from .conftest import fork_cli, forked_result, sets, tiny_args


def test_run_folders_are_created_atomically_with_unique_names(tmp_path):
    cfg = load_config(None, tiny_args(tmp_path / "runs"))
    folders = [new_run_dir(cfg) for _ in range(4)]  # same config, same second
    assert len(set(folders)) == 4 and all(f.is_dir() for f in folders)


def test_four_concurrent_train_processes_share_the_mlflow_store(tmp_path):
    import multiprocessing

    runs = tmp_path / "runs"
    args = ["train", "--no-progress", *sets(tiny_args(runs, steps=6, tracking="mlflow"))]
    go = multiprocessing.get_context("fork").Event()
    outs = [tmp_path / f"out-{i}.txt" for i in range(4)]
    procs = [fork_cli(args, out, go) for out in outs]
    go.set()  # all four start at once: same second, same new store
    for proc in procs:
        proc.join(180)
    results = [forked_result(out, proc) for out, proc in zip(outs, procs)]
    for code, output in results:
        assert code == 0, output[-3000:]
    run_dirs = {Path(output.split("run:")[1].split()[0]) for _, output in results}
    assert len(run_dirs) == 4  # one folder each
    client = MlflowClient(tracking_uri=default_tracking_uri(runs))
    found = client.search_runs([client.get_experiment_by_name("formerlab").experiment_id])
    assert len(found) == 4
    assert {r.data.tags["formerlab.run_dir"] for r in found} == {str(d.resolve()) for d in run_dirs}
    for run in found:
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "train.loss")]
        assert sorted(steps) == list(range(1, 7))  # every step once, none from a neighbour


class Crash(BaseException):
    pass


class DyingTracker(MLflowTracker):
    """Dies (like a SIGKILL) right after logging step ``die_at``."""

    die_at = 8

    def log_metrics(self, metrics, step):
        super().log_metrics(metrics, step)
        if step == self.die_at:
            raise Crash()


def test_steps_replayed_after_a_kill_are_logged_once(tmp_path):
    cfg = load_config(None, tiny_args(tmp_path / "runs", steps=10, tracking="mlflow"))
    uri = default_tracking_uri(cfg.runs_dir)
    run_dir = tmp_path / "run"
    with pytest.raises(Crash):  # logged steps 1-8, last checkpoint at step 5
        train(cfg, run_dir=run_dir, progress=False, tracker=DyingTracker(uri))
    assert read_state(checkpoint_folder(run_dir))["step"] == 5
    resumed, _ = run_training(resume=run_dir, progress=False)  # replays 6-8, then 9-10
    straight = train(cfg, run_dir=tmp_path / "straight", progress=False)
    client = MlflowClient(tracking_uri=uri)
    run_id = (run_dir / "mlflow_run_id").read_text().strip()
    history = client.get_metric_history(run_id, "train.loss")
    assert sorted(m.step for m in history) == list(range(1, 11))
    by_step = {m.step: m.value for m in history}
    assert [by_step[s] for s in range(1, 11)] == [h["loss"] for h in straight.history]
    assert resumed.step == 10


def saved_past_step_zero(runs: Path) -> bool:
    """Whether a run under ``runs`` has a readable checkpoint beyond step 0."""
    for run_dir in runs.glob("*/"):
        try:
            if read_state(checkpoint_folder(run_dir))["step"] > 0:
                return True
        except (FileNotFoundError, CheckpointError):
            pass  # not written yet, or being written
    return False


def test_ctrl_c_saves_exits_130_and_prints_the_resume_command(tmp_path):
    # a real `formerlab train` process, as from a terminal
    runs = tmp_path / "runs"
    proc = subprocess.Popen(
        [sys.executable, "-m", "formerlab", "train", "--no-progress",
         *sets(tiny_args(runs, steps=100_000))],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "COLUMNS": "1000"},
        # as a terminal's foreground job: at its default. A suite started in the background
        # by a non-interactive shell (`make test &`) ignores SIGINT, and a child inherits
        # that: the SIGINT was a no-op there and the run went on
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        deadline = time.monotonic() + 120
        while not list(runs.glob("*/config.yaml")) and time.monotonic() < deadline:
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            time.sleep(0.1)  # config.yaml is written just before the first step
        # a checkpoint past step 0 (every evaluation saves one): on a loaded machine a fixed
        # sleep could interrupt the run before its first step
        while not saved_past_step_zero(runs) and time.monotonic() < deadline:
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        output, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    code = proc.returncode
    assert code == 130, output[-3000:]
    assert "Traceback" not in output
    command = [line for line in output.splitlines() if line.startswith("continue with:")]
    assert len(command) == 1, output
    run_dir = Path(command[0].split("--resume", 1)[1].strip())
    step = read_state(checkpoint_folder(run_dir))["step"]
    assert step > 0 and f"at step {step};" in output
