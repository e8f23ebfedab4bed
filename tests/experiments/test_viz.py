"""Attention maps of a trained run: same q/k for every kernel, errors against softmax."""

import pytest
import torch
from typer.testing import CliRunner

from formerlab.cli import app
from formerlab.experiments.viz import (
    attention_figure,
    attention_maps,
    parse_kernel_spec,
    relative_error,
)
from formerlab.train import load_config, load_run, train

runner = CliRunner()
TEXT = "3 1 4 1 0 2 | _ _ _ _ _ _"


def _train(tmp_path, name, *overrides):
    cfg = load_config(None, [
        "task.name=sort", "task.options={length: 6, num_values: 5, mode: tagger}",
        "model.dim=16", "model.depth=2", "model.heads=2", "train.steps=6", "train.batch_size=8",
        "train.warmup=1", "train.eval_every=6", "train.eval_batches=1", "tracking=none",
        f"runs_dir={tmp_path}", *overrides,
    ])
    return train(cfg, run_dir=tmp_path / name, progress=False).run_dir


@pytest.fixture(scope="module")
def tagger_run(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("viz"), "tagger")


def test_figure_has_softmax_nystrom_variants_and_asked_kernels(tagger_run, tmp_path):
    path, panels = attention_figure(tagger_run, TEXT, layer=1, head=1,
                                    kernels=["performer:num_features=16", "linear"],
                                    num_landmarks=3, out=tmp_path / "maps.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    titles = [p.title for p in panels]
    assert titles == ["exact softmax", "Nyström, 6 iterations", "Nyström, to tolerance 1e-6",
                      "Nyström, exact pinv", "performer (num_features=16)", "linear"]
    exact = panels[0].weights
    assert exact.shape == (13, 13)
    torch.testing.assert_close(exact.sum(-1), torch.ones(13))
    for panel in panels[1:]:
        assert panel.weights.shape == (13, 13) and 0.0 < panel.error < 10.0


def test_reference_is_the_attention_the_model_computed(tagger_run):
    """The softmax panel, applied to v, gives what the trained layer's kernel output."""
    model, task, _ = load_run(tagger_run)
    _, panels, _ = attention_maps(tagger_run, TEXT, layer=0, head=1)
    captured = {}
    mixer = model.body.blocks[0].mixer
    handle = mixer.kernel.register_forward_hook(lambda m, args, out: captured.update(q=args[0], k=args[1], v=args[2], out=out))
    ids = torch.tensor([[task.vocab.index(t) for t in TEXT.split()]])
    with torch.no_grad():
        model(ids)
    handle.remove()
    expected = captured["out"][0, 1]
    torch.testing.assert_close(panels[0].weights @ captured["v"][0, 1], expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(panels[0].weights, torch.softmax(
        captured["q"][0, 1] @ captured["k"][0, 1].T / 8**0.5, dim=-1), atol=1e-6, rtol=1e-5)


def test_nystrom_with_as_many_landmarks_as_tokens_is_exact(tagger_run):
    _, panels, facts = attention_maps(tagger_run, TEXT, num_landmarks=13)
    assert facts["num_landmarks"] == 13
    for panel in panels[1:]:
        assert panel.error < 1e-4, panel.title


def test_causal_model_scores_every_panel_against_causal_softmax(tmp_path):
    run = _train(tmp_path, "decoder", "task.options={length: 6, num_values: 5}")
    text = "3 1 4 1 0 2 | 0 1 1 2"
    _, panels, facts = attention_maps(run, text, num_landmarks=3, kernels=["causal_nystrom", "linear"])
    assert facts["causal"] and facts["segment_size"] == 4
    reference = panels[0].weights
    assert panels[0].title == "exact softmax (causal)"
    assert [p.title for p in panels[1:3]] == ["causal Nyström, block landmarks (s=4)",
                                              "causal Nyström, triangular landmarks (s=4)"]
    for panel in panels:  # every map is what the model could compute: lower-triangular
        assert torch.count_nonzero(torch.triu(panel.weights, diagonal=1)) == 0, panel.title
        assert "(bidirectional)" not in panel.title
    for panel in panels[1:]:  # ... and its error is against the drawn causal reference
        assert panel.error == pytest.approx(relative_error(panel.weights, reference)), panel.title
    # with one token per segment causal Nyström is exact causal softmax
    _, exact, _ = attention_maps(run, text, num_landmarks=11)
    assert all(p.error < 1e-6 for p in exact[1:])
    # a kernel that cannot run causally is refused, naming the causal ones
    with pytest.raises(ValueError, match=r"kernel 'nystrom' cannot run causally.*causal kernels: \["):
        attention_maps(run, text, kernels=["nystrom"])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"layer": 2}, r"layer=2 is not allowed; the model has layers 0..1"),
        ({"head": 5}, r"head=5 is not allowed; layer 0 has heads 0..1"),
        ({"text": "3 1 x"}, r"token 'x' is not in task 'sort'"),
        ({"kernels": ["nope"]}, "unknown attention kernel 'nope'"),
        ({"kernels": ["performer:num_features"]}, "must look like key=value"),
    ],
)
def test_bad_arguments_name_the_problem(tagger_run, kwargs, match):
    options = {"text": TEXT, **kwargs}
    with pytest.raises(ValueError, match=match):
        attention_maps(tagger_run, **options)


def test_mixers_without_attention_are_refused(tmp_path):
    run = _train(tmp_path, "pool", "model.mixer=pooling")
    with pytest.raises(ValueError, match="need the 'attention' mixer"):
        attention_maps(run, TEXT)


def test_parse_kernel_spec_types_values():
    assert parse_kernel_spec("nystrom:num_landmarks=4,pinv_iters=null") == (
        "nystrom", {"num_landmarks": 4, "pinv_iters": None})


def test_viz_cli_writes_and_prints_the_png(tagger_run, tmp_path):
    out = tmp_path / "cli.png"
    result = runner.invoke(app, ["viz", "attention", str(tagger_run), "--text", TEXT,
                                 "--layer", "1", "--kernel", "linear", "--out", str(out)],
                           env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert f"attention maps: {out}" in result.output and out.is_file()
    assert "Nyström, exact pinv" in result.output
    missing = runner.invoke(app, ["viz", "attention", str(tmp_path / "none"), "--text", "1"])
    assert missing.exit_code == 2 and "no checkpoint" in missing.output
