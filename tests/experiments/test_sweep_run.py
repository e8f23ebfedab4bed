"""Running sweeps: local (in-process and worker processes), Ray, fault isolation, resume,
MLflow parent/child runs."""

import json
import os

import pytest

from formerlab.experiments import sweep as sweep_module
from formerlab.experiments.sweep import COMPLETED, FAILED, RESULT_FILE, run_sweep
from formerlab.train import loop


def _metrics_by_hash(outcome):
    return {key: r["metrics"] for key, r in outcome.results.items()}


def test_local_sweep_runs_every_trial_and_persists_results(reference):
    assert reference.completed == 4 and reference.failed == 0
    assert len(reference.ran) == 4 and reference.skipped == []
    for trial in reference.trials:
        result = json.loads((reference.sweep_dir / "trials" / trial.dirname / RESULT_FILE).read_text())
        assert result["status"] == COMPLETED and result["hash"] == trial.key
        assert result["steps"] == 12 and len(result["history"]) == 12
        assert 0.0 <= result["metrics"]["accuracy"] <= 1.0
        assert result["task"]["baseline"]["accuracy"] == pytest.approx(1 / 5)
        assert result["task"]["seq_len"] == 2 * trial.config.task.options["length"]
        assert result["parameters"] > 0 and result["tokens_per_s"] > 0
        assert result["work_memory_mb"] >= 0 and "peak_memory_mb" not in result
    meta = json.loads((reference.sweep_dir / "sweep.json").read_text())
    assert [t["hash"] for t in meta["trials"]] == [t.key for t in reference.trials]
    assert meta["last_run"]["completed"] == 4


def test_mlflow_parent_run_with_one_child_per_trial(reference):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=reference.tracking_uri)
    parent = client.get_run(reference.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.params["sweep.trials"] == "4"
    assert parent.data.metrics["sweep.completed"] == 4
    children = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{reference.parent_run_id}'",
    )
    assert len(children) == 4
    assert {c.data.tags["formerlab.trial_hash"] for c in children} == {t.key for t in reference.trials}
    for child in children:
        assert child.info.status == "FINISHED"
        assert child.data.tags["formerlab.status"] == COMPLETED
        assert child.data.params["model.kernel"] in ("softmax", "linear")
        assert "val.accuracy" in child.data.metrics


def test_worker_processes_give_the_same_results(two_by_two, tmp_path, reference):
    # 1 worker (in-process) vs 2 workers: a trial's thread count is pinned in its config
    # (train.threads, part of its hash), so its losses do not depend on its neighbours
    outcome = run_sweep(two_by_two(), out=tmp_path / "pool", workers=2, progress=False)
    assert outcome.completed == 4
    assert _metrics_by_hash(outcome) == _metrics_by_hash(reference)
    for key, result in outcome.results.items():
        same = reference.results[key]
        assert result["threads"] == same["threads"] == result["config"]["train"]["threads"] == 1
        assert [h["loss"] for h in result["history"]] == [h["loss"] for h in same["history"]]
    pids = {r["pid"] for r in outcome.results.values()}
    assert len(pids) == 4 and os.getpid() not in pids  # a fresh worker process per trial


def test_ray_backend_on_a_local_instance(two_by_two, tmp_path, reference):
    ray = pytest.importorskip("ray")
    outcome = run_sweep(two_by_two(), out=tmp_path / "ray", backend="ray", workers=2,
                        progress=False)
    assert not ray.is_initialized()  # the backend shut down the instance it started
    assert outcome.completed == 4
    assert _metrics_by_hash(outcome) == _metrics_by_hash(reference)
    assert all((tmp_path / "ray" / "trials" / t.dirname / "checkpoint").is_dir() for t in outcome.trials)


def test_a_failing_trial_is_recorded_and_the_others_finish(make_sweep, tmp_path):
    path = make_sweep("faulty", tracking="mlflow", trials=[
        {"label": "ok-1", "model.kernel": "softmax"},
        {"label": "over-budget", "model.kernel": "linear", "train.time_budget_s": 1.0e-9},
        {"label": "ok-2", "model.mixer": "pooling"},
    ])
    outcome = run_sweep(path, out=tmp_path / "sweep", progress=False)
    by_label = {r["label"]: r for r in outcome.results.values()}
    assert by_label["ok-1"]["status"] == by_label["ok-2"]["status"] == COMPLETED
    failed = by_label["over-budget"]
    assert failed["status"] == FAILED
    assert "TrainingError" in failed["error"] and "time_budget_s" in failed["error"]
    assert "Traceback" in failed["traceback"]
    on_disk = json.loads((tmp_path / "sweep" / "trials" / outcome.trials[1].dirname / RESULT_FILE).read_text())
    assert on_disk["status"] == FAILED

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=outcome.tracking_uri)
    children = client.search_runs(
        [client.get_run(outcome.parent_run_id).info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{outcome.parent_run_id}'",
    )
    status = {c.data.tags["formerlab.trial"]: c.info.status for c in children}
    assert status == {"ok-1": "FINISHED", "over-budget": "FAILED", "ok-2": "FINISHED"}
    error = next(c for c in children if c.data.tags["formerlab.trial"] == "over-budget")
    assert "time budget" in error.data.tags["formerlab.error"]

    # --resume runs failed trials again (from scratch), and only those
    again = run_sweep(path, out=tmp_path / "sweep", resume=True, progress=False)
    assert len(again.skipped) == 2 and again.ran == [outcome.trials[1].key]
    retried = again.results[outcome.trials[1].key]
    assert retried["status"] == FAILED and retried["attempts"] == 2


def test_interrupt_then_resume_reruns_nothing_that_finished(two_by_two, tmp_path, monkeypatch, reference):
    real_train = loop.train
    calls = []

    def interrupted_third(cfg=None, **kwargs):
        calls.append(kwargs.get("resume"))
        if len(calls) == 3:  # stop half-way with a checkpoint, as Ctrl-C would
            real_train(cfg, stop_after=cfg.train.steps // 2, **kwargs)
            raise KeyboardInterrupt
        return real_train(cfg, **kwargs)

    monkeypatch.setattr(loop, "train", interrupted_third)
    path, out = two_by_two(), tmp_path / "sweep"
    with pytest.raises(KeyboardInterrupt):
        run_sweep(path, out=out, progress=False)
    finished = {p.parent.name: p.read_text() for p in out.glob("trials/*/result.json")}
    assert len(finished) == 2

    with pytest.raises(ValueError, match="already holds a sweep"):
        run_sweep(path, out=out, progress=False)  # not without --resume

    calls.clear()
    outcome = run_sweep(path, out=out, resume=True, progress=False)
    assert len(calls) == 2  # the interrupted trial and the one never started
    assert calls[0] is not None  # the interrupted one continued from its checkpoint
    assert len(outcome.skipped) == 2 and len(outcome.ran) == 2 and outcome.completed == 4
    for name, text in finished.items():  # finished trials untouched
        assert (out / "trials" / name / "result.json").read_text() == text
    assert _metrics_by_hash(outcome) == _metrics_by_hash(reference)  # nothing lost

    calls.clear()
    again = run_sweep(path, out=out, resume=True, progress=False)
    assert calls == [] and len(again.skipped) == 4


def test_trials_found_under_other_labels_are_listed_where_they_are(two_by_two, tmp_path, reference):
    # a study reorganised into other axes keeps its finished trials: they are recognised
    # by hash whatever their folder's label part, and sweep.json must point at those
    # folders, or the report and the recall rows lose them
    import shutil

    from formerlab.experiments.report import load_results

    out = tmp_path / "moved"
    for trial in reference.trials:
        shutil.copytree(reference.sweep_dir / "trials" / trial.dirname,
                        out / "trials" / f"old_label-{trial.key}")
    outcome = run_sweep(two_by_two(), out=out, resume=True, progress=False)
    assert len(outcome.skipped) == 4 and outcome.ran == []
    meta = json.loads((out / "sweep.json").read_text())
    assert {t["dir"] for t in meta["trials"]} == {f"trials/old_label-{t.key}" for t in reference.trials}
    _, results = load_results(out)
    assert [r["status"] for r in results] == [COMPLETED] * 4


def test_resume_without_out_continues_the_newest_sweep(two_by_two, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = sweep_module.load_sweep(two_by_two())
    with pytest.raises(ValueError, match="no earlier sweep 'two'"):
        run_sweep(spec, resume=True, progress=False)
    (tmp_path / "runs" / "two-20000101-000000").mkdir(parents=True)
    (tmp_path / "runs" / "two-20000101-000000" / "sweep.json").write_text("{}")
    (tmp_path / "runs" / "two-20990101-000000").mkdir(parents=True)
    (tmp_path / "runs" / "two-20990101-000000" / "sweep.json").write_text("{}")
    assert sweep_module.latest_sweep_dir(spec).name == "two-20990101-000000"


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"backend": "slurm"}, "backend='slurm' is not allowed"),
        ({"workers": 0}, "workers=0 is not allowed"),
        ({"address": "auto"}, "needs backend='ray'"),
    ],
)
def test_bad_runner_options_name_the_argument(options, match, two_by_two, tmp_path):
    with pytest.raises(ValueError, match=match):
        run_sweep(two_by_two(), out=tmp_path / "x", progress=False, **options)
