"""The CLI through typer's runner: train (tiny), generate, attention list, errors."""

from pathlib import Path

from typer.testing import CliRunner

from formerlab.cli import app

runner = CliRunner()


def test_attention_list_shows_every_kernel_and_causal_support():
    from formerlab import attention

    result = runner.invoke(app, ["attention", "list"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    for name in attention.available():
        assert name in result.output
    assert "yes" in result.output


def test_mixers_and_solvers_lists():
    from formerlab import mixers, solvers

    out = runner.invoke(app, ["mixers", "list"], env={"COLUMNS": "200"}).output
    assert all(name in out for name in mixers.available())
    out = runner.invoke(app, ["solvers", "list"], env={"COLUMNS": "200"}).output
    assert all(name in out for name in solvers.available()) and "fixed-point only" in out


def test_train_then_generate(tiny, tmp_path):
    args = ["train", "--no-progress"]
    for override in tiny(10):
        args += ["--set", override]
    result = runner.invoke(app, args + ["--set", "tracking=mlflow"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "validation" in result.output and "checkpoint:" in result.output
    assert "sqlite:///" in result.output  # where the MLflow record is
    run_dir = Path(result.output.split("run:")[1].split()[0])
    assert (run_dir / "checkpoint" / "model.safetensors").is_file()
    sample = runner.invoke(app, ["generate", str(run_dir), "--prompt", "ROMEO:", "--tokens", "15"])
    assert sample.exit_code == 0, sample.output
    assert sample.output.startswith("ROMEO:") and len(sample.output.rstrip("\n")) >= 21


def test_train_config_error_exits_cleanly(tmp_path):
    result = runner.invoke(app, ["train", "--set", "model.kernel=bogus"], env={"COLUMNS": "200"})
    assert result.exit_code == 2
    assert "unknown attention kernel 'bogus'" in result.output
    assert "Traceback" not in result.output


def test_generate_on_missing_run_names_it(tmp_path):
    result = runner.invoke(app, ["generate", str(tmp_path / "nope")], env={"COLUMNS": "200"})
    assert result.exit_code == 2 and "no checkpoint in" in result.output
