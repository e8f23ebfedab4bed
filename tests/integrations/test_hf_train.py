"""`formerlab train` with model.hf: a local HF checkpoint, swapped attention, formerlab's loop."""

import pytest
import torch

pytest.importorskip("transformers")

from formerlab.train import load_config, load_run, train  # noqa: E402

from .conftest import tiny_model  # noqa: E402


def losses(result):
    return [h["loss"] for h in result.history]


def overrides(tmp_path, model_dir, task, kernel, options, steps):
    sets = [
        f"model.hf={{path: {model_dir}, kernel: {kernel}, kernel_options: {options}}}",
        f"train.steps={steps}", "train.batch_size=8", "train.warmup=2", "train.lr=3e-3",
        "train.eval_every=10", "train.eval_batches=1", "train.log_every=5",
        "sample.tokens=5", f"runs_dir={tmp_path / 'runs'}", "tracking=none",
    ]
    if task == "sort":
        return sets + ["task.name=sort", "task.options.length=8"]
    return sets + [
        "task.name=listops", "task.options.min_len=8", "task.options.max_len=24",
        "task.options.train_size=16", "task.options.val_size=8",
    ]


@pytest.fixture
def saved(tmp_path):
    def save(family, vocab=16):
        folder = tmp_path / f"hf-{family}"
        model = tiny_model(family, head="lm" if family == "gpt2" else "base", vocab=vocab)
        model.config.initializer_range = 0.02
        model.save_pretrained(folder)
        return folder
    return save


def test_decoder_fine_tune_lowers_the_loss_and_resumes_exactly(saved, tmp_path):
    folder = saved("gpt2")
    sets = overrides(tmp_path, folder, "sort", "causal_nystrom", "{segment_size: 4}", 20)
    cfg = load_config(None, sets)
    straight = train(cfg, run_dir=tmp_path / "straight", progress=False)
    first, last = losses(straight)[:3], losses(straight)[-3:]
    assert sum(last) / 3 < 0.9 * sum(first) / 3
    assert (tmp_path / "straight" / "checkpoint" / "model.safetensors").is_file()
    split = train(cfg, run_dir=tmp_path / "split", stop_after=10, progress=False)
    assert split.step == 10
    resumed = train(resume=tmp_path / "split", progress=False)
    assert losses(resumed) == losses(straight)  # bit-identical
    a, _, _ = load_run(tmp_path / "straight")
    b, _, _ = load_run(tmp_path / "split")
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name
    assert a.hf.config._attn_implementation == "formerlab"
    out = a.generate(torch.tensor([[1, 2, 3]]), 4, generator=torch.Generator().manual_seed(0))
    assert out.shape == (1, 7) and torch.equal(out[:, :3], torch.tensor([[1, 2, 3]]))
    # the fine-tuned weights export as a plain HF model: with exact attention it matches
    # the adapter run with exact (segment 1) causal Nyström
    import transformers

    from formerlab.integrations.hf import swap_attention

    exported = transformers.AutoModelForCausalLM.from_pretrained(a.save_pretrained(tmp_path / "export")).eval()
    x = torch.randint(0, 11, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        plain = exported(input_ids=x, use_cache=False).logits
        swap_attention(a.hf, "causal_nystrom", segment_size=1)
        assert torch.allclose(a(x), plain, atol=1e-5)
        assert not torch.allclose(plain, tiny_model("gpt2", head="lm", vocab=16)(input_ids=x).logits, atol=1e-2)


def test_encoder_classification_fine_tune_lowers_the_loss(saved, tmp_path):
    folder = saved("bert")
    sets = overrides(tmp_path, folder, "listops", "nystrom", "{num_landmarks: 4}", 40)
    result = train(load_config(None, sets), run_dir=tmp_path / "enc", progress=False)
    first, last = losses(result)[:5], losses(result)[-10:]
    # a pool of 16 training expressions: the swapped BERT can fit them in 40 steps
    assert sum(last) / 10 < 0.6 * sum(first) / 5
    assert "accuracy" in result.metrics


def test_bad_hf_configs_fail_before_training(saved, tmp_path):
    gpt2 = saved("gpt2")
    with pytest.raises(ValueError, match="causal kernels"):
        train(load_config(None, overrides(tmp_path, gpt2, "sort", "nystrom", "{}", 2)),
              run_dir=tmp_path / "a", progress=False)
    with pytest.raises(ValueError, match="unknown|not a"):
        load_config(None, overrides(tmp_path, gpt2, "sort", "nope", "{}", 2))
    with pytest.raises(FileNotFoundError, match="config.json"):
        train(load_config(None, overrides(tmp_path, tmp_path / "missing", "sort", "linear", "{}", 2)),
              run_dir=tmp_path / "b", progress=False)
    small = saved("llama", vocab=8)
    with pytest.raises(ValueError, match="embeds only 8"):
        train(load_config(None, overrides(tmp_path, small, "sort", "linear", "{}", 2)),
              run_dir=tmp_path / "c", progress=False)
    bert = saved("bert")
    with pytest.raises(ValueError, match="bidirectionally"):
        train(load_config(None, overrides(tmp_path, bert, "sort", "linear", "{}", 2)),
              run_dir=tmp_path / "d", progress=False)


@pytest.mark.parametrize(("family", "task", "kernel", "options"), [
    ("bert", "listops", "nystrom", "{num_landmarks: 4}"),  # expressions of 8-24 tokens
    ("llama", "sort", "linear", "{}"),
])
def test_packed_fine_tune_follows_the_padded_one(saved, tmp_path, family, task, kernel, options):
    """train.packing with model.hf: the same examples packed into one row give the padded
    run's losses (no dropout in the tiny models), step by step."""
    folder = saved(family, vocab=16 if task == "sort" else 32)
    sets = overrides(tmp_path, folder, task, kernel, options, 6) + ["train.threads=1"]
    padded = train(load_config(None, sets), run_dir=tmp_path / "padded", progress=False)
    packed = train(load_config(None, [*sets, "train.packing=true"]), run_dir=tmp_path / "packed",
                   progress=False)
    assert losses(packed) == pytest.approx(losses(padded), rel=1e-4, abs=1e-5)
    assert losses(packed)[0] != losses(packed)[-1]  # it trained
    assert packed.metrics == pytest.approx(padded.metrics, rel=1e-4, abs=1e-5)


def test_packing_with_a_kernel_that_cannot_pack_is_refused(saved, tmp_path):
    folder = saved("bert", vocab=32)
    sets = overrides(tmp_path, folder, "listops", "double_softmax", "{}", 2)
    with pytest.raises(ValueError, match=r"model.hf.kernel='double_softmax' cannot take cu_seqlens"):
        train(load_config(None, [*sets, "train.packing=true"]), progress=False)
    assert not (tmp_path / "runs").exists()
