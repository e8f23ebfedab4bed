"""Config validation: every error names the key, the value and what is allowed."""

import pytest

from formerlab.train import ConfigError, load_config
from formerlab.train.config import config_hash


def test_unknown_key_is_named_with_allowed_keys():
    with pytest.raises(ConfigError, match=r"unknown key 'model\.widht'; allowed keys here: \[.*'dim'"):
        load_config(None, ["model.widht=3"])


def test_wrong_type_names_key_and_value():
    with pytest.raises(ConfigError, match=r"train\.steps: .*integer.*'many'"):
        load_config(None, ["train.steps=many"])
    with pytest.raises(ConfigError, match=r"model\.dropout: .*less than 1"):
        load_config(None, ["model.dropout=1.5"])


def test_unknown_kernel_and_option_are_named():
    with pytest.raises(ConfigError, match=r"model\.kernel: unknown attention kernel 'softmx'; available"):
        load_config(None, ["model.kernel=softmx"])
    with pytest.raises(ConfigError, match=r"unknown option\(s\) \['temperature'\] for attention kernel"):
        load_config(None, ["model.kernel_options.temperature=2"])
    with pytest.raises(ConfigError, match=r"task\.name: unknown task 'shakespear'"):
        load_config(None, ["task.name=shakespear"])


def test_yaml_file_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: {dim: 64}\ntracking: none\n")
    cfg = load_config(path, ["train.lr=0.01", "model.kernel_options.scale=0.5"])
    assert cfg.model.dim == 64 and cfg.train.lr == 0.01 and cfg.tracking.backend == "none"
    assert cfg.model.kernel_options == {"scale": 0.5}
    assert config_hash(cfg) != config_hash(load_config(path))
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="key=value"):
        load_config(path, ["train.lr"])


def test_decoder_task_with_non_causal_kernel_fails_before_training(tiny):
    from formerlab import attention
    from formerlab.train.build import build_model, build_task

    non_causal = [n for n in attention.available() if n not in attention.available(causal=True)]
    assert non_causal, "nystrom, landmark, ... are registered as non-causal"
    cfg = load_config(None, tiny() + [f"model.kernel={non_causal[0]}"])
    with pytest.raises(ValueError, match="cannot run causally"):
        build_model(cfg, build_task(cfg))


def test_mixer_and_deq_option_typos_fail_at_load_time():
    with pytest.raises(ConfigError, match=r"unknown option\(s\) \['metrik'\]"):
        load_config(None, ["model.mixer=metric", "model.mixer_options.metrik=psd"])
    with pytest.raises(ConfigError, match=r"unknown model\.deq option\(s\) \['solvr'\]"):
        load_config(None, ["model.deq={solvr: anderson}"])
    assert load_config(None, ["model.deq={solver: anderson}"]).model.deq == {"solver": "anderson"}


@pytest.fixture
def no_gpu(monkeypatch):
    """A machine without CUDA and without MPS, whatever this one has."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)


@pytest.mark.parametrize("device", ["cuda", "cuda:0", "mps"])
def test_unavailable_device_is_rejected_at_validation(no_gpu, device):
    with pytest.raises(
        ConfigError,
        match=rf"train\.device: device='{device}' is not available on this machine; "
        r"expected one of \['cpu'\]",
    ):
        load_config(None, [f"train.device={device}"])


@pytest.mark.parametrize("device", ["cuda:abc", "gpu", "cuda:-1", "CPU"])
def test_malformed_device_is_rejected_at_validation(device):
    with pytest.raises(ConfigError, match=rf"train\.device: device='{device}' is not a device name"):
        load_config(None, [f"train.device={device}"])


def test_visible_gpus_are_allowed_by_index(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    for device in ("cuda", "cuda:0", "cuda:1"):
        assert load_config(None, [f"train.device={device}"]).train.device == device
    with pytest.raises(ConfigError, match=r"'cuda:2' is not available.*'cuda:1'\]"):
        load_config(None, ["train.device=cuda:2"])


@pytest.mark.parametrize(
    ("deq", "message"),
    [
        ("{max_iter: -1}", r"model\.deq\.max_iter=-1 is not allowed; expected an integer >= 1"),
        ("{tol: -1.0e-3}", r"model\.deq\.tol=-0\.001 is not allowed"),
        ("{solver: newtn}", r"model\.deq\.solver: unknown solver 'newtn'; available: \["),
        ("{norm: batch}", r"model\.deq\.norm='batch' is not allowed; expected one of \['none'"),
        (
            "{solver: broyden, solver_options: {memory: 0}}",
            r"model\.deq\.solver_options: memory=0 is not allowed",
        ),
        ("{backward: implict}", r"model\.deq\.backward='implict' is not allowed; expected one of"),
    ],
)
def test_deq_value_errors_name_the_deq_key(deq, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [f"model.deq={deq}"])


def test_good_deq_values_pass():
    deq = {"solver": "broyden", "solver_options": {"memory": 5}, "max_iter": 3, "norm": "weight"}
    assert load_config(None, [f"model.deq={deq}"]).model.deq == deq


@pytest.mark.parametrize("task", ["sst2", "shakespeare_chars"])
def test_missing_data_message_names_a_config_key_that_exists(task, tmp_path, monkeypatch):
    """The key the message tells users to set must be one the config accepts."""
    import re

    from formerlab import data

    monkeypatch.setenv("FORMERLAB_DATA", str(tmp_path))  # an empty data directory
    with pytest.raises(FileNotFoundError, match=r"task\.options\.data_path") as caught:
        data.build(task)
    key = re.search(r"config key (\S+?)\)", str(caught.value)).group(1)
    cfg = load_config(None, [f"task.name={task}", f"{key}={tmp_path}"])
    assert cfg.task.options["data_path"] == str(tmp_path)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            {"min_len": 100, "max_len": 50},
            r"min_len=100 is larger than max_len=50 \(config keys task\.options\.min_len and "
            r"task\.options\.max_len\); expected min_len <= max_len",
        ),
        (
            {"min_len": 40, "max_depth": 2, "max_args": 2},
            r"min_len=40 \(config key task\.options\.min_len\) is not allowed",
        ),
    ],
)
def test_listops_length_errors_name_their_config_keys(options, message):
    from formerlab import data

    with pytest.raises(ValueError, match=message):
        data.build("listops", **options)


def test_sst2_data_path_to_a_file_names_the_config_key(tmp_path):
    from formerlab import data

    path = tmp_path / "train.tsv"
    path.write_text("sentence\tlabel\n")
    with pytest.raises(ValueError, match=r"data_path='.*train\.tsv' \(config key "
                       r"task\.options\.data_path\) is not allowed: SST-2 has two files"):
        data.build("sst2", data_path=str(path))
