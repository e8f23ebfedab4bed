"""Studies on a saved tiny HF model + WordLevel tokenizer: approx --hf, loss study, viz --hf."""

import math

import pytest
import torch

pytest.importorskip("transformers")

from typer.testing import CliRunner  # noqa: E402

from formerlab.bench import hf_study  # noqa: E402
from formerlab.bench.approx import QKV  # noqa: E402
from formerlab.cli import app  # noqa: E402
from formerlab.integrations.hf import swap_attention  # noqa: E402

from .conftest import tiny_model  # noqa: E402

WORDS = "the a cat dog sat on mat ran to and big small red it was".split()
TEXT = " ".join(WORDS[i % len(WORDS)] for i in (3 * j * j + j for j in range(40)))
runner = CliRunner()


def save_with_tokenizer(folder, family, **overrides):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[MASK]"] + WORDS
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                            mask_token="[MASK]").save_pretrained(folder)
    tiny_model(family, head="lm", vocab=len(vocab), **overrides).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf-study")
    out = {f: save_with_tokenizer(root / f, f) for f in ("bert", "llama")}
    out["small"] = save_with_tokenizer(root / "small", "bert", num_hidden_layers=1, num_attention_heads=2)
    return out


def test_captured_qkv_give_back_the_models_attention_output(dirs):
    """Exact softmax on the captured q, k, v equals what the layer computed (the capture
    is the layer's real input: rotary, GQA heads, scaling)."""
    model, tokenizer, kind = hf_study.load_study_model(dirs["llama"])
    ids = hf_study.encode(tokenizer, TEXT, 64, model)
    sources, causal = hf_study.capture_qkv(model, ids)
    assert kind == "decoder" and causal and len(sources) == 2
    outputs = {}
    layer = model.model.layers[1].self_attn
    layer.o_proj.register_forward_hook(lambda mod, args, out: outputs.setdefault("x", args[0]))
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    q, k, v = (t.double() for t in (sources[1].q, sources[1].k, sources[1].v))
    n = q.shape[-2]
    scores = (q @ k.mT / math.sqrt(q.shape[-1])).masked_fill(
        ~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf"))
    ref = (scores.softmax(-1) @ v).transpose(1, 2).reshape(1, n, -1)
    assert torch.allclose(outputs["x"].double(), ref, atol=1e-5)
    assert isinstance(sources[0], QKV) and sources[0].q.shape[1] == 4  # kv heads expanded


def test_loss_study_exact_settings_cost_nothing_and_approximate_ones_do(dirs):
    base, rows, facts = hf_study.loss_study(
        dirs["bert"], TEXT, settings=[("nystrom", {"num_landmarks": 64}),
                                      ("nystrom", {"num_landmarks": 4, "pinv_iters": 2})],
        repeats=1)
    assert facts["loss"] == "masked-LM" and math.isfinite(base)
    assert abs(rows[0].delta) <= 1e-4 * abs(base)
    assert abs(rows[1].delta) > 1e-3
    base, rows, facts = hf_study.loss_study(
        dirs["llama"], TEXT, settings=[("causal_nystrom", {"segment_size": 1}),
                                       ("causal_nystrom", {"segment_size": 8})], repeats=1)
    assert facts["loss"] == "next-token"
    # the next-token loss with the exact setting equals HF's own loss on the text
    model, tokenizer, _ = hf_study.load_study_model(dirs["llama"])
    ids = hf_study.encode(tokenizer, TEXT, 512, model)
    with torch.no_grad():
        own = float(model(input_ids=ids, labels=ids, use_cache=False).loss)
    assert abs(base - own) <= 1e-6 and abs(rows[0].delta) <= 1e-4 * abs(base)
    assert abs(rows[1].delta) > 1e-3


def test_default_grid_has_the_asked_options():
    enc = hf_study.default_settings(False, 200)
    ms = {o["num_landmarks"] for k, o in enc if k == "nystrom"}
    iters = {o["pinv_iters"] for k, o in enc if k == "nystrom"}
    assert ms == {16, 32, 64} and min(iters) == 2 and max(iters) == 12
    dec = hf_study.default_settings(True, 200)
    assert all(k in ("causal_nystrom", "linear", "performer") for k, _ in dec)
    with pytest.raises(ValueError, match="causal kernels"):
        swap_attention(tiny_model("llama"), "nystrom")


def test_approx_command_on_an_encoder(dirs, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    plot = tmp_path / "loss.png"
    result = runner.invoke(app, ["approx", "--hf", str(dirs["bert"]), "--text", str(text),
                                 "--landmarks", "8", "--curve-iters", "6", "--plot", str(plot),
                                 "--markdown"], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    out = result.output
    for name in ("layer 0", "layer 1", "nystrom (6 iters)", "performer", "linear", "by pinv iteration"):
        assert name in out, name
    assert "masked-LM loss on the text" in out
    assert "nystrom (num_landmarks=16, pinv_iters=2)" in out and "time / exact" in out
    assert plot.is_file() and plot.stat().st_size > 5000


def test_approx_command_on_a_decoder_lists_causal_kernels_only(dirs, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    result = runner.invoke(app, ["approx", "--hf", str(dirs["llama"]), "--text", str(text),
                                 "--layers", "1", "--landmarks", "8", "--no-loss", "--markdown"],
                           env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    assert "layer 1" in result.output and "layer 0 |" not in result.output
    assert "causal_nystrom" in result.output and "double_softmax" not in result.output
    bad = runner.invoke(app, ["approx", "--hf", str(tmp_path), "--text", str(text)])
    assert bad.exit_code != 0 and "config.json" in bad.output


def test_viz_attention_hf_writes_pngs(dirs, tmp_path):
    result = runner.invoke(app, ["viz", "attention", "--hf", str(dirs["llama"]), "--text", TEXT[:80],
                                 "--layer", "1", "--head", "2", "--out", str(tmp_path / "one.png")],
                           env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert (tmp_path / "one.png").is_file() and "causal_nystrom" in result.output
    result = runner.invoke(app, ["viz", "attention", "--hf", str(dirs["small"]), "--text", TEXT[:30],
                                 "--every", "--out", str(tmp_path / "maps")], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert len(list((tmp_path / "maps").glob("attention-layer*-head*.png"))) == 1 * 2


def test_viz_maps_error_is_zero_for_an_exact_setting(dirs):
    tokens, maps, facts = hf_study.attention_maps(
        dirs["bert"], TEXT[:60], 0, 1, [("nystrom", {"num_landmarks": 64}), ("nystrom", {"num_landmarks": 3})])
    assert maps[1].error <= 1e-6 and maps[2].error > 1e-2
    assert len(tokens) == facts["n"] == maps[0].weights.shape[0]
