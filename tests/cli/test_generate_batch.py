"""`formerlab generate` with several ``--prompt``: one left-padded batch, each sample
printed after a ``=== sample i/n ===`` line, equal to running its prompt alone (greedy and
seeded sampling, cached and recomputed, past the learned positions' context)."""

import re

import pytest
from typer.testing import CliRunner

from formerlab.cli import app

runner = CliRunner()
HEADER = re.compile(r"^=== sample (\d+)/(\d+) ===\n", flags=re.M)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from formerlab.train import load_config, train

    tmp = tmp_path_factory.mktemp("gen-batch")
    overrides = [
        "model.dim=32",
        "model.depth=1",
        "model.heads=2",
        "model.positions=learned",
        # 40 steps: enough for the two prompts' greedy continuations to differ
        "task.options.context=32",
        "train.steps=40",
        "train.batch_size=8",
        "train.warmup=1",
        "train.lr=0.01",
        "train.eval_every=40",
        "train.eval_batches=1",
        "sample.tokens=0",
        f"runs_dir={tmp / 'runs'}",
        "tracking=none",
    ]
    return train(load_config(None, overrides), run_dir=tmp / "run", progress=False).run_dir


def generate(run_dir, *args):
    return runner.invoke(app, ["generate", str(run_dir), *args], env={"COLUMNS": "200"})


def samples(stdout):
    """The samples of a batch's output, in order (each as a single prompt's run prints it)."""
    parts = HEADER.split(stdout)
    assert parts[0] == "", parts[0]
    count = int(parts[2])
    got = [(int(parts[i]), parts[i + 2]) for i in range(1, len(parts), 3)]
    assert [i for i, _ in got] == list(range(1, count + 1))
    return [text for _, text in got]


PROMPTS = ["ROMEO:", "To be, or not to be"]  # 6 and 19 characters: left padding of 13


@pytest.mark.parametrize(
    "options",
    [
        ["--top-k", "1"],
        ["--seed", "3", "--temperature", "1.0"],
        ["--seed", "4", "--temperature", "1.0", "--no-cache"],
    ],
    ids=["greedy", "sampled", "sampled-recomputed"],
)
def test_two_prompts_print_what_each_prompt_alone_prints(run_dir, options):
    args = ["--tokens", "30", *options]  # 19 + 30 > 32: the learned window slides
    batch = generate(run_dir, "--prompt", PROMPTS[0], "--prompt", PROMPTS[1], *args)
    assert batch.exit_code == 0, batch.output
    got = samples(batch.stdout)
    assert len(got) == 2
    assert got[0][len(PROMPTS[0]) :] != got[1][len(PROMPTS[1]) :]  # the rows differ
    for prompt, text in zip(PROMPTS, got):
        alone = generate(run_dir, "--prompt", prompt, *args)
        assert alone.exit_code == 0, alone.output
        assert text == alone.stdout and text.startswith(prompt)
        assert len(text) == len(prompt) + 30 + 1  # 30 one-character tokens, then "\n"
    mode = "recomputed" if "--no-cache" in options else "cached"
    assert re.search(
        rf"2 × 30 tokens in [\d.]+ s: [\d.]+ tokens/s \({mode}, batch of 2\)", batch.stderr
    ), batch.stderr


def test_an_empty_prompt_among_several_is_named(run_dir):
    result = generate(run_dir, "--prompt", "ROMEO:", "--prompt", "")
    assert result.exit_code == 2
    assert "--prompt is empty (prompt 2)" in result.output and "Traceback" not in result.output
