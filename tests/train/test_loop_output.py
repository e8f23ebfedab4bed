"""What a run shows while it trains, what it leaves on disk when it cannot start, and the
memory it reports."""

import io

import pytest
from rich.console import Console

from formerlab.train import load_config, train
from formerlab.train.memory import _status_mb


def test_each_evaluation_is_printed_as_it_happens_without_progress(tiny, capsys):
    result = train(load_config(None, tiny(20)), progress=False)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("eval step")]
    assert len(lines) == 2, lines
    for line, ev in zip(lines, result.evals):
        assert line.startswith(f"eval step {ev['step']}/20: val loss {ev['eval']['loss']:.4f}")
        assert "accuracy" in line


def test_evaluations_go_to_the_console_given(tiny, capsys):
    out = io.StringIO()
    train(load_config(None, tiny(10)), progress=True, console=Console(file=out, width=120))
    assert "eval step 10/10: val loss" in out.getvalue()
    assert "eval step" not in capsys.readouterr().out


@pytest.mark.parametrize(
    ("overrides", "error"),
    [
        (["model.kernel=nystrom"], "cannot run causally"),  # a decoder task: tinyshakespeare
        (["task.options.data_path=/nonexistent/data"], "/nonexistent/data"),  # a missing dataset
    ],
)
def test_a_config_error_leaves_no_run_folder(tiny, tmp_path, overrides, error):
    cfg = load_config(None, tiny(10) + overrides)
    with pytest.raises((ValueError, FileNotFoundError, OSError), match=error):
        train(cfg, progress=False)
    runs = tmp_path / "runs"
    assert not runs.exists() or list(runs.iterdir()) == []


def _peak(tiny, tmp_path, name, *overrides):
    cfg = load_config(None, tiny(4) + ["train.eval_every=4", "sample.tokens=0",
                                        f"runs_dir={tmp_path / name}", *overrides])
    return train(cfg, progress=False).peak_memory_mb


def test_peak_memory_measures_the_work_not_the_process(tiny, tmp_path):
    small = _peak(tiny, tmp_path, "small")
    large = _peak(tiny, tmp_path, "large", "model.dim=512", "model.depth=4", "model.heads=8",
                  "train.batch_size=16", "task.options.context=128")
    process = _status_mb("VmRSS")
    if process is None:
        pytest.skip("no /proc/self/status here")
    assert 0 <= small < process / 4, (small, process)  # torch alone holds far more
    assert large > small + 50, (small, large)  # ~12.6M params + AdamW state + activations


def test_cli_train_shows_each_evaluation_with_no_progress(tiny):
    from typer.testing import CliRunner

    from formerlab.cli import app

    args = ["train", "--no-progress"] + [a for o in tiny(20) for a in ("--set", o)]
    result = CliRunner().invoke(app, args, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    evals = [line for line in result.output.splitlines() if line.startswith("eval step")]
    assert [line.split(":")[0] for line in evals] == ["eval step 10/20", "eval step 20/20"]
    assert result.output.index("eval step 20/20") < result.output.index("validation at step 20")


def test_cli_resume_with_set_extends_a_finished_run(tmp_path):
    """`formerlab train --resume RUN --set train.steps=N` continues to N; a key outside the
    allowlist is refused naming the allowed ones."""
    from typer.testing import CliRunner

    from formerlab.cli import app

    runner = CliRunner()
    args = ["--set", "model.dim=16", "--set", "model.depth=1", "--set", "model.heads=2",
            "--set", "train.steps=4", "--set", "train.eval_every=2", "--set", "train.eval_batches=1",
            "--set", "train.batch_size=2", "--set", "sample.tokens=0", "--set", "tracking=none",
            "--set", f"runs_dir={tmp_path}", "--set", "task.options.context=16"]
    first = runner.invoke(app, ["train", "--no-progress", *args], env={"COLUMNS": "1000"})
    assert first.exit_code == 0, first.output
    run_dir = first.output.split("run:")[1].split()[0]
    more = runner.invoke(app, ["train", "--no-progress", "--resume", run_dir,
                               "--set", "train.steps=6"], env={"COLUMNS": "1000"})
    assert more.exit_code == 0, more.output
    assert "validation at step 6" in more.output
    bad = runner.invoke(app, ["train", "--resume", run_dir, "--set", "model.dim=32"],
                        env={"COLUMNS": "1000"})
    assert bad.exit_code != 0 and "train.steps" in bad.output
