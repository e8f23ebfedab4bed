"""``formerlab runs``: the table read from run folders equals what the runs wrote."""

import json

from typer.testing import CliRunner

from formerlab.cli import EXIT_USAGE, app
from formerlab.experiments.runs import summarize_run
from formerlab.train import load_config, train

RUN = [
    "task.name=listops", "task.options.train_size=64", "task.options.val_size=16",
    "task.options.test_size=16", "task.options.min_len=8", "task.options.max_len=40",
    "task.options.max_depth=3", "model.dim=16", "model.depth=1", "model.heads=2",
    "train.steps=6", "train.batch_size=8", "train.warmup=2", "train.eval_every=2",
    "train.eval_batches=2", "train.test_at_best=true", "tracking=none",
]


def test_runs_table_reports_what_the_runs_wrote(tmp_path):
    cfg = load_config(None, [*RUN, f"runs_dir={tmp_path}"])
    done = train(cfg, run_dir=tmp_path / "done", progress=False)
    train(cfg, run_dir=tmp_path / "partial", stop_after=4, progress=False)
    record = json.loads((tmp_path / "done" / "test.json").read_text())

    summary = summarize_run(tmp_path / "done")
    assert summary.curve == [(e["step"], e["eval"]["accuracy"]) for e in done.evals]
    assert (summary.best_step, summary.best) == (record["best_step"], record["val"]["accuracy"])
    assert summary.test == record["test"]["accuracy"] and summary.finished
    assert summary.elapsed_s == done.evals[-1]["elapsed_s"]

    plot = tmp_path / "curves.png"
    result = CliRunner().invoke(app, ["runs", str(tmp_path / "done"), str(tmp_path / "partial"),
                                      "--format", "csv", "--plot", str(plot)])
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    assert lines[0].startswith("run,mechanism,steps,best val accuracy")
    done_row, partial_row = lines[1].split(","), lines[2].split(",")
    assert done_row[5] == f"{100 * record['test']['accuracy']:.2f}"
    assert '"4/6 (running)"' in lines[2] or "4/6 (running)" in partial_row
    assert partial_row[-2] == "not yet"
    assert plot.stat().st_size > 1000


def test_runs_table_names_a_folder_without_a_run(tmp_path):
    result = CliRunner().invoke(app, ["runs", str(tmp_path)])
    assert result.exit_code == EXIT_USAGE
    assert "no checkpoint in" in result.output
