"""Linearization of an HF causal LM: attention transfer, fine-tuning, save / reload, resume.

A tiny random Llama (2 layers, width 32) on the generated ``sort`` task (no data files).
"""

import pytest
import torch

pytest.importorskip("transformers")

from formerlab.experiments.linearize import (  # noqa: E402
    LinearizeConfig,
    gap_closed,
    linearize,
    load_linearize_config,
)
from formerlab.integrations.hf import swapped_layers  # noqa: E402
from formerlab.integrations.linearize import (  # noqa: E402
    apply_mechanism,
    attention_transfer,
    load_linearized,
    mechanism_parameters,
    save_linearized,
)
from formerlab.train import ConfigError  # noqa: E402

from .conftest import tiny_model  # noqa: E402

TASK = {"name": "sort", "options": {"length": 8}}


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: one thread (a second one only waits for a core on a shared machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _llama(seed=0):
    model = tiny_model("llama", head="lm", seed=seed, vocab=16)
    return model.train()


def _ids(seed=0, b=4, n=17):
    return torch.randint(0, 16, (b, n), generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def base(tmp_path):
    folder = tmp_path / "base"
    model = tiny_model("llama", head="lm", vocab=16)
    model.config.initializer_range = 0.02
    model.save_pretrained(folder)
    return folder


def _config(base, tmp_path, **changes):
    raw = dict(
        model=str(base),
        runs_dir=str(tmp_path / "runs"),
        task=TASK,
        mechanism={"kernel": "hedgehog", "options": {"gate": True, "gate_init": 3.0}},
        transfer={"steps": 4, "batch_size": 4, "warmup": 2},
        finetune={"steps": 4, "batch_size": 4, "warmup": 2},
        eval_every=3,
        eval_batches=1,
        eval_batch_size=4,
        log_every=2,
        tracking="none",
    )
    raw.update(changes)
    return LinearizeConfig.model_validate(raw)


def _frozen_state(model):
    kernel_ids = {id(p) for p in mechanism_parameters(model)}
    return {
        name: p.detach().clone() for name, p in model.named_parameters() if id(p) not in kernel_ids
    }


@pytest.mark.parametrize("gate", [False, True])
def test_attention_transfer_lowers_each_layers_output_mse_and_trains_only_the_mechanism(gate):
    model = _llama()
    apply_mechanism(model, "hedgehog", {"gate": gate, "gate_init": 3.0})
    own = mechanism_parameters(model)
    expected = 4 if not gate else 6  # phi_q, phi_k (weight, bias) [+ gate weight, bias]
    assert len(own) == expected * 2  # two layers
    for p in model.parameters():
        p.requires_grad_(False)
    for p in own:
        p.requires_grad_(True)
    frozen = _frozen_state(model)
    optimizer = torch.optim.Adam(own, lr=3e-2)
    ids = _ids()
    with attention_transfer(model) as losses:
        model(input_ids=ids)
        first = losses.output_mse()
        for _ in range(25):
            model(input_ids=ids)
            optimizer.zero_grad()
            losses.total().backward()
            optimizer.step()
        model(input_ids=ids)
        last = losses.output_mse()
    assert all(b < 0.5 * a for a, b in zip(first, last)), (first, last)
    for name, p in model.named_parameters():
        if name in frozen:
            assert not p.requires_grad and p.grad is None, name
            assert torch.equal(p, frozen[name]), name  # bit-identical
    # outside the context the swapped layers run the trained mechanism again
    assert all(
        type(layer.kernel).__name__ == "HedgehogAttention" for layer in swapped_layers(model)
    )


def test_attention_transfer_outputs_the_original_attention():
    model, original = _llama(), _llama()
    apply_mechanism(model, "hedgehog")
    ids = _ids()
    with torch.no_grad(), attention_transfer(model):
        teacher_forced = model(input_ids=ids).logits
    torch.testing.assert_close(teacher_forced, original(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_attention_cross_entropy_reaches_every_feature_map():
    model = _llama()
    apply_mechanism(model, "hedgehog")
    for p in model.parameters():
        p.requires_grad_(False)
    for p in mechanism_parameters(model):
        p.requires_grad_(True)
    with attention_transfer(model, attention_ce=1.0, mse=0.0) as losses:
        model(input_ids=_ids())
        losses.total().backward()
    # a row's cross-entropy is at least its entropy: positive for the tiny model's attention
    assert losses.total().item() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in mechanism_parameters(model))


@pytest.mark.parametrize("kernel, options", [("hedgehog", {"gate": True}), ("linear", {})])
def test_saved_folder_reloads_with_the_swap_and_identical_logits(tmp_path, kernel, options):
    model = _llama()
    apply_mechanism(model, kernel, options, layers=[1])
    with torch.no_grad():
        for p in mechanism_parameters(model):
            p.add_(0.1 * torch.randn_like(p))
    model.eval()
    ids = _ids()
    with torch.no_grad():
        before = model(input_ids=ids).logits
    folder = save_linearized(model, tmp_path / "saved")
    assert (folder / "config.json").is_file()
    with torch.no_grad():
        again = model(input_ids=ids).logits  # the saved model keeps its trained mechanism
    loaded = load_linearized(folder)
    with torch.no_grad():
        after = loaded(input_ids=ids).logits
    assert torch.equal(again, before)
    assert torch.equal(after, before)
    assert loaded._formerlab_swap.layers == [1]
    assert loaded.config._attn_implementation == "formerlab"


@pytest.mark.parametrize("gate", [False, True])
def test_generate_streams_the_trained_mechanism_like_the_recomputed_sequence(gate):
    model = _llama()
    apply_mechanism(model, "hedgehog", {"gate": gate, "gate_init": 2.0})
    with torch.no_grad():
        for p in mechanism_parameters(model):
            p.add_(0.2 * torch.randn_like(p))
    model.eval()
    ids = _ids(b=1, n=5)
    cached = model.generate(ids, max_new_tokens=6, do_sample=False)  # a FormerlabCache
    recomputed = model.generate(ids, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(cached, recomputed)


def test_run_reports_losses_gap_closed_and_saves_a_loadable_model(base, tmp_path):
    result = linearize(_config(base, tmp_path), progress=False)
    losses = result.losses
    assert set(losses) == {"original", "swap", "transfer", "finetune"}
    assert all(isinstance(v, float) for v in losses.values())
    expected = (losses["swap"] - losses["finetune"]) / (losses["swap"] - losses["original"])
    assert result.gap_closed["finetune"] == pytest.approx(expected)
    assert result.steps == {"transfer": 4, "finetune": 4}
    assert (result.run_dir / "results.json").is_file()
    assert (result.run_dir / "checkpoint" / "model.safetensors").is_file()
    model = load_linearized(result.model_dir)
    assert type(swapped_layers(model)[0].kernel).__name__ == "HedgehogAttention"


def test_resume_continues_exactly(base, tmp_path):
    cfg = _config(base, tmp_path)
    straight = linearize(cfg, run_dir=tmp_path / "straight", progress=False)
    for stop in (4, 6):  # at the stage boundary (a transfer checkpoint), inside fine-tuning
        run_dir = tmp_path / f"split-{stop}"
        part = linearize(cfg, run_dir=run_dir, stop_after=stop, progress=False)
        assert part.model_dir is None and len(part.history) == stop
        resumed = linearize(resume=run_dir, progress=False)
        assert [h["loss"] for h in resumed.history] == [h["loss"] for h in straight.history]
        assert resumed.losses == straight.losses
        a, b = load_linearized(straight.model_dir), load_linearized(resumed.model_dir)
        for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
            assert torch.equal(p, q), name


def test_a_mechanism_without_parameters_skips_the_transfer(base, tmp_path):
    cfg = _config(base, tmp_path, mechanism={"kernel": "linear"})
    result = linearize(cfg, progress=False)
    assert result.steps == {"transfer": 0, "finetune": 4}
    assert result.losses["transfer"] is None and result.gap_closed["transfer"] is None
    assert result.gap_closed["finetune"] == pytest.approx(
        gap_closed(result.losses["original"], result.losses["swap"], result.losses["finetune"])
    )


def test_gap_closed():
    assert gap_closed(1.0, 2.0, 1.25) == pytest.approx(0.75)
    assert gap_closed(1.0, 1.0, 0.9) is None


def test_bad_configs_name_the_key(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: somewhere\nmechanism: {kernel: softmax}\n")
    with pytest.raises(ConfigError, match="mechanism"):
        load_linearize_config(path)
    with pytest.raises(ConfigError, match="feature_dims"):
        load_linearize_config(None, ["model=x", "mechanism.options={feature_dims: 3}"])
    with pytest.raises(ConfigError, match="transfer.steps"):
        load_linearize_config(None, ["model=x", "transfer.steps=-1"])


def test_lora_fine_tuning_trains_adapters_and_the_mechanism_only(base, tmp_path):
    pytest.importorskip("peft")
    cfg = _config(
        base,
        tmp_path,
        transfer={"steps": 2, "batch_size": 4, "warmup": 1},
        finetune={"steps": 3, "batch_size": 4, "warmup": 1, "lora": {"r": 2}},
    )
    original = load_linearized  # the saved model has the adapters merged in
    result = linearize(cfg, progress=False)
    model = original(result.model_dir)
    assert not any("lora" in name for name, _ in model.named_parameters())
    ref = tiny_model("llama", head="lm", vocab=16)
    changed = [
        name
        for name, p in model.named_parameters()
        if name in dict(ref.named_parameters())
        and not torch.equal(p, dict(ref.named_parameters())[name])
    ]
    # the merged adapters changed exactly the targeted projections
    assert changed and all(
        n.split(".")[-2] in ("q_proj", "k_proj", "v_proj", "o_proj") for n in changed
    ), changed


def test_cli_runs_a_config_with_mlflow_tracking(base, tmp_path):
    import json

    import yaml
    from typer.testing import CliRunner

    from formerlab.cli import app

    raw = _config(base, tmp_path, tracking="mlflow").model_dump(mode="json")
    raw["transfer"]["steps"] = raw["finetune"]["steps"] = 2
    path = tmp_path / "linearize.yaml"
    path.write_text(yaml.safe_dump(raw))
    out = CliRunner().invoke(app, ["linearize", str(path), "--no-progress"])
    assert out.exit_code == 0, out.output
    assert "eval transfer" in out.output and "gap closed" in out.output
    (run_dir,) = (tmp_path / "runs").glob("linearize-*")
    assert (run_dir / "mlflow_run_id").is_file() and (tmp_path / "runs" / "mlflow.db").is_file()
    assert json.loads((run_dir / "results.json").read_text())["steps"] == {
        "transfer": 2,
        "finetune": 2,
    }
    again = CliRunner().invoke(app, ["linearize", "--resume", str(run_dir), "--set", "a=1"])
    assert again.exit_code == 2 and "--set does not apply" in again.output
