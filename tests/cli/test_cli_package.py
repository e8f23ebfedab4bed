"""The ``formerlab.cli`` package: one module per command group, ``describe``, one table
writer with ``--format``, one ``--threads`` parser, ``--set key=value`` checked first, and
progress on stderr."""

import csv
import importlib
import io
import re

import pytest
import typer
from rich.cells import cell_len
from typer.testing import CliRunner

from formerlab.cli import EXIT_INTERRUPTED, EXIT_TRIALS_FAILED, EXIT_USAGE, app

runner = CliRunner()
NARROW = {"COLUMNS": "80"}
WIDE = {"COLUMNS": "200"}


def invoke(*args, env=WIDE):
    return runner.invoke(app, list(args), env=env)


# --- 1. the package layout -----------------------------------------------------------------


def test_cli_is_a_package_of_command_group_modules():
    cli = importlib.import_module("formerlab.cli")
    assert hasattr(cli, "__path__"), "formerlab.cli is a package"
    for name in ("common", "train", "registries", "bench", "studies", "sweeps"):
        importlib.import_module(f"formerlab.cli.{name}")
    assert (EXIT_USAGE, EXIT_TRIALS_FAILED, EXIT_INTERRUPTED) == (2, 3, 130)
    assert cli.app is app and callable(cli.fail)
    from formerlab.__main__ import app as main_app

    assert main_app is app
    commands = typer.main.get_command(app).commands
    for name in ("train", "generate", "params", "ablate", "report", "pinv-study", "approx",
                 "attention", "bench", "mixers", "solvers", "tasks", "viz"):
        assert name in commands, name


# --- 2. describe -----------------------------------------------------------------------------


def test_attention_describe_shows_options_support_and_complexity():
    result = invoke("attention", "describe", "nystrom")
    assert result.exit_code == 0, result.output
    out = result.output
    assert re.search(r"num_landmarks\s+64\b", out) and re.search(r"pinv_iters\s+6\b", out)
    assert re.search(r"causal\s+no", out) and re.search(r"streaming\s+no", out)
    assert "O(N·m·D" in out and "Nyström" in out
    streaming = invoke("attention", "describe", "causal_nystrom").output
    assert re.search(r"causal\s+yes", streaming) and re.search(r"streaming\s+yes", streaming)


@pytest.mark.parametrize("group, name, option", [
    ("mixers", "attention", "kernel"), ("solvers", "broyden", "memory"), ("tasks", "sort", "length"),
])
def test_every_registry_has_describe(group, name, option):
    result = invoke(group, "describe", name)
    assert result.exit_code == 0, result.output
    assert name in result.output and option in result.output


def test_describe_an_unknown_name_lists_the_valid_ones():
    from formerlab import attention

    result = invoke("attention", "describe", "nystrom2")
    assert result.exit_code == 2
    assert "unknown attention kernel 'nystrom2'" in result.output
    assert all(name in result.output for name in attention.available())
    assert "Traceback" not in result.output
    assert invoke("tasks", "describe", "nope").exit_code == 2


# --- 3. one table writer, --format, 80 columns -----------------------------------------------


def test_list_commands_write_csv_and_markdown():
    from formerlab import attention

    result = invoke("attention", "list", "--format", "csv")
    assert result.exit_code == 0, result.output
    rows = list(csv.reader(io.StringIO(result.stdout)))
    assert rows[0] == ["name", "causal", "complexity", "description"]
    assert sorted(r[0] for r in rows[1:]) == sorted(attention.available())
    md = invoke("solvers", "list", "--format", "markdown").stdout
    assert "| name | general root problems | description |" in md and "|---|---|---|" in md


def test_pinv_study_formats_and_the_markdown_alias():
    args = ["pinv-study", "--sizes", "4", "--batch", "2"]
    csv_out = invoke(*args, "--format", "csv")
    assert csv_out.exit_code == 0, csv_out.output
    rows = list(csv.reader(io.StringIO(csv_out.stdout)))
    assert rows[0][:3] == ["N", "init", "order"] and all(len(r) == len(rows[0]) for r in rows)
    alias = invoke(*args, "--markdown").stdout
    assert alias == invoke(*args, "--format", "markdown").stdout and "| N | init |" in alias
    clash = invoke(*args, "--markdown", "--format", "csv")
    assert clash.exit_code == 2 and "disagree" in clash.output


def _no_ellipsis(result):
    assert result.exit_code == 0, result.output
    assert "…" not in result.stdout, result.stdout
    assert max(cell_len(line) for line in result.stdout.splitlines()) <= 80, result.stdout


def test_tables_are_readable_at_80_columns():
    _no_ellipsis(invoke("pinv-study", "--sizes", "4", "--batch", "2", env=NARROW))
    _no_ellipsis(invoke("approx", "--n", "48", "--landmarks", "8", "--data", "smooth",
                        "--scale", "1", "--heads", "1", "--head-dim", "8", env=NARROW))
    _no_ellipsis(invoke("attention", "list", env=NARROW))
    generate = invoke("bench", "generate", "--tokens", "8", "--prompt", "4", "--at", "8",
                      "--dim", "16", "--depth", "1", "--heads", "2", "--rounds", "1",
                      "--repeats", "1", "--kernel", "softmax", "--kernel", "causal_nystrom",
                      "--no-uncached", env=NARROW)
    _no_ellipsis(generate)
    assert "causal_nystrom" in generate.stdout  # whole, not folded


def test_fit_columns_splits_a_table_too_wide_and_repeats_the_first_column():
    from formerlab.cli.common import fit_columns

    columns = ["kernel"] + [f"metric number {i}" for i in range(12)]
    body = [["causal_nystrom"] + ["123.45"] * 12]
    groups = fit_columns(columns, body, 80)
    assert len(groups) > 1 and all(cols[0] == 0 for cols, _ in groups)
    assert sorted({i for cols, _ in groups for i in cols}) == list(range(13))
    for cols, widths in groups:
        assert sum(widths) + 2 * (len(cols) - 1) <= 80
        assert all(w >= 6 for w in widths) and widths[0] >= len("causal_nystrom")


# --- 4. one --threads option ------------------------------------------------------------------


def test_every_bench_command_takes_threads_as_a_comma_list():
    bench = typer.main.get_command(app).commands["bench"]
    for name, command in bench.commands.items():
        if name == "roots":  # single-threaded SciPy comparison: no --threads
            continue
        (param,) = [p for p in command.params if p.name == "threads"]
        assert param.opts == ["--threads"], name
    for name in ("metric", "generate", "compile", "nystrom", "causal", "deq"):
        bad = invoke("bench", name, "--threads", "0")
        assert bad.exit_code == 2, (name, bad.output)
        assert "separated by commas, e.g. 1,2" in bad.output, (name, bad.output)


def test_single_count_benchmarks_refuse_a_thread_list_with_the_reason():
    result = invoke("bench", "metric", "--threads", "1,2")
    assert result.exit_code == 2 and "runs at one thread count" in result.output


# --- 5. --set key=value ------------------------------------------------------------------------


@pytest.mark.parametrize("args", [
    ["train", "--set", "train.steps", "5"],
    ["train", "configs/demo.yaml", "--set", "train.steps", "5"],
    ["params", "--set", "model.dim", "64"],
    ["ablate", "sweep.yaml", "--set", "train.steps"],
])
def test_set_without_equals_is_a_usage_error_before_any_work(args, monkeypatch):
    import formerlab.experiments
    import formerlab.train

    def boom(*a, **k):
        raise AssertionError("work started")

    monkeypatch.setattr(formerlab.train, "load_config", boom)
    monkeypatch.setattr(formerlab.experiments, "run_training", boom)
    result = invoke(*args)
    assert result.exit_code == 2, result.output
    assert "--set key=value" in result.output and "work started" not in result.output


# --- 7. progress on stderr ----------------------------------------------------------------------


def test_long_studies_report_progress_on_stderr():
    study = invoke("pinv-study", "--sizes", "4", "--sizes", "8", "--batch", "2", "--format", "csv")
    assert study.exit_code == 0, study.output
    assert "size 4" in study.stderr and "size 8" in study.stderr
    assert "size 4" not in study.stdout  # stdout stays a clean table
    approx = invoke("approx", "--n", "48", "--landmarks", "8", "--data", "smooth", "--data",
                    "random", "--scale", "1", "--heads", "1", "--head-dim", "8")
    assert approx.exit_code == 0, approx.output
    assert "q, k, v 1/2" in approx.stderr and "q, k, v 2/2" in approx.stderr
