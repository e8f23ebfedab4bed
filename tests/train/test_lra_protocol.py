"""The pieces of the Long Range Arena protocol: the one-cycle schedule (against torch's
OneCycleLR), AdamW's eps, no clipping, the MLP head, causal classifiers, and the test split
scored once at the best validation checkpoint."""

import json

import pytest
import torch
from safetensors.torch import load_model

from formerlab.data.listops import ListOps
from formerlab.models import EncoderClassifier
from formerlab.train import ConfigError, load_config, train
from formerlab.train.build import build_model, build_task
from formerlab.train.config import TrainConfig
from formerlab.train.evaluate import evaluate
from formerlab.train.loop import make_optimizer
from formerlab.train.schedule import beta1, learning_rate


@pytest.mark.parametrize(("steps", "warmup"), [(50, 10), (5000, 1000), (7, 2)])
def test_one_cycle_equals_torch_one_cycle_lr(steps, warmup):
    t = TrainConfig(steps=steps, warmup=warmup, lr=1e-4, schedule="one_cycle")
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([param], lr=t.lr, betas=(0.9, 0.999))
    torch_schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=t.lr, total_steps=steps, pct_start=warmup / steps,
        anneal_strategy="linear",
    )
    for step in range(steps):
        group = optimizer.param_groups[0]
        assert learning_rate(step, t) == pytest.approx(group["lr"], rel=1e-9, abs=1e-18), step
        assert beta1(step, t) == pytest.approx(group["betas"][0], rel=1e-12), step
        optimizer.step()
        torch_schedule.step()


def test_cosine_schedule_warms_up_and_ends_at_min_lr():
    t = TrainConfig(steps=100, warmup=10, lr=1.0, min_lr=0.1)
    assert learning_rate(0, t) == pytest.approx(0.1)
    assert learning_rate(9, t) == pytest.approx(1.0)
    assert learning_rate(55, t) == pytest.approx(0.55)  # halfway through the decay
    assert learning_rate(100, t) == pytest.approx(0.1)
    assert beta1(50, t) == t.beta1


@pytest.mark.parametrize("warmup", [0, 1, 100])
def test_one_cycle_refuses_a_warmup_it_cannot_follow(warmup):
    with pytest.raises(ConfigError, match=r"train.warmup=.*one_cycle.*2 <= warmup < steps"):
        load_config(None, ["train.schedule=one_cycle", f"train.warmup={warmup}", "train.steps=100"])


def test_optimizer_takes_eps_and_betas():
    cfg = load_config(None, ["train.eps=1e-6", "train.beta2=0.999", "tracking=none"])
    optimizer = make_optimizer(torch.nn.Linear(2, 2), cfg)
    assert all(g["eps"] == 1e-6 and g["betas"] == (0.9, 0.999) for g in optimizer.param_groups)


def listops_overrides(tmp_path, steps=6, eval_every=2):
    return [
        "task.name=listops", "task.options.train_size=64", "task.options.val_size=16",
        "task.options.test_size=16", "task.options.min_len=8", "task.options.max_len=40",
        "task.options.max_depth=3", "model.dim=16", "model.depth=1", "model.heads=2",
        "model.mlp_ratio=2", "model.head=mlp", f"train.steps={steps}", "train.batch_size=8",
        "train.warmup=2", "train.schedule=one_cycle", "train.lr=3e-2", "train.grad_clip=null",
        f"train.eval_every={eval_every}", "train.eval_batches=2", "train.test_at_best=true",
        f"runs_dir={tmp_path / 'runs'}", "tracking=none",
    ]


def test_test_split_is_scored_once_with_the_best_validation_weights(tmp_path, monkeypatch):
    import formerlab.train.loop as loop

    def no_clipping(*args, **kwargs):
        raise AssertionError("train.grad_clip=null must not clip")

    monkeypatch.setattr(loop.nn.utils, "clip_grad_norm_", no_clipping)
    cfg = load_config(None, listops_overrides(tmp_path))
    result = train(cfg, run_dir=tmp_path / "run", progress=False)
    accuracies = [e["eval"]["accuracy"] for e in result.evals]
    best_step = result.evals[accuracies.index(max(accuracies))]["step"]  # ties: the earliest
    record = json.loads((tmp_path / "run" / "test.json").read_text())
    assert record == result.test and record["best_step"] == best_step
    assert record["val"]["accuracy"] == max(accuracies)
    # ground truth: a fresh model with the best weights, scored on the test split
    task = build_task(cfg)
    model = build_model(cfg, task)
    load_model(model, str(tmp_path / "run" / "best" / "model.safetensors"))
    expected = evaluate(model, task, "test", 8, 2)
    assert record["test"] == pytest.approx(expected, rel=1e-6)
    assert record["test"] != evaluate(model, task, "val", 8, 2)  # the test split, not val


def test_best_checkpoint_survives_a_resume(tmp_path):
    cfg = load_config(None, listops_overrides(tmp_path, steps=8))
    straight = train(cfg, run_dir=tmp_path / "straight", progress=False)
    train(cfg, run_dir=tmp_path / "split", stop_after=4, progress=False)
    resumed = train(resume=tmp_path / "split", progress=False)
    assert resumed.test == straight.test
    # each evaluation records the run's wall-clock time so far, counted across the resume
    elapsed = [e["elapsed_s"] for e in resumed.evals]
    assert len(elapsed) == 4 and all(b > a > 0 for a, b in zip(elapsed, elapsed[1:]))


def test_test_at_best_needs_a_test_split_before_any_run_folder(tmp_path):
    overrides = [o for o in listops_overrides(tmp_path) if "test_size" not in o]
    with pytest.raises(ValueError, match="test_at_best=true needs a task with a test split"):
        train(load_config(None, overrides), progress=False)
    assert not (tmp_path / "runs").exists()


def test_mlp_head_is_the_lra_head():
    model = EncoderClassifier(16, 10, dim=64, depth=1, heads=2, max_len=8, mlp_ratio=2, head="mlp")
    first, act, last = model.head
    assert (first.in_features, first.out_features, last.out_features) == (64, 128, 10)
    assert isinstance(act, torch.nn.ReLU)
    with pytest.raises(ValueError, match="head='conv'"):
        EncoderClassifier(16, 10, dim=8, depth=1, heads=2, max_len=8, head="conv")


@pytest.mark.parametrize("causal", [True, False])
def test_causal_classifier_reads_only_prefixes(causal):
    torch.manual_seed(0)
    model = EncoderClassifier(16, 3, dim=16, depth=2, heads=2, max_len=12, causal=causal).eval()
    seen = []
    model.body.register_forward_hook(lambda module, args, out: seen.append(out))
    ids = torch.randint(0, 16, (2, 12))
    changed = ids.clone()
    changed[:, -1] = (ids[:, -1] + 1) % 16
    model(ids), model(changed)
    before = (seen[0][:, :-1] - seen[1][:, :-1]).abs().max()
    assert (before == 0) if causal else (before > 1e-4)
    assert (seen[0][:, -1] - seen[1][:, -1]).abs().max() > 1e-4  # the last position does see it


def test_causal_and_head_options_are_checked_against_the_task(tmp_path):
    base = listops_overrides(tmp_path)
    with pytest.raises(ValueError, match="model.kernel='nystrom' cannot run causally.*model.causal"):
        build_model(cfg := load_config(None, [*base, "model.kernel=nystrom", "model.causal=true"]),
                    build_task(cfg))
    with pytest.raises(ValueError, match="model.mixer='gated_deltanet' runs only causally.*"
                                         "model.causal: true"):
        build_model(cfg := load_config(None, [*base, "model.mixer=gated_deltanet"]),
                    build_task(cfg))
    causal = build_model(cfg := load_config(
        None, [*base, "model.mixer=gated_deltanet", "model.causal=true"]), build_task(cfg))
    assert causal.causal
    decoder = ["model.head=mlp", "tracking=none"]
    with pytest.raises(ValueError, match="model.head='mlp' is for encoder"):
        build_model(cfg := load_config(None, decoder), build_task(cfg))


def test_listops_test_split_is_disjoint_and_sized():
    task = ListOps(train_size=200, val_size=30, test_size=30, min_len=8, max_len=60, max_depth=4)
    pools = {s: {bytes(ids) for ids, _ in task.examples(s)} for s in task.splits}
    assert [len(p) for p in pools.values()] == [200, 30, 30]
    assert not (pools["test"] & pools["train"]) and not (pools["test"] & pools["val"])
    assert ListOps(train_size=10, val_size=5).splits == ("train", "val")
    with pytest.raises(ValueError, match="test_size=-1"):
        ListOps(test_size=-1)
