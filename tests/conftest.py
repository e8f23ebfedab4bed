"""Shared fixtures: tiny run configs on the real tinyshakespeare data."""

import os
import signal
import warnings
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("FORMERLAB_DATA", str(REPO.parent / "shared" / "data"))


def tiny_overrides(tmp_path: Path, steps: int = 20) -> list[str]:
    """A model and run small enough for a test (a second or two on CPU)."""
    return [
        "model.dim=32", "model.depth=1", "model.heads=2",
        "task.options.context=32", f"train.steps={steps}", "train.batch_size=4",
        "train.warmup=2", "train.eval_every=10", "train.eval_batches=2", "train.log_every=5",
        "sample.tokens=20", f"runs_dir={tmp_path / 'runs'}", "tracking=none",
    ]


def pytest_collection_modifyitems(config, items):
    """``cuda``-marked tests skip visibly (reason in the ``-rs`` summary) without a GPU."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA GPU on this machine (cuda-marked test)")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


def _sigint_ignored() -> bool:
    """Whether this process ignores SIGINT at the OS level (/proc/self/status SigIgn): a
    library can set that behind Python's back, and every process started from here then
    inherits it, so Ctrl-C never reaches it."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return False
    mask = next((line.split()[1] for line in status.splitlines() if line.startswith("SigIgn:")), "0")
    return bool(int(mask, 16) >> (signal.SIGINT - 1) & 1)


@pytest.fixture(autouse=True)
def _sigint_not_left_ignored(request):
    """A test that leaves SIGINT ignored gets it restored and a warning naming it."""
    yield
    if _sigint_ignored():
        signal.signal(signal.SIGINT, signal.default_int_handler)
        warnings.warn(f"{request.node.nodeid} left SIGINT ignored (SigIgn); restored", stacklevel=1)


@pytest.fixture
def tiny(tmp_path):
    return lambda steps=20: tiny_overrides(tmp_path, steps)
