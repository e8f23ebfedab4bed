"""Training on packed batches (``train.packing``): the packed loss and gradients are the
padded batch's (float64, real task data), every packed example is computed as it is alone,
evaluation scores the same either way, bad configs are refused, and ``formerlab train``
with packing checkpoints and resumes."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from formerlab import data
from formerlab.data import IGNORE_INDEX, Batch
from formerlab.data.packing import pack_batch
from formerlab.models import DecoderLM, EncoderClassifier, TokenTagger
from formerlab.train import ConfigError, load_config, train
from formerlab.train.build import build_model, build_task, check_packing
from formerlab.train.evaluate import evaluate, model_logits, task_loss


@pytest.fixture
def float64():
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(before)


@pytest.fixture(scope="module")
def shakespeare():
    return data.build("shakespeare_chars", context=12)  # one text: windows, no documents


@pytest.fixture(scope="module")
def sst2():
    return data.build("sst2")


@pytest.fixture(scope="module")
def listops():
    return data.build("listops", train_size=40, val_size=24, min_len=8, max_len=48)


def masked_decoder_batch(rows=4, width=9, vocab=30, seed=0):
    """A decoder batch of documents of different lengths: right padding, IGNORE there."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([9, 3, 6, 1][:rows])
    mask = torch.arange(width)[None] < lengths[:, None]
    inputs = torch.randint(1, vocab, (rows, width), generator=g).masked_fill(~mask, 0)
    targets = torch.randint(0, vocab, (rows, width), generator=g).masked_fill(~mask, IGNORE_INDEX)
    return Batch(inputs, targets, mask)


def loss_and_grads(model, batch, task):
    loss = task_loss(model_logits(model, batch), batch, task)
    return loss, torch.autograd.grad(loss, list(model.parameters()))


def assert_packed_matches_padded(model, batch, task):
    padded_loss, padded_grads = loss_and_grads(model, batch, task)
    packed_loss, packed_grads = loss_and_grads(model, pack_batch(batch, task.kind), task)
    assert padded_loss.dtype == torch.float64
    torch.testing.assert_close(packed_loss, padded_loss, rtol=1e-12, atol=1e-12)
    for (name, _), a, b in zip(model.named_parameters(), packed_grads, padded_grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=name)
    assert any(g.abs().sum() > 0 for g in padded_grads)


class Kind:
    def __init__(self, kind):
        self.kind = kind


def model_options(kernel="softmax"):
    return dict(dim=16, depth=2, heads=2, mixer_options={"kernel": kernel})


# --- the packed loss and gradients are the padded batch's ------------------------------


@pytest.mark.parametrize("kernel", ["softmax", "linear"])
def test_language_model_windows(float64, shakespeare, kernel):
    task = shakespeare
    batch = task.batch("train", 3, torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    model = DecoderLM(task.vocab_size, max_len=12, **model_options(kernel))
    packed = pack_batch(batch, "decoder")
    assert packed.cu_seqlens.tolist() == [0, 12, 24, 36]  # boundaries at the windows
    assert_packed_matches_padded(model, batch, task)


@pytest.mark.parametrize("kernel", ["softmax", "linear"])
def test_language_model_documents_of_different_lengths(float64, kernel):
    torch.manual_seed(0)
    model = DecoderLM(30, max_len=9, **model_options(kernel))
    assert_packed_matches_padded(model, masked_decoder_batch(), Kind("decoder"))


@pytest.mark.parametrize("kernel", ["softmax", "nystrom"])
def test_classifier_on_sst2(float64, sst2, kernel):
    batch = sst2.batch("train", 6, torch.Generator().manual_seed(0))
    assert not batch.attention_mask.all()  # real padding
    torch.manual_seed(0)
    options = model_options(kernel)
    if kernel == "nystrom":
        options["mixer_options"]["num_landmarks"] = 2
    model = EncoderClassifier(sst2.vocab_size, 2, max_len=sst2.max_len, **options)
    assert_packed_matches_padded(model, batch, sst2)


def test_classifier_on_listops_with_mlp_head(float64, listops):
    batch = listops.batch("train", 5, torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    model = EncoderClassifier(listops.vocab_size, 10, max_len=48, head="mlp", **model_options())
    assert_packed_matches_padded(model, batch, listops)


def test_tagger_on_sort_and_on_ragged_rows(float64):
    task = data.build("sort", mode="tagger", length=5, num_values=6)
    torch.manual_seed(0)
    model = TokenTagger(task.vocab_size, 6, max_len=task.max_len, **model_options())
    assert_packed_matches_padded(model, task.batch("train", 3, torch.Generator()), task)
    ragged = masked_decoder_batch(vocab=6)
    ragged.inputs.clamp_(max=task.vocab_size - 1)
    assert_packed_matches_padded(model, ragged, Kind("tagger"))


# --- nothing crosses a boundary --------------------------------------------------------


@pytest.mark.parametrize("kind", ["decoder", "tagger", "encoder"])
def test_each_packed_example_is_computed_as_it_is_alone(float64, kind):
    torch.manual_seed(0)
    batch = masked_decoder_batch()
    if kind == "encoder":
        batch = Batch(batch.inputs, torch.tensor([0, 1, 2, 0]), batch.attention_mask)
        model = EncoderClassifier(30, 3, max_len=9, **model_options())
    elif kind == "tagger":
        model = TokenTagger(30, 30, max_len=9, **model_options())
    else:
        model = DecoderLM(30, max_len=9, **model_options())
    packed = pack_batch(batch, kind)
    logits = model_logits(model, packed)
    offsets = packed.cu_seqlens.tolist()
    for s, (a, b) in enumerate(zip(offsets[:-1], offsets[1:])):
        alone = model(packed.inputs[:, a:b])  # the example by itself, no padding
        torch.testing.assert_close(
            logits[s] if kind == "encoder" else logits[:, a:b],
            alone[0] if kind == "encoder" else alone,
            rtol=1e-12,
            atol=1e-12,
        )


def test_changing_one_example_changes_no_other(float64):
    torch.manual_seed(0)
    model = TokenTagger(30, 5, max_len=9, **model_options())
    batch = masked_decoder_batch()
    packed = pack_batch(batch, "tagger")
    before = model_logits(model, packed)
    packed.inputs[0, 9:12] = (packed.inputs[0, 9:12] + 1) % 30  # example 1 = tokens 9..11
    after = model_logits(model, packed)
    assert not torch.allclose(after[:, 9:12], before[:, 9:12])
    torch.testing.assert_close(after[:, :9], before[:, :9], rtol=0, atol=0)
    torch.testing.assert_close(after[:, 12:], before[:, 12:], rtol=0, atol=0)


# --- evaluation: the same metrics packed or padded -------------------------------------


def test_evaluation_scores_the_same_packed_or_padded(sst2, listops):
    torch.manual_seed(0)
    recall = data.build("recall", num_pairs=4, num_keys=8, num_values=8, num_queries=2)
    sort = data.build("sort", mode="tagger", length=5, num_values=6)
    cases = [
        (sst2, EncoderClassifier(sst2.vocab_size, 2, max_len=sst2.max_len, **model_options())),
        (listops, EncoderClassifier(listops.vocab_size, 10, max_len=48, **model_options())),
        (recall, DecoderLM(recall.vocab_size, max_len=recall.max_len, **model_options())),
        (sort, TokenTagger(sort.vocab_size, 6, max_len=sort.max_len, **model_options())),
    ]
    for task, model in cases:
        split = "train" if task is sst2 else "val"  # SST-2's val walks all 872 dev sentences
        padded = evaluate(model, task, split, batch_size=16, batches=3)
        packed = evaluate(model, task, split, batch_size=16, batches=3, packing=True)
        assert packed.keys() == padded.keys()
        for key in padded:
            assert packed[key] == pytest.approx(padded[key], rel=1e-6, abs=1e-7), (task.name, key)
    assert "exact_match" in padded  # recall: a per-sequence metric, scored from the padded layout


# --- configuration ----------------------------------------------------------------------


def test_packing_defaults_off_and_refuses_non_booleans():
    assert load_config().train.packing is False
    assert load_config(None, ["train.packing=true"]).train.packing is True
    for bad in ("1", "'sometimes'"):
        with pytest.raises(ConfigError, match=r"train\.packing: .*boolean \(got .*\)"):
            load_config(None, [f"train.packing={bad}"])


def test_packing_refuses_compile_and_a_mixer_that_cannot_pack(tmp_path):
    base = [
        "task.name=sort",
        "task.options.mode=tagger",
        "model.dim=16",
        "model.depth=1",
        "model.heads=2",
        "train.packing=true",
    ]
    for extra, message in [
        (["train.compile=true"], r"train\.packing=true cannot be combined with train\.compile"),
        (
            ["model.kernel=double_softmax"],
            r"train\.packing=true: token mixer 'attention' with kernel 'double_softmax' "
            r"cannot take cu_seqlens with causal=False",
        ),
    ]:
        cfg = load_config(None, base + extra)
        task = build_task(cfg)
        with pytest.raises(ValueError, match=message):
            check_packing(cfg, task, build_model(cfg, task))
    runs = tmp_path / "runs"  # train() refuses before it creates a run folder
    cfg = load_config(
        None, base + ["model.kernel=double_softmax", f"runs_dir={runs}", "tracking=none"]
    )
    with pytest.raises(ValueError, match=r"train\.packing=true: token mixer"):
        train(cfg, progress=False)
    assert not runs.exists() or not any(runs.iterdir())


# --- end to end: formerlab train with packing, checkpoint, resume ------------------------


def state_of(run_dir):
    return json.loads((run_dir / "checkpoint" / "state.json").read_text())


def test_cli_train_with_packing_checkpoints_and_resumes(tmp_path):
    from formerlab.cli import app

    config = {
        "name": "packed",
        "runs_dir": str(tmp_path / "runs"),
        "tracking": "none",
        "task": {
            "name": "listops",
            "options": {"train_size": 40, "val_size": 16, "min_len": 8, "max_len": 48},
        },
        "model": {"dim": 16, "depth": 1, "heads": 2},
        "train": {
            "steps": 3,
            "batch_size": 8,
            "warmup": 1,
            "eval_every": 3,
            "eval_batches": 2,
            "log_every": 3,
            "packing": True,
        },
    }
    path = tmp_path / "packed.yaml"
    path.write_text(yaml.safe_dump(config))
    runner = CliRunner()
    first = runner.invoke(app, ["train", str(path), "--no-progress"], env={"COLUMNS": "200"})
    assert first.exit_code == 0, first.output
    run_dir = Path(first.output.split("run:")[1].split()[0])
    assert (run_dir / "checkpoint" / "model.safetensors").is_file()
    resumed = runner.invoke(
        app,
        ["train", "--resume", str(run_dir), "--set", "train.steps=6", "--no-progress"],
        env={"COLUMNS": "200"},
    )
    assert resumed.exit_code == 0, resumed.output
    assert "validation at step 6" in resumed.output
    assert state_of(run_dir)["config"]["train"]["packing"] is True

    # the same two legs through the API: packed exactly as the CLI, padded up to rounding
    def two_legs(packing, where):
        cfg = load_config(path, [f"train.packing={str(packing).lower()}"])
        train(cfg, run_dir=where, progress=False)
        return train(resume=where, overrides=["train.steps=6"], progress=False)

    cli_history = [h for h in state_of(run_dir)["history"] if "eval" not in h]
    packed = two_legs(True, tmp_path / "api-packed")
    padded = two_legs(False, tmp_path / "api-padded")
    cli_losses = [h["loss"] for h in cli_history]
    assert [h["step"] for h in cli_history] == list(range(1, 7))
    assert cli_losses == [h["loss"] for h in packed.history]
    assert cli_losses == pytest.approx([h["loss"] for h in padded.history], rel=1e-5)
    assert packed.metrics == pytest.approx(padded.metrics, rel=1e-5)


@pytest.mark.parametrize("task", ["shakespeare", "sort_tagger"])
def test_packed_training_runs_follow_the_padded_ones(tiny, tmp_path, task):
    overrides = tiny(4) + ["sample.tokens=0", "train.eval_every=4"]
    if task == "sort_tagger":
        overrides = [o for o in overrides if not o.startswith("task.options")]
        overrides += ["task.name=sort", "task.options.mode=tagger", "task.options.length=6"]
    runs = {}
    for packing in (False, True):
        cfg = load_config(None, [*overrides, f"train.packing={str(packing).lower()}"])
        runs[packing] = train(cfg, run_dir=tmp_path / str(packing), progress=False)
    losses = {p: [h["loss"] for h in r.history] for p, r in runs.items()}
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)
    assert runs[True].metrics == pytest.approx(runs[False].metrics, rel=1e-5)
    assert runs[True].tokens_per_s > 0
