"""A save killed at any stage leaves a checkpoint that loads and resumes exactly."""

import pytest
import torch

from formerlab.train import checkpoint as ckpt
from formerlab.train import load_config, train
from formerlab.train.build import build_model, build_task
from formerlab.train.loop import make_optimizer

from .conftest import tiny_args


class Crash(BaseException):
    """What a kill at a crash point looks like to the code after it: nothing runs."""


def crash_at(monkeypatch, where):
    def hook(name):
        if name == where:
            raise Crash(name)

    monkeypatch.setattr(ckpt, "_crash_point", hook)


def _state(step):
    return ckpt.TrainerState(step, [{"step": step, "loss": 1.0}], torch.get_rng_state(),
                             torch.Generator().manual_seed(step).get_state())


@pytest.fixture
def parts(tmp_path):
    cfg = load_config(None, tiny_args(tmp_path / "runs"))
    model = build_model(cfg, build_task(cfg))
    return cfg, model, make_optimizer(model, cfg)


# crash point -> the step a reader must find: before the old copy moves, the old one stays;
# after that, the new one (complete in .tmp) wins
POINTS = {"tensors-written": 1, "tmp-complete": 1, "old-moved": 2, "new-in-place": 2}


@pytest.mark.parametrize("point", list(POINTS))
def test_every_crash_point_leaves_one_complete_checkpoint(point, parts, tmp_path, monkeypatch):
    cfg, model, optimizer = parts
    run_dir = tmp_path / "run"
    ckpt.save_checkpoint(run_dir, cfg, model, optimizer, _state(1))
    weights = {1: {k: v.clone() for k, v in model.state_dict().items()}}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    weights[2] = {k: v.clone() for k, v in model.state_dict().items()}
    crash_at(monkeypatch, point)
    with pytest.raises(Crash):
        ckpt.save_checkpoint(run_dir, cfg, model, optimizer, _state(2))
    monkeypatch.setattr(ckpt, "_crash_point", lambda name: None)

    expected = POINTS[point]
    assert ckpt.has_checkpoint(run_dir)
    fresh = build_model(cfg, build_task(cfg))
    state = ckpt.load_trainer_state(run_dir, fresh, make_optimizer(fresh, cfg))
    assert state.step == expected
    for name, value in fresh.state_dict().items():
        assert torch.equal(value, weights[expected][name]), name
    # recovery put it back in place and removed the leftovers; the next save works
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoint"]
    ckpt.save_checkpoint(run_dir, cfg, model, optimizer, _state(3))
    assert ckpt.read_state(ckpt.checkpoint_folder(run_dir))["step"] == 3


def test_resume_after_a_crash_between_the_renames_matches_the_straight_run(tmp_path, monkeypatch):
    # the reported case: checkpoint -> checkpoint.old done, checkpoint.tmp -> checkpoint not
    cfg = load_config(None, tiny_args(tmp_path / "runs", steps=10))
    straight = train(cfg, run_dir=tmp_path / "straight", progress=False)
    train(cfg, run_dir=tmp_path / "split", stop_after=5, progress=False)  # checkpoint at 5
    crash_at(monkeypatch, "old-moved")
    with pytest.raises(Crash):
        train(resume=tmp_path / "split", progress=False)  # its step-10 save crashes
    monkeypatch.setattr(ckpt, "_crash_point", lambda name: None)
    assert not (tmp_path / "split" / "checkpoint").exists()  # only .old and .tmp are left
    resumed = train(resume=tmp_path / "split", progress=False)
    assert resumed.step == 10
    assert resumed.metrics == straight.metrics
    a = ckpt.load_run(tmp_path / "straight")[0].state_dict()
    b = ckpt.load_run(tmp_path / "split")[0].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("second", list(POINTS))
@pytest.mark.parametrize("first", list(POINTS))
def test_a_save_right_after_a_crashed_save_recovers_first(first, second, parts, tmp_path,
                                                          monkeypatch):
    """No load in between: ``save_checkpoint`` itself must put the crashed save's complete
    copy back in place before it clears ``.tmp`` / ``.old``. (After a crash between the
    renames, ``.tmp`` holds the only copy of the newest step; a save that starts by
    clearing ``.tmp`` and then crashes too would leave the step before it.)"""
    cfg, model, optimizer = parts
    run_dir = tmp_path / "run"
    ckpt.save_checkpoint(run_dir, cfg, model, optimizer, _state(1))
    crash_at(monkeypatch, first)
    with pytest.raises(Crash):
        ckpt.save_checkpoint(run_dir, cfg, model, optimizer, _state(2))
    after_first = POINTS[first]
    crash_at(monkeypatch, second)
    with pytest.raises(Crash):
        ckpt.save_checkpoint(run_dir, cfg, model, optimizer, _state(3))
    monkeypatch.setattr(ckpt, "_crash_point", lambda name: None)
    # the second save's own rule (POINTS: 1 = the checkpoint before it, 2 = its own)
    expected = after_first if POINTS[second] == 1 else 3
    found = ckpt.resolve_checkpoint(run_dir)
    assert found is not None
    assert ckpt.read_state(found)["step"] == expected, (first, second, found.name)
    ckpt.save_checkpoint(run_dir, cfg, model, optimizer, _state(4))  # and a clean save after
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoint"]
    assert ckpt.read_state(ckpt.checkpoint_folder(run_dir))["step"] == 4
