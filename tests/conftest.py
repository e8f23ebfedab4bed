"""Shared fixtures: tiny run configs on the real tinyshakespeare data."""

import os
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


@pytest.fixture
def tiny(tmp_path):
    return lambda steps=20: tiny_overrides(tmp_path, steps)
