"""`formerlab generate`: streams through the cache, reports tokens/s, refuses bad input."""

import re

import pytest
from typer.testing import CliRunner

from formerlab.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from formerlab.train import load_config, train

    tmp = tmp_path_factory.mktemp("gen")
    overrides = [
        "model.dim=32", "model.depth=1", "model.heads=2", "model.positions=rope",
        "task.options.context=32", "train.steps=4", "train.batch_size=4", "train.warmup=1",
        "train.eval_every=4", "train.eval_batches=1", "sample.tokens=0",
        f"runs_dir={tmp / 'runs'}", "tracking=none",
    ]
    return train(load_config(None, overrides), run_dir=tmp / "run", progress=False).run_dir


def generate(run_dir, *args):
    return runner.invoke(app, ["generate", str(run_dir), *args], env={"COLUMNS": "200"})


def test_generate_streams_past_the_context_and_reports_speed(run_dir):
    cached = generate(run_dir, "--prompt", "ROMEO:", "--tokens", "100", "--top-k", "1")
    assert cached.exit_code == 0, cached.output
    text = cached.stdout
    assert text.startswith("ROMEO:") and len(text.rstrip("\n")) == 6 + 100  # past context 32
    assert "tokens/s (cached)" in cached.stderr and "100 tokens in" in cached.stderr
    plain = generate(run_dir, "--prompt", "ROMEO:", "--tokens", "100", "--top-k", "1", "--no-cache")
    assert plain.exit_code == 0, plain.output
    assert plain.stdout == text and "(recomputed)" in plain.stderr


def test_sampled_generation_is_the_same_with_and_without_the_cache(run_dir):
    args = ["--prompt", "To be", "--tokens", "40", "--seed", "3", "--temperature", "1.0"]
    assert generate(run_dir, *args).stdout == generate(run_dir, *args, "--no-cache").stdout


def test_long_generations_report_progress(run_dir):
    result = generate(run_dir, "--tokens", "500")
    assert result.exit_code == 0, result.output
    assert "[50/500 tokens" in result.stderr and "[450/500 tokens" in result.stderr
    quiet = generate(run_dir, "--tokens", "500", "--no-progress")
    assert "[50/500" not in quiet.stderr and "500 tokens in" in quiet.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["--prompt", ""], "--prompt is empty"),
        (["--prompt", "ROMEO: ☃ and ✓"], "outside the vocabulary: ['☃', '✓']"),
        (["--tokens", "0"], "--tokens=0 is not allowed"),
        (["--tokens", "-5"], "--tokens=-5 is not allowed"),
        (["--temperature", "0"], "temperature=0.0 is not allowed"),
        (["--top-k", "0"], "top_k=0 is not allowed"),
    ],
)
def test_bad_input_gets_a_clear_error(run_dir, args, message):
    result = generate(run_dir, *args)
    assert result.exit_code == 2
    assert message in result.output and "Traceback" not in result.output


def test_the_speed_line_is_on_a_line_of_its_own(run_dir):
    # the sample may end mid-line (a token without a newline); on a terminal both streams
    # share the screen: the speed line must never continue the text
    result = generate(run_dir, "--prompt", "ROMEO:", "--tokens", "20", "--top-k", "1")
    assert result.exit_code == 0, result.output
    assert result.stdout.endswith("\n")
    speed = re.compile(r"^20 tokens in \d+\.\d+ s: [\d.]+ tokens/s \(cached\)$", flags=re.M)
    assert speed.search(result.output), result.output
    text, _, rest = result.output.partition("20 tokens in")
    assert text.endswith("\n\n"), repr(text[-40:])  # a blank line between sample and speed
