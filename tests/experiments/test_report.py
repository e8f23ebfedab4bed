"""Reports: every trial listed, tables aggregate seeds, plots written, CLI prints them."""

import json
import shutil

import pytest
from typer.testing import CliRunner

from formerlab.cli import app
from formerlab.experiments.report import build_rows, fmt_metric, table_rows, write_report

runner = CliRunner()


def test_report_lists_every_trial_and_writes_the_plots(reference, tmp_path):
    sweep_dir = tmp_path / "copy"
    shutil.copytree(reference.sweep_dir, sweep_dir)
    report = write_report(sweep_dir)
    text = report.path.read_text()
    for trial in reference.trials:
        assert f"| {trial.label} |" in text and trial.dirname in text
    assert report.counts == {"completed": 4, "failed": 0, "pending": 0}
    names = sorted(p.name for p in report.plots)
    # the sweep varies the length, so there is a time/memory-against-N figure
    assert names == ["sort-accuracy.png", "sort-loss.png", "sort-scaling.png"]
    for path in report.plots:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"]({path.name})" in text
    header, cells = report.tables["sort"]
    assert header[:3] == ["mechanism", "setting", "accuracy (mean ± std)"]
    assert sorted((c[0], c[1]) for c in cells) == [
        ("linear", "length=4"), ("linear", "length=6"), ("softmax", "length=4"), ("softmax", "length=6")]
    assert all(c[header.index("baseline accuracy")] == "20.0 %" for c in cells)
    # memory is the trials' work (model, optimizer, activations), not their processes
    assert "work peak MiB" in header and "peak MiB (+trial)" not in header
    assert "work peak MiB: the peak memory of the trial's work" in text
    process_mib = _process_rss_mib()
    for cell in cells:
        work = float(cell[header.index("work peak MiB")].replace(",", ""))
        assert 0 <= work < process_mib / 4, (work, process_mib)


def _process_rss_mib() -> float:
    from formerlab.train.memory import _status_mb

    rss = _status_mb("VmRSS")
    if rss is None:
        pytest.skip("no /proc/self/status here")
    return rss


def test_pending_and_failed_trials_still_appear(reference, tmp_path):
    sweep_dir = tmp_path / "copy"
    shutil.copytree(reference.sweep_dir, sweep_dir)
    first, second = reference.trials[0], reference.trials[1]
    (sweep_dir / "trials" / first.dirname / "result.json").unlink()  # never ran
    failed_path = sweep_dir / "trials" / second.dirname / "result.json"
    failed = json.loads(failed_path.read_text())
    failed.update(status="failed", error="TrainingError: loss became nan at step 3")
    failed_path.write_text(json.dumps(failed))
    report = write_report(sweep_dir)
    text = report.path.read_text()
    assert report.counts == {"completed": 2, "failed": 1, "pending": 1}
    assert "## Failed trials" in text and "loss became nan" in text
    assert f"| {first.label} | sort | softmax | 0 | pending |" in text
    cells = dict((c[0] + c[1], c) for c in report.tables["sort"][1])
    assert cells["softmaxlength=4"][-1] == "0 ok, 1 pending"
    assert cells["softmaxlength=6"][-1] == "0 ok, 1 failed"


def _result(label, seed, accuracy, iterations=None, status="completed"):
    config = {"seed": seed, "name": label, "runs_dir": "x", "tracking": {},
              "task": {"name": "sort", "options": {}}, "model": {"kernel": label}}
    return {
        "index": seed, "label": f"{label} seed={seed}", "labels": {"m": label, "seed": f"seed={seed}"},
        "hash": f"{label}{seed}", "mechanism": label, "config": config, "status": status,
        "dir": "trials/x", "metrics": {"accuracy": accuracy, "loss": 1.0},
        "task": {"name": "sort", "main_metric": "accuracy", "higher_is_better": True,
                 "seq_len": 33, "baseline": {"accuracy": 0.1}},
        "parameters": 1000, "tokens_per_s": 100.0, "work_memory_mb": 50.0,
        "diagnostics": {} if iterations is None else {
            "pinv_iterations": iterations, "pinv_iterations_max": 9.0, "pinv_converged": 1.0},
        "history": [{"step": 1, "loss": 2.0 + seed}, {"step": 2, "loss": 1.0 + seed}],
        "train_s": 2.0, "steps": 2,
    }


def test_rows_average_over_seeds_with_sample_std_and_iteration_counts():
    meta = {"axes": [{"name": "m", "task": False, "keys": ["model.kernel"]},
                     {"name": "seed", "task": False, "keys": ["seed"]}]}
    results = [_result("softmax", 0, 0.4), _result("softmax", 1, 0.6),
               _result("nystrom", 0, 0.5, iterations=6.0), _result("nystrom", 1, 0.7, iterations=8.0)]
    rows = build_rows(meta, results)["sort"]
    assert [r.mechanism for r in rows] == ["softmax", "nystrom"]
    mean, std = rows[0].mean_std("accuracy")
    assert mean == pytest.approx(0.5) and std == pytest.approx(0.1414, abs=1e-4)
    assert rows[0].loss_curve() == ([1, 2], [2.5, 1.5])
    header, cells = table_rows(rows)
    assert "pinv iterations" in header
    assert "pinv iterations max" not in header and "pinv converged" not in header
    column = header.index("pinv iterations")
    assert cells[0][column] == "–" and cells[1][column] == "7"
    compact_header, compact_cells = table_rows(rows, compact=True)
    assert "seeds" in compact_header and "trials" not in compact_header  # all ok: no status
    assert compact_cells[0][compact_header.index("params")] == "1.0k"
    assert cells[0][header.index("accuracy (mean ± std)")] == "50.0 ± 14.1 %"
    assert cells[0][header.index("seeds")] == "2"


def test_metric_formatting():
    assert fmt_metric("accuracy", 0.912, None) == "91.2 %"
    assert fmt_metric("loss", 1.23456, 0.01) == "1.2346 ± 0.0100"
    assert fmt_metric("loss", None, None) == "–"


def test_report_cli_prints_the_table_and_the_paths(reference, tmp_path):
    sweep_dir = tmp_path / "copy"
    shutil.copytree(reference.sweep_dir, sweep_dir)
    result = runner.invoke(app, ["report", str(sweep_dir)], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    assert "sort: validation accuracy" in result.output
    table = result.output.split("report:")[0]
    assert table.count("softmax") == 2 and table.count("linear") == 2  # one row per setting
    assert f"report: {sweep_dir / 'report.md'}" in result.output
    assert str(sweep_dir / "sort-loss.png") in result.output


def test_report_cli_on_a_folder_that_is_no_sweep(tmp_path):
    result = runner.invoke(app, ["report", str(tmp_path)], env={"COLUMNS": "200"})
    assert result.exit_code == 2 and "is not a sweep folder" in result.output


def test_ablate_cli_rejects_an_invalid_sweep_before_running(make_sweep, tmp_path):
    path = make_sweep(axes={"model.kernel": ["softmax", "bogus"]})
    out = tmp_path / "out"
    result = runner.invoke(app, ["ablate", str(path), "--out", str(out)], env={"COLUMNS": "200"})
    assert result.exit_code == 2
    assert "trial 1 (bogus)" in result.output and "model.kernel" in result.output
    assert "Traceback" not in result.output and not out.exists()


def test_ablate_cli_runs_a_sweep(make_sweep, tmp_path):
    path = make_sweep(trials=[{"label": "only", "model.kernel": "softmax"}])
    out = tmp_path / "out"
    result = runner.invoke(app, ["ablate", str(path), "--out", str(out), "--no-progress"],
                           env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "1 completed, 0 failed" in result.output and f"report: formerlab report {out}" in result.output
