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
    results = run_benchmark(
        sizes=(64,),
        methods=("causal_nystrom", "linear"),
        heads=1,
        head_dim=8,
        warmup=0,
        repeats=1,
        threads=1,
        rounds=2,
        options={"causal_nystrom": {"segment_size": 8}},
    )
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
                    kind = (
                        "flash" if "flash" in name else "efficient" if "efficient" in name else name
                    )
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
        lambda: nystrom._step_fn(
            nystrom.build_module("sdpa-flash", 32, 2, 8, 3),
            torch.randn(1, 64, 32, requires_grad=True),
        )(),
    ):
        recorder = SDPARecorder()
        with recorder.mode:
            run()
        assert recorder.seen == [expected]
    with measure.pinned_sdpa("sdpa-efficient", "cpu"):  # the efficient kernel takes float32
        assert not torch.is_autocast_enabled("cpu")


# --- the chunked linear recurrences and the streaming step ---------------------------------

RECURRENCES = ("retention", "gla", "deltanet", "gated_deltanet", "mamba2")


@pytest.mark.parametrize("method", RECURRENCES)
def test_run_case_measures_the_recurrences_forward_and_backward(method):
    result = run_case(Case(method, n=64, heads=2, head_dim=8, warmup=0, repeats=1, threads=1))
    assert result.method == method and result.time_s > 0 and result.skipped is None


@pytest.mark.parametrize("method", RECURRENCES)
def test_the_recurrences_run_their_op_on_per_head_views_and_differentiate_every_input(method):
    """The (B, H, N, D) tensors reach the op as [B, T, H, D] (a transposed view): the
    output equals the op on contiguous [B, T, H, D] copies, and every input (q, k, v and
    the gates) gets a gradient."""
    import torch

    from formerlab.bench import ops
    from formerlab.bench.causal import recurrence_forward

    forward, leaves = recurrence_forward(Case(method, n=80, heads=2, head_dim=8))
    out = forward()
    q, k, v, *gates = leaves
    x = dict(zip("qkv", (t.detach().transpose(1, 2).contiguous() for t in (q, k, v))))
    names = {"retention": [], "gla": ["g"], "deltanet": ["beta"],
             "gated_deltanet": ["g", "beta"], "mamba2": ["dt", "A"]}[method]  # fmt: skip
    x.update(zip(names, (g.detach() for g in gates)))
    assert len(gates) == len(names)
    expected = ops.chunked(method, x).transpose(1, 2)
    torch.testing.assert_close(out.detach(), expected, rtol=1e-6, atol=1e-6)
    out.square().sum().backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in leaves)


def test_options_of_the_recurrences_are_checked_before_any_work():
    from formerlab.bench.causal import check_options, recurrence_forward

    with pytest.raises(ValueError, match=r"--option gla.chunk_size is not allowed; gla takes no"):
        run_benchmark(sizes=(32,), methods=("gla",), options={"gla": {"chunk_size": 32}})
    with pytest.raises(ValueError, match=r"--option deltanet.nope .* \['chunk_size'\]"):
        check_options({"deltanet": {"nope": 1}})
    check_options({"softmax": {"anything": 1}})  # registry kernels check theirs when built
    forward, _ = recurrence_forward(Case("retention", 64, options={"chunk_size": 16}))
    assert forward().shape == (1, 4, 64, 64)


@pytest.mark.parametrize("method", ["softmax", "linear", *RECURRENCES])
def test_a_stream_case_times_one_token_from_a_state(method):
    result = run_case(Case(method, n=40, heads=2, head_dim=8, warmup=1, threads=1,
                           mode="stream", tokens=3))  # fmt: skip
    assert result.time_s > 0 and result.skipped is None and result.peak_bytes is None
    if method in RECURRENCES:  # one [K, V] float32 state per head, whatever the context
        assert result.info["state_bytes"] == 2 * 8 * 8 * 4


def test_the_stream_advances_token_by_token_from_the_context_state():
    """Each timed step decodes the next token of the same stream: a KV cache grows with
    the tokens; a recurrence's streamed state equals the chunked op's over all tokens."""
    import torch

    from formerlab.bench import ops
    from formerlab.bench.causal import state_bytes, stream_steps

    advance, current = stream_steps(Case("softmax", 100, heads=2, head_dim=8, tokens=300))
    assert current().length == 100
    before = state_bytes(current())
    for _ in range(300):
        advance()
    assert current().length == 400 and state_bytes(current()) > before

    advance, current = stream_steps(Case("gated_deltanet", 50, heads=2, head_dim=8,
                                         warmup=0, tokens=5))  # fmt: skip
    for _ in range(5):
        advance()
    x = ops.make_inputs("gated_deltanet", 1, 55, 2, 8, requires_grad=False)
    torch.testing.assert_close(current(), ops.context_state("gated_deltanet", x),
                               rtol=1e-5, atol=1e-5)  # fmt: skip


def test_streaming_runs_report_per_token_time_and_state_per_context():
    from formerlab.bench.causal import run_streaming, stream_rows

    results = run_streaming(contexts=(16, 80), methods=("softmax", "retention"), heads=2,
                            head_dim=8, tokens=2, warmup=0, threads=1)  # fmt: skip
    assert [(r.method, r.n) for r in results] == [
        ("softmax", 16),
        ("retention", 16),
        ("softmax", 80),
        ("retention", 80),
    ]
    assert all(r.time_s > 0 for r in results)
    rows = stream_rows(results)
    assert [r["method"] for r in rows] == ["softmax", "retention"]
    assert set(rows[0]) == {"method", "ms/token @16", "ms/token @80", "@80 / @16",
                            "state MiB @16", "state MiB @80"}  # fmt: skip
    by = {(r.method, r.n): r.info["state_bytes"] for r in results}
    assert by["softmax", 80] > by["softmax", 16]  # the KV cache grows with the context
    assert by["retention", 80] == by["retention", 16] == 2 * 8 * 8 * 4  # a fixed state
    with pytest.raises(ValueError, match="contexts=0"):
        run_streaming(contexts=(0,))
    with pytest.raises(ValueError, match="tokens=0"):
        run_streaming(tokens=0)


def test_time_per_1k_tokens_spread_and_stream_rows_with_a_skip():
    from formerlab.bench.causal import spread, stream_rows, time_per_1k

    results = [
        Result("linear", 1024, time_s=0.010),
        Result("linear", 2048, time_s=0.030),
        Result("linear", 4096, time_s=0.045),
        Result("softmax", 4096, skipped="x"),
    ]
    assert time_per_1k(results, "linear") == [(1024, 10.0), (2048, 15.0), (4096, 11.25)]
    assert spread(time_per_1k(results, "linear", from_n=2048)) == pytest.approx(15 / 11.25)
    assert spread(time_per_1k(results, "softmax")) is None
    rows = stream_rows(
        [
            Result("a", 8, time_s=0.002, info={"state_bytes": 2**20}),
            Result("a", 64, skipped="failed: boom"),
        ]
    )
    assert rows == [
        {
            "method": "a",
            "ms/token @8": "2.000",
            "ms/token @64": "failed",
            "@64 / @8": "–",
            "state MiB @8": "1.00",
            "state MiB @64": "–",
        }
    ]


@pytest.mark.filterwarnings("ignore:repeats=1 is too few")
@pytest.mark.parametrize("fmt", ["csv", "markdown"])
def test_cli_bench_causal_prints_the_training_and_streaming_tables(fmt):
    """csv: both tables; markdown with --no-stream: the training table and its notes."""
    from typer.testing import CliRunner

    from formerlab.cli import app

    args = ["bench", "causal", "--size", "64", "--method", "retention", "--heads", "2",
            "--head-dim", "8", "--warmup", "0", "--repeats", "1", "--threads", "1",
            "--stream-at", "64", "--stream-tokens", "2", "--format", fmt]  # fmt: skip
    if fmt == "markdown":
        args.append("--no-stream")
    res = CliRunner().invoke(app, args, env={"COLUMNS": "250"})
    assert res.exit_code == 0, res.output
    if fmt == "csv":
        lines = res.stdout.splitlines()
        assert lines[0] == "N,retention ms,retention MiB" and lines[1].startswith("64,")
        assert lines[2] == "method,ms/token @64,state MiB @64"
        assert lines[3].startswith("retention,") and lines[3].endswith(",0.00")
    else:
        assert "| N | retention ms | retention MiB |" in res.output
        assert "ms per 1k tokens, retention: N=64:" in res.output
        assert "ms/token" not in res.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--method", "nope"], "methods='nope' is not allowed"),
        (["--method", "gla", "--option", "gla.chunk_size=32"], "gla takes no options"),
        (["--stream-at", "0"], "--stream-at"),
        (["--option", "gla"], "expected METHOD.KEY=VALUE"),
        (["--threads", "1,2", "--rounds", "3"], "--rounds=3 is not allowed with --threads '1,2'"),
    ],
)
def test_cli_bench_causal_bad_options_are_usage_errors(args, message):
    from typer.testing import CliRunner

    from formerlab.cli import app

    res = CliRunner().invoke(app, ["bench", "causal", "--size", "64", *args],
                             env={"COLUMNS": "250"})  # fmt: skip
    assert res.exit_code == 2, res.output
    assert message in " ".join(res.output.split())


def test_cli_bench_causal_thread_list_labels_options():
    # a --threads list prints the scaling table; --option must reach it (it was dropped)
    from typer.testing import CliRunner

    from formerlab.cli import app

    res = CliRunner().invoke(app, [
        "bench", "causal", "--size", "64", "--method", "linear", "--method", "causal_nystrom",
        "--option", "causal_nystrom.segment_size=8", "--heads", "2", "--head-dim", "8",
        "--warmup", "0", "--repeats", "1", "--threads", "1,2"], env={"COLUMNS": "250"})
    assert res.exit_code == 0, res.output
    assert "| causal_nystrom[segment_size=8] |" in res.output and "/ linear @1" in res.output
