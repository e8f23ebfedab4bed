"""``formerlab ablate`` (run a sweep), ``formerlab report`` (its tables and plots) and
``formerlab runs`` (a table of training runs)."""

from __future__ import annotations

import typer

from formerlab.cli.common import (
    EXIT_INTERRUPTED,
    EXIT_TRIALS_FAILED,
    Format,
    console,
    fail,
    format_option,
    set_option,
    write_table,
)


def ablate(
    sweep: str = typer.Argument(..., help="Sweep YAML: a base config plus axes (see configs/quick-ablation.yaml)."),
    out: str = typer.Option(None, "--out", help="Sweep folder (default runs/<name>-<time>; with --resume the newest)."),
    backend: str = typer.Option("local", "--backend", help="local (this process / worker processes) or ray."),
    workers: int = typer.Option(None, "--workers", min=1, help="Worker processes (local, default 1 = in-process) or Ray CPUs (default all)."),
    address: str = typer.Option(None, "--address", help="Ray cluster address (e.g. auto or ray://host:10001); default: a local Ray."),
    resume: bool = typer.Option(False, "--resume", help="Continue the sweep in --out, skipping completed trials."),
    set_: list[str] = set_option("train.device=cuda (every trial's base config)"),
    progress: bool = typer.Option(True, help="Show progress bars."),
) -> None:
    """Run an ablation sweep: every trial validated first, then trained and tracked."""
    from formerlab.experiments.sweep import run_sweep
    from formerlab.train import ConfigError

    try:
        outcome = run_sweep(sweep, out=out, backend=backend, workers=workers, address=address,
                            resume=resume, progress=progress, console=console, overrides=set_)
    except (ConfigError, ValueError, FileNotFoundError) as error:
        raise fail(error) from None
    except KeyboardInterrupt:
        console.print(f"[bold]interrupted[/]; continue with: formerlab ablate {sweep} --resume"
                      + (f" --out {out}" if out else ""), highlight=False, soft_wrap=True)
        raise typer.Exit(EXIT_INTERRUPTED) from None
    console.print(
        f"trials: {len(outcome.trials)}: {outcome.completed} completed, {outcome.failed} failed "
        f"({len(outcome.ran)} run now, {len(outcome.skipped)} skipped as already completed) "
        f"in {outcome.wall_s:.0f} s", soft_wrap=True,
    )
    console.print(f"sweep:  {outcome.sweep_dir}", soft_wrap=True)
    if outcome.parent_run_id:
        console.print(f"mlflow: parent run {outcome.parent_run_id} ({outcome.tracking_uri})", soft_wrap=True)
    console.print(f"report: formerlab report {outcome.sweep_dir}", soft_wrap=True)
    if outcome.failed:
        console.print(f"[bold red]{outcome.failed} trial(s) failed[/] (see their error above and "
                      f"result.json); rerun them with: formerlab ablate {sweep} --resume "
                      f"--out {outcome.sweep_dir}", highlight=False, soft_wrap=True)
        raise typer.Exit(EXIT_TRIALS_FAILED)


def report(
    sweep_dir: str = typer.Argument(..., help="A sweep folder made by `formerlab ablate`."),
    recall: bool = typer.Option(
        False, "--recall",
        help="Also write recall.md and recall-vs-state.png: accuracy against the bytes of "
             "each mechanism's streaming state (a recall sweep such as configs/mqar-study.yaml).",
    ),
    fmt: Format = format_option(),
) -> None:
    """Write report.md and plots for a sweep; print its tables."""
    import json
    from pathlib import Path

    from formerlab.experiments.report import table_rows, write_report

    sweep_file = Path(sweep_dir) / "sweep.json"
    try:
        written = write_report(sweep_dir)
    except json.JSONDecodeError as error:  # report.py reads only sweep.json strictly
        raise fail(ValueError(f"{sweep_file}: not valid JSON ({error.msg} at line {error.lineno}); "
                              "restore it, or rerun the sweep with `formerlab ablate SWEEP --resume "
                              f"--out {sweep_dir}`")) from None
    except (KeyError, TypeError, AttributeError) as error:
        raise fail(ValueError(f"{sweep_file}: not a sweep record (missing or wrong field {error}); "
                              "pass a folder made by `formerlab ablate`")) from None
    except (FileNotFoundError, ValueError) as error:
        raise fail(error) from None
    for task, rows in written.rows.items():
        header, cells = table_rows(rows, compact=True)
        write_table(f"{task}: validation {rows[0].main_metric}", header, cells, fmt,
                    right=lambda i, column: not (i == 0 or column == "setting"))
    console.print(f"report: {written.path}", soft_wrap=True)
    for path in written.plots:
        console.print(f"plot:   {path}", soft_wrap=True)
    if recall:
        _recall_report(sweep_dir, fmt)


def _recall_report(sweep_dir: str, fmt: Format) -> None:
    from formerlab.experiments.recall import recall_table, write_recall_report

    try:
        path, plot, rows = write_recall_report(sweep_dir)
    except (FileNotFoundError, ValueError) as error:
        raise fail(error) from None
    header, cells = recall_table(rows)
    write_table("recall: validation accuracy (%) and state per layer", header, cells, fmt,
                right=lambda i, column: i > 0)
    console.print(f"report: {path}", soft_wrap=True)
    console.print(f"plot:   {plot}", soft_wrap=True)




def runs(
    run_dirs: list[str] = typer.Argument(..., help="Run folders (made by `formerlab train`)."),
    metric: str = typer.Option("accuracy", help="The validation / test metric to show."),
    plot: str = typer.Option(None, "--plot", help="Also save the validation curves to this PNG."),
    fmt: Format = format_option(),
) -> None:
    """A table of training runs: steps, best validation, the test score at it (runs with
    train.test_at_best), wall time; works on runs still in progress."""
    from formerlab.experiments.runs import plot_curves, summarize_run, table
    from formerlab.train.checkpoint import CheckpointError

    try:
        summaries = [summarize_run(path, metric) for path in run_dirs]
    except (FileNotFoundError, CheckpointError) as error:
        raise fail(error) from None
    columns, rows = table(summaries)
    write_table("runs", columns, rows, fmt, right=lambda i, column: i >= 2)
    if plot:
        console.print(f"plot: {plot_curves(summaries, plot)}", soft_wrap=True)
