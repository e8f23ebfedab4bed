"""DecoderLM trains, generates and stays causal with every causal attention kernel."""

import pytest
import torch
import torch.nn.functional as F

from formerlab import attention
from formerlab.mixers.self_attention import SelfAttention
from formerlab.models import DecoderLM
from formerlab.testing import assert_no_future_leak

CAUSAL = attention.available(causal=True)
OPTIONS = {"causal_nystrom": {"segment_size": 4}, "performer": {"num_features": 32}}


def _lm(name, max_len=16):
    options = {"kernel": name, **OPTIONS.get(name, {})}
    return DecoderLM(8, dim=32, depth=1, heads=2, max_len=max_len, mixer_options=options)


@pytest.mark.parametrize("name", CAUSAL)
def test_decoder_trains_and_generates(name):
    torch.manual_seed(0)
    lm = _lm(name)
    data = torch.arange(17).remainder(8).repeat(4, 1)  # periodic: learnable in a few steps
    opt = torch.optim.AdamW(lm.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        logits = lm(data[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, 8), data[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(map(torch.isfinite, map(torch.tensor, losses)))
    assert losses[-1] < 0.6 * losses[0]
    lm.eval()
    out = lm.generate(data[:1, :5], tokens=12, generator=torch.Generator().manual_seed(0))
    assert out.shape == (1, 17) and out.min() >= 0 and out.max() < 8
    torch.testing.assert_close(out[:, :5], data[:1, :5])


@pytest.mark.parametrize("name", CAUSAL)
def test_decoder_is_causal_end_to_end(name):
    torch.manual_seed(1)
    lm = _lm(name).eval()
    ids = torch.randint(0, 8, (2, 12))
    assert_no_future_leak(lm, [ids], seq_dim=1, check_grad=False, atol=1e-5)


@pytest.mark.parametrize("name", CAUSAL)
def test_self_attention_mixer_is_causal_with_gradients(name):
    torch.manual_seed(2)
    mixer = SelfAttention(16, heads=2, kernel=name, **OPTIONS.get(name, {})).double().eval()
    x = torch.randn(2, 11, 16, dtype=torch.float64)
    assert_no_future_leak(lambda t: mixer(t, causal=True), [x], seq_dim=1)


@pytest.mark.parametrize("name", CAUSAL)
def test_train_and_generate_through_the_run_api(name, tiny, tmp_path):
    from formerlab.train import load_config, load_run, train

    overrides = tiny(6) + [f"model.kernel={name}", "sample.tokens=8"]
    result = train(load_config(None, overrides), run_dir=tmp_path / name, progress=False)
    assert result.step == 6
    model, task, cfg = load_run(result.run_dir)
    assert cfg.model.kernel == name
    ids = torch.tensor([task.encode("To be")])
    out = model.generate(ids, 8, generator=torch.Generator().manual_seed(0))
    assert out.shape == (1, ids.shape[1] + 8)
    assert isinstance(task.decode(out[0].tolist()), str)


def test_formerlab_generate_command_with_an_efficient_kernel(tiny, tmp_path):
    from typer.testing import CliRunner

    from formerlab.cli import app
    from formerlab.train import load_config, train

    overrides = tiny(4) + ["model.kernel=causal_nystrom", "model.kernel_options.segment_size=8"]
    result = train(load_config(None, overrides), run_dir=tmp_path / "run", progress=False)
    sample = CliRunner().invoke(
        app, ["generate", str(result.run_dir), "--prompt", "ROMEO:", "--tokens", "10"]
    )
    assert sample.exit_code == 0, sample.output
    assert sample.output.startswith("ROMEO:")
