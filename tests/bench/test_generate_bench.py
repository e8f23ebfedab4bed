"""The generation benchmark's bookkeeping (no timing asserted)."""

import pytest

from formerlab.bench.generate import run_benchmark, summary_rows, trapezoid


def test_trapezoid_integrates_linear_and_constant_pieces_exactly():
    # per-token time 2 + p / 10 measured at 10 and 50: exact for a linear profile
    points = {10: 3.0, 50: 7.0}
    assert trapezoid(points, 10, 50) == pytest.approx(40 * 5.0)
    assert trapezoid(points, 0, 10) == pytest.approx(10 * 3.0)  # constant below the first point
    assert trapezoid({1: 1.0, 3: 3.0, 5: 1.0}, 1, 5) == pytest.approx(2 * 2.0 + 2 * 2.0)


def test_a_tiny_run_reports_every_kernel_and_flat_linear_state():
    results = run_benchmark(
        kernels=("linear", "softmax"), tokens=40, prompt=4, dim=16, depth=1, heads=2,
        rounds=1, repeats=1, window=8, report_at=(20, 43), threads=1, clock="cpu",
    )
    linear, softmax = results
    assert linear.state_bytes[20] == linear.state_bytes[43]  # constant-size state
    assert softmax.state_bytes[43] >= softmax.state_bytes[20]  # a growing KV cache
    rows = summary_rows(results)
    assert [r["kernel"] for r in rows] == ["linear", "softmax"]
    assert {"ms/tok @20", "ms/tok @43", "uncached total s", "cached speed-up"} <= set(rows[0])


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="not causal kernels"):
        run_benchmark(kernels=("nystrom",))
    with pytest.raises(ValueError, match="clock"):
        run_benchmark(kernels=("linear",), clock="sundial")
