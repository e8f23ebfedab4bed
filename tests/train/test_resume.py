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


# --- resuming with an edited config.yaml / with overrides ------------------------------------

from formerlab.experiments import run_training  # noqa: E402
from formerlab.train import ConfigError  # noqa: E402
from formerlab.train.resume import RESUMABLE_KEYS  # noqa: E402


def test_resume_refuses_an_edited_config_yaml_naming_each_key(tiny, tmp_path):
    run = train(load_config(None, tiny(10)), run_dir=tmp_path / "r", progress=False).run_dir
    path = run / "config.yaml"
    original = path.read_text()
    edited = original.replace("steps: 10", "steps: 30").replace("lr: 0.003", "lr: 0.01")
    assert edited.count("30") and "lr: 0.01" in edited
    path.write_text(edited)
    with pytest.raises(ConfigError) as error:
        train(resume=run, progress=False)
    message = str(error.value)
    assert "train.steps: 10 in the checkpoint, 30 in config.yaml" in message
    assert "train.lr: 0.003 in the checkpoint, 0.01 in config.yaml" in message
    assert "--set train.steps=30" in message  # the allowed one, as an override
    assert path.read_text() == edited  # the edit is not overwritten
    assert json.loads((checkpoint_folder(run) / "state.json").read_text())["step"] == 10


def test_extending_a_finished_run_continues_to_the_new_step_count(tiny, tmp_path):
    cfg = load_config(None, tiny(10))
    first = train(cfg, run_dir=tmp_path / "r", progress=False)
    assert first.step == 10
    result, record = run_training(resume=first.run_dir, overrides=["train.steps=20"], progress=False)
    assert result.step == 20
    assert [h["step"] for h in result.history] == list(range(1, 21))
    assert losses(result)[:10] == losses(first)  # the history is intact
    assert [e["step"] for e in result.evals] == [10, 20]
    state = json.loads((checkpoint_folder(first.run_dir) / "state.json").read_text())
    assert state["step"] == 20 and state["config"]["train"]["steps"] == 20
    assert "steps: 20" in (first.run_dir / "config.yaml").read_text()
    again = train(resume=first.run_dir, progress=False)  # the stored config is now the extended one
    assert again.step == 20


def test_resume_refuses_overrides_outside_the_allowlist(tiny, tmp_path):
    run = train(load_config(None, tiny(10)), run_dir=tmp_path / "r", progress=False).run_dir
    with pytest.raises(ConfigError, match=r"'model\.dim' cannot change when resuming") as error:
        run_training(resume=run, overrides=["model.dim=64"], progress=False)
    for key in RESUMABLE_KEYS:
        assert key in str(error.value)
    with pytest.raises(ValueError, match=r"train\.steps=5 is below the step .* \(10\)"):
        train(resume=run, overrides=["train.steps=5"], progress=False)
