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
        kernels=("linear", "softmax"),
        tokens=40,
        prompt=4,
        dim=16,
        depth=1,
        heads=2,
        rounds=1,
        repeats=1,
        window=8,
        report_at=(20, 43),
        threads=1,
        clock="cpu",
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


# --------------------------------------------------------------------------- --hf


def test_the_hf_mode_reports_every_variant_and_exact_cache_bytes():
    pytest.importorskip("transformers")
    from formerlab.bench.generate import ORIGINAL, hf_summary_rows, run_hf_benchmark

    dim, depth, heads, kv_heads, steps, warmup = 32, 2, 4, 2, 2, 1
    results = run_hf_benchmark(
        kernels=("softmax", "linear"), contexts=(8, 24), dim=dim, depth=depth, heads=heads,
        kv_heads=kv_heads, vocab=32, steps=steps, warmup=warmup, rounds=1, threads=(1,),
    )  # fmt: skip
    assert [(r.variant, r.threads) for r in results] == [
        (ORIGINAL, 1),
        ("softmax", 1),
        ("linear", 1),
    ]
    original, softmax, linear = results
    d, f32 = dim // heads, 4
    for c in (8, 24):
        seen = c + warmup + steps
        # HF's DynamicCache: keys and values of the kv heads, every token seen
        assert original.layer_bytes[c] == [2 * kv_heads * seen * d * f32] * depth
        # linear: Σ φ(k) vᵀ (H, D, D) and Σ φ(k) (H, D) per layer, B = 1, whatever the context
        assert linear.layer_bytes[c] == [heads * d * d * f32 + heads * d * f32] * depth
        # softmax: a KV cache of every query head, at least every token seen
        assert all(b >= 2 * heads * seen * d * f32 for b in softmax.layer_bytes[c])
        assert all(r.per_token_s[c] > 0 for r in results)
    rows = hf_summary_rows(results)
    assert set(rows[0]) == {
        "threads", "model", "ms/tok @8", "ms/tok @24", "@24 / @8",
        "cache KiB/layer @8", "cache KiB/layer @24",
    }  # fmt: skip
    assert rows[2]["cache KiB/layer @24"] == f"{(heads * d * d + heads * d) * f32 / 1024:.1f}"


def test_the_hf_mode_runs_from_the_command_line_and_refuses_bad_arguments():
    pytest.importorskip("transformers")
    from typer.testing import CliRunner

    from formerlab.bench.generate import run_hf_benchmark
    from formerlab.cli import app

    result = CliRunner().invoke(app, [
        "bench", "generate", "--hf", "--kernel", "linear", "--dim", "16", "--depth", "1",
        "--heads", "2", "--kv-heads", "1", "--vocab", "16", "--steps", "1", "--rounds", "1",
        "--at", "4", "--at", "8", "--threads", "1,2", "--format", "csv",
    ], env={"COLUMNS": "200"})  # fmt: skip
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if line.startswith(("1,", "2,"))]
    assert [line.split(",")[:2] for line in lines] == [
        ["1", "original (DynamicCache)"], ["1", "linear"],
        ["2", "original (DynamicCache)"], ["2", "linear"],
    ]  # fmt: skip
    with pytest.raises(ValueError, match="not causal kernels"):
        run_hf_benchmark(kernels=("nystrom",))
    with pytest.raises(ValueError, match="multiple of kv_heads"):
        run_hf_benchmark(kernels=("linear",), heads=4, kv_heads=3, contexts=(4,))
    with pytest.raises(ValueError, match="clock='cpu'"):
        run_hf_benchmark(kernels=("linear",), threads=(2,), clock="cpu")
