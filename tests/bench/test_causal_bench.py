"""The causal benchmark's plumbing (no timing assertions: only that it measures and reports)."""

import pytest

from formerlab.bench.causal import (
    Case,
    Result,
    memory_growth,
    run_benchmark,
    run_case,
    summary_rows,
)
from formerlab.bench.measure import markdown_table


@pytest.mark.parametrize("method", ["softmax", "causal_nystrom", "linear", "performer"])
def test_run_case_measures_forward_and_backward(method):
    result = run_case(Case(method, n=64, heads=2, head_dim=8, warmup=0, repeats=1, threads=1))
    assert result.method == method and result.n == 64
    assert result.time_s is not None and result.time_s > 0
    assert result.skipped is None
    if method == "causal_nystrom":
        assert result.info["segment_size"] == 8


def test_summary_ratios_and_skips():
    results = [
        Result("softmax", 100, time_s=1.0, peak_bytes=4 * 2**20),
        Result("linear", 100, time_s=0.25, peak_bytes=2 * 2**20),
        Result("softmax", 200, skipped="skipped: N > max_exact_n=100"),
        Result("linear", 200, time_s=0.5, peak_bytes=4 * 2**20),
    ]
    rows = summary_rows(results)
    assert rows[0]["linear speed-up"] == "4.0×"
    assert rows[0]["softmax MiB"] == "4" and rows[0]["linear MiB"] == "2"
    assert rows[1]["softmax ms"] == "skipped" and rows[1]["linear speed-up"] == "–"
    table = markdown_table(rows)
    assert table.splitlines()[0].startswith("| N | softmax ms | linear ms")
    assert memory_growth(results, "linear") == [(100, 2 * 2**20 / 100), (200, 4 * 2**20 / 200)]


def test_exact_is_skipped_above_the_cap_and_bad_arguments_raise():
    results = run_benchmark(sizes=(32,), methods=("softmax",), max_exact_n=16)
    assert results[0].skipped.startswith("skipped")
    with pytest.raises(ValueError, match="methods"):
        run_benchmark(sizes=(32,), methods=("nope",))
    with pytest.raises(ValueError, match="sizes"):
        run_benchmark(sizes=(0,))
