"""Interrupt + resume reproduces the uninterrupted run exactly (CPU, fixed seed)."""

import json

import pytest
import torch

from formerlab.train import TrainingError, load_config, load_run, train
from formerlab.train.checkpoint import checkpoint_folder


def losses(result):
    return [h["loss"] for h in result.history]


def test_resume_reproduces_uninterrupted_losses(tiny, tmp_path):
    cfg = load_config(None, tiny(20) + ["model.dropout=0.1"])  # dropout: RNG state matters too
    straight = train(cfg, run_dir=tmp_path / "straight", progress=False)
    first = train(cfg, run_dir=tmp_path / "split", stop_after=10, progress=False)
    assert first.step == 10
    resumed = train(resume=tmp_path / "split", progress=False)
    assert resumed.step == 20
    assert len(losses(straight)) == 20
    assert losses(resumed) == losses(straight)  # bit-identical, not merely close
    assert resumed.metrics == straight.metrics
    a, _, _ = load_run(tmp_path / "straight")
    b, _, _ = load_run(tmp_path / "split")
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name


def test_checkpoint_is_safetensors_and_json(tiny, tmp_path):
    result = train(load_config(None, tiny(10)), run_dir=tmp_path / "r", progress=False)
    folder = checkpoint_folder(result.run_dir)
    assert {p.name for p in folder.iterdir()} == {"model.safetensors", "trainer.safetensors", "state.json"}
    state = json.loads((folder / "state.json").read_text())
    assert state["step"] == 10 and state["config"]["model"]["dim"] == 32


def test_non_finite_loss_stops_with_clear_error_and_keeps_checkpoint(tiny, tmp_path, monkeypatch):
    cfg = load_config(None, tiny(20))
    import formerlab.train.loop as loop

    real = loop.task_loss
    calls = {"n": 0}

    def poisoned(logits, batch, task):
        calls["n"] += 1
        loss = real(logits, batch, task)
        return loss * float("nan") if calls["n"] > 12 else loss

    monkeypatch.setattr(loop, "task_loss", poisoned)
    with pytest.raises(TrainingError, match="loss became nan at step 12.*checkpoint"):
        train(cfg, run_dir=tmp_path / "nan", progress=False)
    state = json.loads((checkpoint_folder(tmp_path / "nan") / "state.json").read_text())
    assert state["step"] == 10  # the last good checkpoint (written at the step-10 eval)


def test_resume_of_missing_run_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint in"):
        train(resume=tmp_path / "missing", progress=False)
