"""The recall-against-state-size report of an MQAR sweep, and the shipped study config."""

import copy

import pytest
import yaml
from typer.testing import CliRunner

from formerlab import attention, mixers
from formerlab.cli import app
from formerlab.experiments.recall import (
    RECALL_PLOT,
    RECALL_REPORT,
    recall_rows,
    recall_table,
    state_bytes,
    write_recall_report,
)
from formerlab.experiments.sweep import expand, load_sweep, run_sweep
from formerlab.mixers.params import takes_kernel

from .test_configs import CONFIGS

DIM, HEADS, N, CONV = 16, 2, 64, 4
WINDOW = (CONV - 1) * 3 * DIM * 4  # the convolution's last inputs of q, k, v, float32


def config(**model):
    return {
        "task": {"name": "mqar", "options": {"seq_len": N, "num_kv_pairs": 3, "vocab_size": 32,
                                             "train_size": 64, "val_size": 16}},
        "model": {"dim": DIM, "depth": 2, "heads": HEADS, "positions": "none", **model},
        "train": {"steps": 3, "batch_size": 8, "warmup": 1, "eval_every": 3,
                  "eval_batches": 2, "log_every": 1},
        "tracking": "none",
    }


def test_softmax_state_is_the_kv_cache_of_the_whole_sequence():
    # (a KV cache allocates in multiples of 64 positions: at N = 64 that is what it uses)
    got = state_bytes(config(kernel="softmax", mixer_options={"conv": CONV}))
    assert got == 2 * N * DIM * 4 + WINDOW  # keys and values of N tokens, float32


def test_linear_state_is_one_d_by_d_matrix_and_a_key_sum_per_head():
    d = DIM // HEADS
    got = state_bytes(config(kernel="linear", mixer_options={"conv": CONV}))
    assert got == HEADS * (d * d + d) * 4 + WINDOW


def test_gated_deltanet_state_follows_its_documented_size():
    # d_k = dim, d_v = 2 dim (expand_v 2); a [d_k/H, d_v/H] state per head + conv window
    dk, dv = DIM, 2 * DIM
    want = 4 * (HEADS * (dk // HEADS) * (dv // HEADS) + (CONV - 1) * (2 * dk + dv))
    assert state_bytes(config(mixer="gated_deltanet")) == want


def test_a_mechanism_that_does_not_stream_is_refused():
    cfg = config(kernel="nystrom", kernel_options={"num_landmarks": 2})
    cfg["task"] = {"name": "sort", "options": {"length": 4, "num_values": 5, "mode": "tagger"}}
    with pytest.raises(ValueError, match="does not stream"):
        state_bytes(cfg)


@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory):
    folder = tmp_path_factory.mktemp("recall")
    base = config()
    base["model"].pop("positions")
    spec = {
        "name": "tiny-recall",
        "base": {**copy.deepcopy(base), "model": {**base["model"], "positions": "none"}},
        "axes": {
            "mechanism": [
                {"label": "softmax", "model.kernel": "softmax", "model.mixer_options": {"conv": 4}},
                {"label": "deltanet", "model.mixer": "deltanet"},
            ],
            "point": [
                {"label": "short", "task.options.seq_len": 64, "task.options.num_kv_pairs": 2},
                {"label": "long", "task.options.seq_len": 128, "task.options.num_kv_pairs": 3},
            ],
        },
    }
    path = folder / "tiny.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    outcome = run_sweep(path, out=folder / "sweep", progress=False)
    return folder / "sweep", outcome


def test_report_rows_are_the_trials_results(tiny_sweep):
    sweep_dir, outcome = tiny_sweep
    rows = recall_rows(sweep_dir)
    assert len(rows) == 4
    by_key = {(r.mechanism, r.seq_len): r for r in rows}
    for result in outcome.results.values():
        options = result["config"]["task"]["options"]
        row = by_key[(result["labels"]["mechanism"], options["seq_len"])]
        assert row.accuracy == result["metrics"]["accuracy"]
        assert row.pairs == options["num_kv_pairs"]
    # attention's state grows with the context, the delta rule's does not
    assert by_key[("softmax", 128)].state_bytes > by_key[("softmax", 64)].state_bytes
    assert by_key[("deltanet", 128)].state_bytes == by_key[("deltanet", 64)].state_bytes


def test_report_files_and_the_cli(tiny_sweep):
    sweep_dir, _ = tiny_sweep
    report, plot, rows = write_recall_report(sweep_dir)
    assert report.name == RECALL_REPORT and plot.name == RECALL_PLOT
    assert plot.stat().st_size > 1000
    header, cells = recall_table(rows)
    assert [c[0] for c in cells] == ["softmax", "deltanet"]
    text = report.read_text()
    for line in cells:
        assert "| " + " | ".join(line) + " |" in text
    result = CliRunner().invoke(app, ["report", str(sweep_dir), "--recall"],
                                env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "recall: validation accuracy" in result.output


def test_report_of_a_folder_without_trials_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="no trials/ folder"):
        recall_rows(tmp_path)


def test_the_study_covers_every_causal_mechanism_at_every_point(tmp_path):
    spec = load_sweep(CONFIGS / "mqar-study.yaml")
    trials = expand(spec, tmp_path, check_models=False)
    assert len(trials) == len({t.key for t in trials})  # no two trials alike
    kernels = {t.config.model.kernel for t in trials if t.config.model.mixer == "attention"}
    others = {t.config.model.mixer for t in trials if t.config.model.mixer != "attention"}
    assert kernels == set(attention.available(causal=True))
    assert others == {m for m in mixers.available(causal=True) if not takes_kernel(m)} | {
        m for m in mixers.available(causal=True) if takes_kernel(m) and m != "attention"}
    points = {(t.config.task.options["seq_len"], t.config.task.options["num_kv_pairs"],
               t.config.model.dim) for t in trials}
    assert points == {(n, p, d) for n, p in [(64, 4), (128, 8), (256, 16)] for d in (64, 128, 256)}
    assert len(trials) == (len(kernels) + len(others)) * 9
