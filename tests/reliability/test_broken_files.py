"""Broken configs, sweep files, overrides and checkpoints: one line naming the file, what is
wrong and what to do; never a traceback."""

import json

import pytest
import yaml
from typer.testing import CliRunner

from formerlab.cli import app
from formerlab.train import ConfigError, load_config, load_run
from formerlab.train.checkpoint import CheckpointError

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, list(args), env={"COLUMNS": "1000"})


def one_line_error(result, *fragments):
    """Exit 2, a single ``error:`` line holding every fragment, no traceback."""
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def test_yaml_syntax_error_in_a_config_names_file_and_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  dim: 16\n  kernel: [softmax\ntrain: {steps: 3}\n")
    one_line_error(invoke("train", str(path)), str(path), "YAML syntax error at line")


def test_yaml_syntax_error_in_a_sweep_file(tmp_path):
    path = tmp_path / "sweep.yaml"
    path.write_text("name: s\naxes:\n  model.kernel: [softmax, linear\n")
    one_line_error(invoke("ablate", str(path), "--out", str(tmp_path / "o")), str(path), "YAML syntax error")


def test_yaml_syntax_error_in_a_set_value():
    one_line_error(invoke("train", "--set", "model.kernel_options={num_landmarks: 4"),
                   "--set 'model.kernel_options={num_landmarks: 4'", "YAML syntax error")


def test_an_empty_config_file_says_it_is_empty(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing yet\n")
    one_line_error(invoke("train", str(path)), str(path), "is empty")


@pytest.mark.parametrize("key", ["train.steps", "train.batch_size", "seed", "train.lr"])
def test_booleans_are_not_numbers(key):
    with pytest.raises(ConfigError, match=f"{key}: expected an? (integer|number), not a boolean"):
        load_config(None, [f"{key}=true"])


def test_real_booleans_still_accepted():
    assert load_config(None, ["train.bf16=true"]).train.bf16 is True


def _state_path(run):
    return run / "checkpoint" / "state.json"


@pytest.mark.parametrize("content, fragment", [
    ("", "the file is empty"),
    ("{\"step\": 10,", "not valid JSON"),
    (None, "the field 'step' must be a non-negative integer, got 'fifty'"),
])
def test_a_broken_state_json_on_resume(run_copy, content, fragment):
    path = _state_path(run_copy)
    if content is None:
        meta = json.loads(path.read_text())
        meta["step"] = "fifty"
        content = json.dumps(meta)
    path.write_text(content)
    one_line_error(invoke("train", "--resume", str(run_copy)), str(path), fragment, "train again")


def test_a_truncated_model_file_on_resume_and_load(run_copy):
    path = run_copy / "checkpoint" / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    one_line_error(invoke("train", "--resume", str(run_copy)), str(path), "not a readable safetensors file")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_run(run_copy)  # what `generate` and `viz` load with


def test_state_json_whose_config_does_not_fit_the_weights(run_copy):
    path = _state_path(run_copy)
    meta = json.loads(path.read_text())
    meta["config"]["model"]["dim"] = 32  # the weights are dim 16
    path.write_text(json.dumps(meta))
    # config.yaml agrees with the stored config (a resume refuses an edited config.yaml)
    stored = yaml.safe_load((run_copy / "config.yaml").read_text())
    stored["model"]["dim"] = 32
    (run_copy / "config.yaml").write_text(yaml.safe_dump(stored))
    line = one_line_error(invoke("train", "--resume", str(run_copy)), "model.safetensors",
                          "do not match the config", "model.dim=32")
    assert "has shape" in line and len(line) < 600


@pytest.mark.parametrize("bench", ["causal", "metric", "nystrom", "deq"])
def test_benchmarks_share_the_repeats_check(bench, monkeypatch):
    import importlib

    from formerlab.bench import measure

    module = importlib.import_module(f"formerlab.bench.{bench}")
    entry = module.solver_comparison if bench == "deq" else module.run_benchmark
    with pytest.raises(ValueError, match="repeats=0 is not allowed"):
        entry(repeats=0)

    class Stop(Exception):
        pass

    def stop_after_the_check(repeats, **kwargs):
        seen.append(repeats)
        measure_check(repeats, **kwargs)
        raise Stop  # no benchmark work in a test

    seen, measure_check = [], measure.check_repeats
    monkeypatch.setattr(module, "check_repeats", stop_after_the_check)
    with pytest.warns(measure.FewRepeatsWarning, match="repeats=1 is too few timing rounds"):
        with pytest.raises(Stop):
            entry(repeats=1)
    assert seen == [1]


@pytest.mark.parametrize("content", ["", "{\"trials\": [", "[1, 2]"])
def test_report_on_a_broken_sweep_json_names_it(tmp_path, content):
    (tmp_path / "sweep.json").write_text(content)
    one_line_error(invoke("report", str(tmp_path)), str(tmp_path / "sweep.json"))
