"""performer's random features change between optimiser steps only, never inside a forward.

A forward (a DEQ solve of 10-30 kernel calls and its implicit backward included) sees one
draw; ``on_optimizer_step`` (called by the training loop) redraws every ``redraw_interval``
steps; the draws follow from seed and step, so a resumed run reproduces them.
"""

import pytest
import torch

from formerlab.attention.performer import PerformerAttention
from formerlab.models import DecoderLM, EncoderClassifier
from formerlab.models.deq import DEQStack
from formerlab.train import load_config, load_run, train
from formerlab.train.loop import on_optimizer_step

PERFORMER = {"kernel": "performer", "num_features": 16, "redraw_interval": 1}


@pytest.fixture
def seen(monkeypatch):
    """Every projection a performer kernel uses, with its draw index, mode and phase."""
    calls = []
    real = PerformerAttention.projection

    def recording(self, dim, device, dtype):
        w = real(self, dim, device, dtype)
        calls.append({"w": w.detach().clone(), "draw": int(self.draws), "training": self.training})
        return w

    monkeypatch.setattr(PerformerAttention, "projection", recording)
    return calls


def assert_one_draw(calls, minimum=1):
    assert len(calls) >= minimum
    for call in calls[1:]:
        assert call["draw"] == calls[0]["draw"]
        assert torch.equal(call["w"], calls[0]["w"])


def performers(model):
    return [m for m in model.modules() if isinstance(m, PerformerAttention)]


def deq_body(**deq):
    return DEQStack(16, heads=2, mixer_options=PERFORMER, max_iter=12, tol=1e-6, jac_reg=0.0, **deq)


MODELS = {
    "deq_stack": lambda: deq_body(),
    "decoder": lambda: DecoderLM(11, dim=16, depth=2, heads=2, max_len=12, mixer_options=PERFORMER),
    "decoder_deq": lambda: DecoderLM(11, dim=16, depth=1, heads=2, max_len=12, body=deq_body()),
    "classifier": lambda: EncoderClassifier(11, 3, dim=16, depth=2, heads=2, max_len=12,
                                            mixer_options=PERFORMER),
}


def run(name, model):
    if name == "deq_stack":
        x = torch.randn(2, 12, 16, generator=torch.Generator().manual_seed(0))
        return model(x, causal=True)
    ids = torch.randint(0, 11, (2, 12), generator=torch.Generator().manual_seed(0))
    return model(ids)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_one_forward_and_its_backward_see_one_draw(name, seen):
    torch.manual_seed(0)
    model = MODELS[name]().train()
    assert performers(model) and all(k.redraw_interval == 1 for k in performers(model))
    out = run(name, model)
    forward_calls = len(seen)
    out.float().square().mean().backward()  # a DEQ's implicit backward calls f again
    minimum = 3 if "deq" in name else 2  # a solve iterates; a 2-block stack calls twice
    assert_one_draw(seen, minimum)
    assert all(call["training"] for call in seen)
    assert all(int(k.draws) == 0 for k in performers(model))  # a forward never redraws
    assert forward_calls >= minimum


def test_deq_solve_iterates_one_function_and_backward_uses_its_features(seen):
    """The implicit backward differentiates f at z* with the forward's features: its
    gradient equals the one of a model whose features can never change."""
    torch.manual_seed(0)
    model = deq_body().train()
    fixed = deq_body().train()
    fixed.load_state_dict(model.state_dict())
    for kernel in performers(fixed):
        kernel.redraw_interval = 0
    x = torch.randn(2, 12, 16, generator=torch.Generator().manual_seed(1))
    grads = []
    for net in (model, fixed):
        net(x, causal=True).square().mean().backward()
        grads.append([p.grad for p in net.parameters()])
    assert_one_draw(seen, minimum=6)
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_eval_and_plain_forwards_never_redraw(seen):
    kernel = PerformerAttention(num_features=8, redraw_interval=1)
    q, k, v = torch.randn(3, 1, 2, 6, 4).unbind(0)
    outs = [kernel(q, k, v) for _ in range(3)]
    kernel.eval()
    outs += [kernel(q, k, v, causal=True) for _ in range(2)]
    assert int(kernel.draws) == 0
    assert_one_draw(seen, 5)
    torch.testing.assert_close(outs[0], outs[1])


@pytest.mark.parametrize("interval", [1, 3])
def test_on_optimizer_step_redraws_every_interval_steps(interval):
    model = DecoderLM(11, dim=16, depth=2, heads=2, max_len=12, mixer_options=PERFORMER | {
        "redraw_interval": interval})
    changes, last = [], 0
    for step in range(1, 11):
        on_optimizer_step(model, step)
        draws = {int(k.draws) for k in performers(model)}
        assert draws == {step // interval}  # a function of the step: all layers agree
        if draws != {last}:
            changes.append(step)
        last = step // interval
    assert changes == list(range(interval, 11, interval))  # floor(10 / r) redraws
    fixed = PerformerAttention(redraw_interval=0)
    for step in range(1, 5):
        fixed.on_optimizer_step(step)
    assert int(fixed.draws) == 0


def test_the_draw_follows_from_seed_and_step():
    q, k, v = torch.randn(3, 1, 2, 6, 4, generator=torch.Generator().manual_seed(2)).unbind(0)
    a, b = (PerformerAttention(num_features=8, redraw_interval=2, seed=5) for _ in range(2))
    a.on_optimizer_step(6)
    for step in range(1, 7):
        b.on_optimizer_step(step)
    torch.testing.assert_close(a(q, k, v), b(q, k, v), rtol=0, atol=0)
    c = PerformerAttention(num_features=8, redraw_interval=2, seed=6)
    c.on_optimizer_step(6)
    assert not torch.allclose(a(q, k, v), c(q, k, v))


@pytest.mark.parametrize(("steps", "interval"), [(7, 1), (7, 3)])
def test_training_redraws_floor_steps_over_interval_times_at_the_right_steps(
    tiny, tmp_path, seen, steps, interval
):
    overrides = tiny(steps) + ["model.kernel=performer", "model.kernel_options.num_features=8",
                               f"model.kernel_options.redraw_interval={interval}", "sample.tokens=0"]
    result = train(load_config(None, overrides), run_dir=tmp_path / "r", progress=False)
    used = [call["draw"] for call in seen if call["training"]]  # depth 1: one call per step
    assert used == [s // interval for s in range(steps)]  # step s (0-based) uses draw s // r
    model, _, _ = load_run(result.run_dir)
    assert [int(k.draws) for k in performers(model)] == [steps // interval]  # floor(k / r)


def test_resume_with_redraws_reproduces_the_uninterrupted_run(tiny, tmp_path):
    overrides = tiny(12) + ["model.kernel=performer", "model.kernel_options.num_features=8",
                            "model.kernel_options.redraw_interval=4", "model.dropout=0.1",
                            "train.checkpoint_every=5", "sample.tokens=0"]
    cfg = load_config(None, overrides)
    straight = train(cfg, run_dir=tmp_path / "straight", progress=False)
    first = train(cfg, run_dir=tmp_path / "split", stop_after=5, progress=False)  # mid-interval
    assert first.step == 5
    resumed = train(resume=tmp_path / "split", progress=False)
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in straight.history]
    a, _, _ = load_run(tmp_path / "straight")
    b, _, _ = load_run(tmp_path / "split")
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name


def test_a_checkpoint_with_the_old_call_counter_still_loads():
    old = PerformerAttention(num_features=8).state_dict()
    old["calls"] = torch.tensor(17)
    old["draws"] = torch.tensor(3)
    kernel = PerformerAttention(num_features=8)
    kernel.load_state_dict(old)  # strict
    assert int(kernel.draws) == 3 and "calls" not in kernel.state_dict()
