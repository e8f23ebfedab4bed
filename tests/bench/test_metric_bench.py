"""The metric benchmark compares equal computations, and its harness reports what it skips."""

import pytest
import torch

from formerlab.bench.measure import FewRepeatsWarning, markdown_table
from formerlab.bench.metric import (
    Case,
    Result,
    materialised_bytes,
    materialised_metric_attention,
    run_benchmark,
    run_case,
    summary_rows,
)
from formerlab.mixers.metric import MetricAttention


@pytest.mark.parametrize("causal", [False, True])
def test_materialised_reference_equals_metric_attention(causal):
    torch.manual_seed(0)
    mixer = MetricAttention(12, 3).double()
    with torch.no_grad():
        mixer.metric_params.normal_()
    x = torch.randn(2, 7, 12, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[True] * 7, [True] * 5 + [False] * 2])
    got = materialised_metric_attention(mixer, x, mask, causal=causal)
    want = mixer(x, attention_mask=mask, causal=causal)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    grads = [x, mixer.metric_params, mixer.proj.weight]
    g = torch.randn(want.shape, dtype=torch.float64)
    for a, b in zip(torch.autograd.grad(got, grads, g), torch.autograd.grad(want, grads, g)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def test_materialised_reference_rejects_other_metrics():
    with pytest.raises(ValueError, match="metric='symmetric'"):
        materialised_metric_attention(MetricAttention(8, 2, metric="psd"), torch.randn(1, 3, 8))


def test_materialised_bytes_counts_pairs():
    # 8 copies of B·H·N(N+1)/2·k(k+1)/2 float32 numbers
    assert materialised_bytes(2, 4, 256, 32) == 8 * 2 * 4 * (256 * 257 // 2) * (32 * 33 // 2) * 4


def test_run_case_in_process_measures_time():
    for method in ("attention", "metric", "materialised"):
        result = run_case(Case(method, n=8, batch=1, heads=2, head_dim=4, warmup=0, repeats=1))
        assert result.time_s is not None and result.time_s > 0
        assert result.skipped is None


def test_run_benchmark_skips_what_does_not_fit_and_says_so():
    with pytest.warns(FewRepeatsWarning, match="repeats=1"):
        results = run_benchmark(sizes=(8,), batch=1, heads=2, head_dim=4, warmup=0, repeats=1,
                                max_materialised_gib=1e-9, methods=("metric", "materialised"))
    by = {r.method: r for r in results}
    assert by["metric"].skipped is None and by["metric"].time_s > 0  # ran in a subprocess
    assert by["materialised"].skipped.startswith("skipped: needs")
    row = summary_rows(results)[0]
    assert row["materialised ms"] == "skipped" and row["materialised / metric time"] == "–"
    assert "| N |" in markdown_table([row])


def test_summary_ratios():
    results = [Result("attention", 4, 0.002, 100), Result("metric", 4, 0.001, 50),
               Result("materialised", 4, 0.1, 5000)]
    row = summary_rows(results)[0]
    assert row["metric / attention time"] == "0.50×"
    assert row["materialised / metric time"] == "100.00×"
    assert row["materialised / metric memory"] == "100.00×"


def test_bad_arguments_name_the_argument():
    with pytest.raises(ValueError, match="methods='fast'"):
        run_benchmark(sizes=(8,), methods=("fast",))
    with pytest.raises(ValueError, match="sizes=0"):
        run_benchmark(sizes=(0,))
