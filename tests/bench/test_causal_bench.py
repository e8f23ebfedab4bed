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
    if method == "causal_nystrom":  # the kernel's default, not a length-derived size
        from formerlab.attention.causal_nystrom import DEFAULT_SEGMENT_SIZE

        assert result.info["segment_size"] == DEFAULT_SEGMENT_SIZE == 32


def test_every_kernel_runs_with_its_registry_defaults_unless_labelled():
    """The table shows what a user gets from ``attention.build(name)``: the benchmarked
    kernel's options are its defaults, and an option given changes the method's name."""
    from formerlab import attention
    from formerlab.bench.causal import causal_step, method_label

    for method in ("softmax", "causal_nystrom", "linear", "performer"):
        _, kernel = causal_step(Case(method, n=4096, heads=1, head_dim=4))
        default = attention.build(method)
        assert kernel.extra_repr() == default.extra_repr(), method
    _, kernel = causal_step(Case("causal_nystrom", n=64, options={"segment_size": 8}))
    assert kernel.segment_size == 8
    assert method_label("causal_nystrom", {}) == "causal_nystrom"
    assert method_label("causal_nystrom", {"segment_size": 8}) == "causal_nystrom[segment_size=8]"


@pytest.mark.filterwarnings("ignore:repeats=2 is too few")
def test_options_label_the_method_and_rounds_take_the_median():
    results = run_benchmark(sizes=(64,), methods=("causal_nystrom", "linear"), heads=1,
                            head_dim=8, warmup=0, repeats=1, threads=1, rounds=2,
                            options={"causal_nystrom": {"segment_size": 8}})
    assert [r.method for r in results] == ["causal_nystrom[segment_size=8]", "linear"]
    assert results[0].info["segment_size"] == 8 and all(r.time_s > 0 for r in results)
    rows = summary_rows(results)
    assert "causal_nystrom[segment_size=8] ms" in rows[0]


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


class SDPARecorder:
    """The SDPA kernels that ran and their input dtypes, e.g. ("flash", torch.bfloat16)."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        seen = self.seen = []

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                name = func._schema.name
                if name.startswith("aten::_scaled_dot_product") and "backward" not in name:
                    kind = "flash" if "flash" in name else "efficient" if "efficient" in name else name
                    seen.append((kind, args[0].dtype))
                return func(*args, **(kwargs or {}))

        self.mode = Mode()


@pytest.mark.parametrize("half_only", [False, True])
def test_the_pinned_flash_method_runs_flash_and_in_bf16_where_it_must(half_only, monkeypatch):
    """Flash has no float32 kernel on CUDA: there (simulated on the CPU by listing the CPU
    as half-only) both benchmarks run it under bf16 autocast; elsewhere in float32."""
    import torch

    from formerlab.bench import causal, measure, nystrom

    if half_only:
        monkeypatch.setattr(measure, "FLASH_HALF_ONLY", ("cpu",))
    expected = ("flash", torch.bfloat16 if half_only else torch.float32)
    for run in (
        lambda: causal.causal_step(causal.Case("sdpa-flash", 64, 1, 2, 16))[0](),
        lambda: nystrom._step_fn(nystrom.build_module("sdpa-flash", 32, 2, 8, 3),
                                 torch.randn(1, 64, 32, requires_grad=True))(),
    ):
        recorder = SDPARecorder()
        with recorder.mode:
            run()
        assert recorder.seen == [expected]
    with measure.pinned_sdpa("sdpa-efficient", "cpu"):  # the efficient kernel takes float32
        assert not torch.is_autocast_enabled("cpu")
