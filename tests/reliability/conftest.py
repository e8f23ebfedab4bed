"""Tiny runs for the reliability tests (faults: crashes, kills, broken files, races)."""

import shutil
from pathlib import Path

import pytest


def tiny_args(runs_dir: Path, steps: int = 10, tracking: str = "none") -> list[str]:
    """``--set`` overrides of a run that trains in about a second."""
    return [
        "model.dim=16", "model.depth=1", "model.heads=2", "task.options.context=16",
        f"train.steps={steps}", "train.batch_size=2", "train.warmup=1", "train.eval_every=5",
        "train.eval_batches=1", "train.log_every=1", "sample.tokens=0", f"runs_dir={runs_dir}",
        f"tracking={tracking}",
    ]


def sets(overrides: list[str]) -> list[str]:
    return [item for override in overrides for item in ("--set", override)]


def _cli_child(args: list[str], out: str, go) -> None:
    import torch
    from typer.testing import CliRunner

    from formerlab.cli import app

    # GNU OpenMP (torch's CPU thread pool) is not fork-safe: once the parent has run a
    # parallel region, a forked child that enters one waits forever for the parent's
    # threads. One thread keeps the child out of the pool.
    torch.set_num_threads(1)
    if go is not None:
        go.wait(60)
    result = CliRunner().invoke(app, args, env={"COLUMNS": "1000"})
    Path(out).write_text(f"{result.exit_code}\n{result.output}")


def fork_cli(args: list[str], out: Path, go=None):
    """Run ``formerlab ARGS`` in a forked process (the imports are inherited: no start-up
    cost); its exit code and output land in ``out``. ``go`` (an Event) starts it."""
    import multiprocessing

    proc = multiprocessing.get_context("fork").Process(target=_cli_child, args=(args, str(out), go))
    proc.start()
    return proc


def forked_result(out: Path, proc=None) -> tuple[int, str]:
    """The forked CLI's exit code and output; if it wrote none, an AssertionError that
    says whether the process is still running (hung) or how it ended."""
    if not Path(out).exists():
        state = "unknown" if proc is None else (
            "still running (hung)" if proc.is_alive() else f"exit code {proc.exitcode}"
        )
        if proc is not None and proc.is_alive():
            proc.kill()
        raise AssertionError(f"the forked CLI wrote no result to {out}: {state}")
    code, _, output = Path(out).read_text().partition("\n")
    return int(code), output


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A finished 10-step run (checkpoint at step 10), trained once per module."""
    from formerlab.train import load_config, train

    root = tmp_path_factory.mktemp("trained")
    cfg = load_config(None, tiny_args(root / "runs"))
    return train(cfg, run_dir=root / "run", progress=False).run_dir


@pytest.fixture
def run_copy(trained_run, tmp_path):
    """A private copy of ``trained_run`` that a test may damage."""
    return Path(shutil.copytree(trained_run, tmp_path / "run"))
