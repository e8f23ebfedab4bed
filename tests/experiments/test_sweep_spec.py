"""Sweep files: axes -> cross product, bundles, explicit trials, validation up front."""

import pytest

from formerlab.experiments.sweep import expand, load_sweep, mechanism_name, parse_sweep, trial_hash
from formerlab.train import ConfigError


def test_cross_product_of_axes_and_bundles(make_sweep, tmp_path):
    path = make_sweep(axes={
        "mechanism": [
            {"label": "soft", "model.kernel": "softmax"},
            {"model.mixer": "pooling"},  # label derived from the override
        ],
        "seed": [0, 1, 2],
    })
    trials = expand(load_sweep(path), tmp_path / "out")
    assert len(trials) == 6
    assert [t.labels for t in trials[:3]] == [
        {"mechanism": "soft", "seed": "seed=0"},
        {"mechanism": "soft", "seed": "seed=1"},
        {"mechanism": "soft", "seed": "seed=2"},
    ]
    assert trials[3].labels["mechanism"] == "pooling"
    assert {t.config.seed for t in trials} == {0, 1, 2}
    assert {t.config.model.mixer for t in trials} == {"attention", "pooling"}
    # the mechanism column comes from the non-task, non-seed axes
    assert {t.mechanism for t in trials} == {"soft", "pooling"}
    assert len({t.key for t in trials}) == 6
    assert all(str(tmp_path / "out") in t.config.runs_dir for t in trials)


def test_explicit_trials_are_one_more_axis(make_sweep, tmp_path):
    path = make_sweep(trials=[
        {"label": "a", "model.kernel": "softmax"},
        {"label": "b", "model.kernel": "linear", "train.lr": 0.01},
    ], axes={"seed": [0, 1]})
    trials = expand(load_sweep(path), tmp_path)
    assert [t.label for t in trials] == ["a seed=0", "a seed=1", "b seed=0", "b seed=1"]
    assert trials[2].config.train.lr == 0.01 and trials[0].config.train.lr != 0.01


def test_dict_value_on_a_config_key_replaces_that_section(make_sweep, tmp_path):
    path = make_sweep(axes={"task.options": [{"length": 3, "num_values": 4}, {"length": 5}]})
    trials = expand(load_sweep(path), tmp_path)
    assert trials[0].config.task.options == {"length": 3, "num_values": 4}
    assert trials[1].config.task.options == {"length": 5}


def test_trial_hash_ignores_bookkeeping_but_not_content(make_sweep, tmp_path):
    spec = load_sweep(make_sweep(axes={"seed": [0, 1]}))
    here, there = expand(spec, tmp_path / "a"), expand(spec, tmp_path / "elsewhere")
    assert [t.key for t in here] == [t.key for t in there]
    assert here[0].key != here[1].key
    renamed = here[0].config.model_copy(update={"name": "other", "runs_dir": "/x"})
    assert trial_hash(renamed) == here[0].key


def test_invalid_trials_are_all_reported_before_anything_runs(make_sweep, tmp_path):
    path = make_sweep(axes={"model.kernel": ["softmax", "no-such-kernel"],
                            "train.steps": [10, -1]})
    with pytest.raises(ConfigError) as error:
        expand(load_sweep(path), tmp_path / "out")
    message = str(error.value)
    assert "3 of 4 trial(s) are invalid" in message
    assert "trial 1 (softmax steps=-1)" in message and "train.steps" in message
    assert "no-such-kernel" in message and "trial 2" in message
    assert not (tmp_path / "out").exists()


def test_a_non_causal_kernel_on_a_decoder_task_fails_validation(make_sweep, tmp_path):
    path = make_sweep(axes={"model.kernel": ["softmax", "nystrom"]})
    with pytest.raises(ConfigError, match=r"trial 1 \(nystrom\).*cannot run causally"):
        expand(load_sweep(path), tmp_path)


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        ({"base": {}, "axes": {"mechanism": ["softmax"]}}, "'mechanism' is not a config key"),
        ({"base": {}, "axes": {"seed": []}}, "non-empty list"),
        ({"base": {}, "axis": {}}, r"unknown sweep key\(s\) \['axis'\]"),
        ({"name": "a b"}, "sweep name='a b' is not allowed"),
        ({"axes": {"mechanism": [{"label": "x", "model.kernel": "softmax"},
                                 {"label": "x", "model.kernel": "linear"}]}}, "repeated: \\['x'\\]"),
        ({"base": "missing.yaml"}, "does not exist"),
    ],
)
def test_malformed_sweeps_name_the_problem(raw, match, tmp_path):
    with pytest.raises(ConfigError, match=match):
        parse_sweep(raw, source=tmp_path / "s.yaml")


def test_duplicate_trials_are_rejected(make_sweep, tmp_path):
    path = make_sweep(trials=[{"label": "a", "seed": 0}, {"label": "b", "seed": 0}])
    with pytest.raises(ConfigError, match="same config as trial 0"):
        expand(load_sweep(path), tmp_path)


def test_mechanism_names(make_sweep, tmp_path):
    path = make_sweep(trials=[
        {"label": "a", "model.kernel": "linear"},
        {"label": "b", "model.mixer": "pooling"},
    ])
    spec = load_sweep(path)
    names = [mechanism_name(t.config) for t in expand(spec, tmp_path)]
    assert names == ["linear", "pooling"]
