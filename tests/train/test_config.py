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
