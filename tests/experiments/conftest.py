"""Tiny sweeps for the experiments tests: a few seconds of CPU each."""

import copy

import pytest
import yaml

TINY_BASE = {
    "task": {"name": "sort", "options": {"length": 4, "num_values": 5}},
    "model": {"dim": 16, "depth": 1, "heads": 2},
    "train": {"steps": 12, "batch_size": 8, "warmup": 2, "eval_every": 6, "eval_batches": 2,
              "log_every": 3},
    "tracking": "none",
}


@pytest.fixture
def make_sweep(tmp_path):
    """``make_sweep(name, base_overrides..., axes=..., trials=...)`` -> path of a sweep YAML
    on the tiny base (``tracking="mlflow"`` etc. replace base sections)."""

    def make(name="tiny", axes=None, trials=None, **base_sections):
        base = copy.deepcopy(TINY_BASE)
        base.update(base_sections)
        spec = {"name": name, "base": base}
        if axes is not None:
            spec["axes"] = axes
        if trials is not None:
            spec["trials"] = trials
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(spec, sort_keys=False))
        return path

    return make


@pytest.fixture
def two_by_two(make_sweep):
    """softmax / linear x answer length 4 / 6 on the decoder sort task (4 trials)."""
    return lambda **base: make_sweep(
        "two", axes={"model.kernel": ["softmax", "linear"], "task.options.length": [4, 6]}, **base)


@pytest.fixture(scope="session")
def reference(tmp_path_factory):
    """The 2x2 sweep (softmax / linear x length 4 / 6) run in-process, uninterrupted,
    tracked in MLflow; shared by the sweep and report tests."""
    from formerlab.experiments.sweep import run_sweep

    folder = tmp_path_factory.mktemp("reference")
    base = copy.deepcopy(TINY_BASE)
    base["tracking"] = "mlflow"
    spec = {"name": "two", "base": base,
            "axes": {"model.kernel": ["softmax", "linear"], "task.options.length": [4, 6]}}
    path = folder / "two.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return run_sweep(path, out=folder / "sweep", progress=False)
