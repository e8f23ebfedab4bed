"""``formerlab bench packing`` on tiny settings: its structure, and that the padded and
packed copies train to the same losses (they see the same examples)."""

import pytest
from typer.testing import CliRunner

from formerlab.bench.packing import curve_table, run_benchmark, summary_table

TINY = dict(
    steps=4,
    batch_size=8,
    dim=16,
    depth=1,
    heads=2,
    warmup=1,
    options={"listops": {"train_size": 30, "val_size": 4, "min_len": 8, "max_len": 32}},
)


def test_both_copies_train_to_the_same_losses_and_the_tables_say_so():
    results = run_benchmark(tasks=("sst2", "listops"), threads=(1,), **TINY)
    assert [(r.task, r.threads) for r in results] == [("sst2", 1), ("listops", 1)]
    for r in results:
        assert len(r.padded_loss) == len(r.packed_loss) == 4  # every step
        assert len(r.padded_s) == len(r.packed_s) == len(r.tokens) == 3  # timed: after warm-up
        assert all(0 < t <= p for t, p in zip(r.tokens, r.positions))
        assert 0 < r.padding_fraction < 1  # both tasks pad
        assert r.padded_loss == pytest.approx(r.packed_loss, rel=1e-5)
        assert r.max_loss_gap < 1e-5
        assert r.speedup == pytest.approx(r.tokens_per_s("packed") / r.tokens_per_s("padded"))
    table = summary_table(results)
    assert table.splitlines()[0].startswith("| task | threads | padding | padded tok/s")
    assert len(table.splitlines()) == 4 and "| sst2 | 1 |" in table and "| listops | 1 |" in table
    curves = curve_table(results[0], points=3).splitlines()
    assert curves[0] == "| step | padded loss | packed loss | gap |"
    assert [line.split("|")[1].strip() for line in curves[2:]] == ["1", "3", "4"]


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="task='imdb' is not allowed"):
        run_benchmark(tasks=("imdb",), threads=(1,), **TINY)
    with pytest.raises(ValueError, match="warmup=4 must be below steps=4"):
        run_benchmark(tasks=("sst2",), threads=(1,), **{**TINY, "warmup": 4})
    with pytest.raises(
        ValueError, match=r"clock='gpu' is not allowed; expected one of \['wall', 'cpu'\]"
    ):
        run_benchmark(tasks=("listops",), threads=(1,), clock="gpu", **TINY)


def test_cli_prints_the_summary_and_the_curves():
    from formerlab.cli import app

    args = [
        "bench",
        "packing",
        "--task",
        "listops",
        "--steps",
        "3",
        "--batch-size",
        "4",
        "--dim",
        "16",
        "--depth",
        "1",
        "--heads",
        "2",
        "--warmup",
        "1",
        "--threads",
        "1",
        "--listops-size",
        "20",
        "--listops-max-len",
        "32",
        "--curve-points",
        "2",
        "--clock",
        "cpu",
    ]
    result = CliRunner().invoke(app, args, env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    assert (
        "cpu clock" in result.output
        and "packed / padded" in result.output
        and "| listops | 1 |" in result.output
    )
    assert "loss curves, listops, 1 thread(s)" in result.output
