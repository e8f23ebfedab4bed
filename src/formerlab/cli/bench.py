"""``formerlab bench ...``: speed / memory benchmarks. Every one takes ``--threads`` as a
count or a comma list (parsed by :func:`formerlab.cli.common.parse_threads`) and prints its
tables through :func:`formerlab.cli.common.write_table` (``--format table|markdown|csv``)."""

from __future__ import annotations

import typer

from formerlab.cli.common import (
    Format,
    console,
    fail,
    format_option,
    markdown_option,
    one_thread_count,
    parse_threads,
    progress_line,
    resolve_format,
    threads_option,
    with_sdpa_backends,
    write_markdown,
    write_table,
)

#: --format of the commands whose --threads list prints a thread-scaling table instead
SCALING_NOTE = "; markdown when unset and --threads lists several counts (the scaling table)."

bench_app = typer.Typer(help="Speed / memory benchmarks (ratios measured side by side).",
                        no_args_is_help=True)


@bench_app.command("metric")
def bench_metric(
    sizes: list[int] = typer.Option([64, 128, 256, 512, 1024], "--size", help="Sequence lengths N (repeat the option)."),
    batch: int = typer.Option(2, min=1),
    heads: int = typer.Option(4, min=1),
    head_dim: int = typer.Option(32, min=1, help="k, the per-head projection size."),
    causal: bool = typer.Option(False, help="Causal masking in every method."),
    warmup: int = typer.Option(1, min=0),
    repeats: int = typer.Option(3, min=1),
    threads: str = threads_option(what="(one count: this benchmark runs at one)"),
    device: str = typer.Option("cpu"),
    max_materialised_gib: float = typer.Option(6.0, help="Skip the materialised form above this estimate."),
    fmt: Format = format_option(),
    markdown: bool = markdown_option(),
    methods: list[str] = typer.Option(
        ["attention", "metric", "materialised"], "--method", help="Methods to run (repeat the option)."
    ),
) -> None:
    """Metric attention vs standard attention vs the materialising O(N²k²) form (fwd + bwd)."""
    from formerlab.bench.metric import run_benchmark, summary_rows

    fmt = resolve_format(fmt, markdown)
    threads = one_thread_count(parse_threads(threads), "bench metric")

    def progress(result) -> None:
        status = result.skipped or f"{result.time_s * 1e3:.1f} ms"
        progress_line(f"N={result.n:<5} {result.method:<13} {status}")

    try:
        results = run_benchmark(
            sizes=tuple(sizes), batch=batch, heads=heads, head_dim=head_dim, causal=causal,
            warmup=warmup, repeats=repeats, threads=threads, device=device,
            max_materialised_gib=max_materialised_gib, methods=tuple(methods), progress=progress,
        )
    except ValueError as error:
        raise fail(error) from None
    rows = summary_rows(results)
    write_table(f"metric attention, forward + backward, B={batch}, heads={heads}, "
                f"k={head_dim}, {'causal' if causal else 'bidirectional'} (ms / MiB)",
                list(rows[0]), [list(r.values()) for r in rows], fmt, right=True)



@bench_app.command("causal")
def bench_causal(
    sizes: list[int] = typer.Option([1024, 4096, 16384, 32768], "--size", help="Sequence lengths N (repeat the option)."),
    methods: list[str] = typer.Option(
        ["softmax", "causal_nystrom", "linear", "performer"], "--method", help="Kernels to run (repeat the option)."
    ),
    batch: int = typer.Option(1, min=1),
    heads: int = typer.Option(4, min=1),
    head_dim: int = typer.Option(64, min=1),
    warmup: int = typer.Option(1, min=0),
    repeats: int = typer.Option(3, min=1),
    threads: str = threads_option(),
    device: str = typer.Option("cpu", help="cpu or cuda (cuda adds SDPA's flash backend, run in bf16: it has no float32 kernel there, and its memory-efficient one)."),
    max_exact_n: int = typer.Option(16384, min=1, help="Skip exact softmax above this N (it grows as N²)."),
    fmt: Format = format_option(None, SCALING_NOTE),
    markdown: bool = markdown_option(),
    rounds: int = typer.Option(1, min=1, help="Interleaved rounds (median kept); with a --threads list, the scaling table takes --repeats instead."),
    option: list[str] = typer.Option([], "--option", help="A non-default kernel option METHOD.KEY=VALUE (repeat); labels the method, e.g. causal_nystrom[segment_size=128]."),
    stream: bool = typer.Option(True, "--stream/--no-stream", help="Also time the streaming step (one new token from a state: a KV-cache step for softmax) after each --stream-at context (not with a --threads list, which prints the scaling tables only)."),
    stream_at: list[int] = typer.Option([1024, 8192], "--stream-at", min=1, help="Context lengths of the streaming step (repeat the option)."),
    stream_tokens: int = typer.Option(64, min=1, help="Streamed tokens timed per case (median per token)."),
) -> None:
    """Causal kernels vs exact causal softmax (SDPA): forward + backward time, peak memory
    and the per-token time of the streaming step; every kernel at its defaults unless
    --option labels it. Methods: softmax, causal_nystrom, linear, performer, and the
    chunked recurrences retention, gla, deltanet, gated_deltanet, mamba2."""
    from formerlab.bench.causal import (
        memory_growth,
        parse_options,
        run_benchmark,
        run_streaming,
        spread,
        stream_rows,
        summary_rows,
        thread_scaling,
        time_per_1k,
    )
    from formerlab.bench.threads import scaling_table

    scaling_fmt = resolve_format(fmt, markdown, default=Format.markdown)
    fmt = resolve_format(fmt, markdown)
    methods = with_sdpa_backends(methods, device)
    counts = parse_threads(threads)
    try:
        options = parse_options(option)
    except ValueError as error:
        raise fail(error) from None
    if counts is not None and len(counts) > 1:
        if rounds > 1:  # the scaling table's interleaved rounds are its --repeats
            raise fail(ValueError(
                f"--rounds={rounds} is not allowed with --threads {threads!r}: the thread-scaling "
                "table interleaves --repeats rounds; pass --repeats, or one thread count per run"))
        for n in sizes:
            try:
                times = thread_scaling(n, counts, tuple(methods), batch, heads, head_dim,
                                       warmup, repeats, device, options)
            except ValueError as error:
                raise fail(error) from None
            write_markdown(f"causal, forward + backward, N={n}, B={batch}, H={heads}, "
                           f"D={head_dim}, {device}; min of {repeats} interleaved rounds; paired: "
                           "the median of the per-round ratios",
                           scaling_table(times, reference=next(iter(times))), scaling_fmt)
        return
    threads = None if counts is None else counts[0]

    def progress(result) -> None:
        status = result.skipped or f"{result.time_s * 1e3:.0f} ms"
        progress_line(f"N={result.n:<6} {result.method:<15} {status}")

    try:
        results = run_benchmark(
            sizes=tuple(sizes), methods=tuple(methods), batch=batch, heads=heads,
            head_dim=head_dim, warmup=warmup, repeats=repeats, threads=threads, device=device,
            max_exact_n=max_exact_n, progress=progress, options=options,
            rounds=rounds,
        )
    except ValueError as error:
        raise fail(error) from None
    rows = summary_rows(results)
    notes = []
    for method in methods:
        points = memory_growth(results, method)
        if points:
            per_token = ", ".join(f"N={n}: {b / 1024:.1f}" for n, b in points)
            notes.append(f"peak KiB per token, {method}: {per_token}")
    for method in methods:
        points = time_per_1k(results, method)
        flat = spread(time_per_1k(results, method, from_n=2048))
        if points:
            per_1k = ", ".join(f"N={n}: {ms:.1f}" for n, ms in points)
            notes.append(f"ms per 1k tokens, {method}: {per_1k}"
                         + ("" if flat is None else f" (max / min from N=2048: {flat:.2f}×)"))
    write_table(f"causal attention, forward + backward, B={batch}, H={heads}, "
                f"D={head_dim} (ms / peak MiB)",
                list(rows[0]), [list(r.values()) for r in rows], fmt, right=True, notes=notes)
    if not stream:
        return

    def stream_progress(result) -> None:
        status = result.skipped or f"{result.time_s * 1e3:.3f} ms/token"
        progress_line(f"context {result.n:<6} {result.method:<15} {status}")

    try:
        streamed = run_streaming(
            contexts=tuple(stream_at), methods=tuple(methods), batch=batch, heads=heads,
            head_dim=head_dim, tokens=stream_tokens, warmup=warmup, threads=threads,
            device=device, options=options, progress=stream_progress, rounds=rounds,
        )
    except ValueError as error:
        raise fail(error) from None
    rows = stream_rows(streamed)
    write_table(f"streaming step, one new token after each context, B={batch}, H={heads}, "
                f"D={head_dim}, no grad (median ms per token / state MiB)",
                list(rows[0]), [list(r.values()) for r in rows], fmt, right=True)


@bench_app.command("ops")
def bench_ops(
    size: int = typer.Option(4096, "--size", min=1, help="Sequence length N."),
    mechanisms: list[str] = typer.Option(None, "--mechanism", help="Mechanisms to run (repeat; default all): retention, simple_gla, gla, deltanet, gated_deltanet, mamba2."),
    batch: int = typer.Option(1, min=1),
    heads: int = typer.Option(4, min=1),
    head_dim: int = typer.Option(64, min=1, help="K = V, the per-head size."),
    warmup: int = typer.Option(1, min=0),
    rounds: int = typer.Option(3, min=1, help="Interleaved timing rounds (time = minimum, ratios = median of the paired per-round ratios)."),
    threads: str = threads_option(),
    memory_sizes: list[int] = typer.Option(None, "--memory-size", help="N at which the saved-for-backward bytes are measured (repeat; default N/4 and N)."),
    recurrent: bool = typer.Option(True, "--recurrent/--no-recurrent", help="Also time the token-by-token recurrence (slow)."),
    device: str = typer.Option("cpu"),
    fmt: Format = format_option(),
    markdown: bool = markdown_option(),
) -> None:
    """Our chunked linear-recurrence ops vs fla's naive chunked references and vs our
    token-by-token recurrence: forward + backward time, the ratios per thread count, the
    agreement of the forms on the benchmark's inputs, and the bytes saved for backward."""
    import torch

    from formerlab.bench import ops as bench

    fmt = resolve_format(fmt, markdown)
    counts = parse_threads(threads)
    try:
        results = bench.run_benchmark(
            n=size, mechanisms=tuple(mechanisms or bench.MECHANISMS), batch=batch,
            heads=heads, head_dim=head_dim, threads=counts, rounds=rounds, warmup=warmup,
            memory_sizes=None if not memory_sizes else tuple(memory_sizes),
            recurrent_form=recurrent, device=device, progress=progress_line,
        )
    except ValueError as error:
        raise fail(error) from None
    rows = bench.time_rows(results)
    write_table(f"chunked ops, forward + backward, N={size}, B={batch}, H={heads}, "
                f"K=V={head_dim}, {device}, torch {torch.__version__}; ms = minimum of {rounds} "
                "interleaved rounds, ratios = median (range) of the per-round ratios",
                list(rows[0]), [list(r.values()) for r in rows], fmt,
                notes=[f"max |diff|: outputs and input gradients against ours, flagged above "
                       f"{bench.TOLERANCE:g} of the largest value"])  # fmt: skip
    rows = bench.memory_rows(results)
    if rows:
        write_table("bytes saved for backward (saved_tensors_hooks; inputs not counted); "
                    "one state = one [K, V] state of every head",
                    list(rows[0]), [list(r.values()) for r in rows], fmt, right=True)


@bench_app.command("deq")
def bench_deq(
    dim: int = typer.Option(256, min=1),
    seq: int = typer.Option(128, min=1),
    batch: int = typer.Option(8, min=1),
    gains: list[float] = typer.Option([1.0, 2.0, 3.0], "--gain", help="Block weight gains (repeat the option); >1 = harder problems."),
    depths: list[int] = typer.Option([2, 4, 8, 12], "--depth", help="Explicit stack depths to compare memory with (repeat)."),
    tol: float = typer.Option(1e-3, help="Relative residual to reach."),
    max_iter: int = typer.Option(100, min=1),
    repeats: int = typer.Option(3, min=1),
    torchdeq: bool = typer.Option(True, help="Compare with the torchdeq package if installed."),
    device: str = typer.Option("cpu"),
    threads: str = threads_option(what="to time every solver (ours, torchdeq) at each, interleaved, at the first --gain"),
    fmt: Format = format_option(None, "; markdown when unset."),
) -> None:
    """DEQ solvers (ours vs torchdeq) on DEQ-Transformer fixed points; DEQ vs explicit training memory."""
    from formerlab.bench.deq import run, thread_scaling
    from formerlab.bench.threads import scaling_table

    counts = parse_threads(threads)
    if counts is not None:
        try:
            times = thread_scaling(counts, dim, seq, batch, gains[0], tol, max_iter,
                                   compare_torchdeq=torchdeq, repeats=repeats, device=device)
        except ValueError as error:
            raise fail(error) from None
        write_markdown(f"DEQ solves, d={dim}, N={seq}, B={batch}, gain {gains[0]:g}, tol {tol:g}, "
                       f"{device}; min of {repeats} interleaved rounds",
                       scaling_table(times, label="solver"),
                       resolve_format(fmt, default=Format.markdown))
        return

    try:
        run(
            dim=dim, seq=seq, batch=batch, gains=tuple(gains), depths=tuple(depths), tol=tol,
            max_iter=max_iter, repeats=repeats, compare_torchdeq=torchdeq, device=device,
            echo=lambda line: console.print(line, highlight=False, markup=False, soft_wrap=True),
        )
    except ValueError as error:
        raise fail(error) from None


@bench_app.command("roots")
def bench_roots(
    problems: list[str] = typer.Option(None, "--problem", help="Problems to run (repeat; exact names or shell patterns like 'wood*'); default: all."),
    methods: list[str] = typer.Option(None, "--method", help="Methods to compare (repeat): 'default' (solve_root's), a root solver name, or hybr / broyden1 / krylov (SciPy); default: default and hybr."),
    max_iter: int = typer.Option(1000, min=1, help="Our iteration budget (hybr keeps its default maxfev = 200 (n + 1))."),
    repeats: int = typer.Option(1, min=1, help="Timed runs per method and problem (median)."),
    fmt: Format = format_option(None, "; markdown when unset."),
) -> None:
    """Root solvers on MINPACK's Moré-Garbow-Hillstrom test list and larger problems, side by side with scipy.optimize.root (hybr)."""
    from formerlab.bench.roots import DEFAULT_METHODS, header, run_benchmark, summary
    from formerlab.bench.roots import markdown_table as roots_table

    try:
        rows = run_benchmark(names=problems or None, methods=tuple(methods or DEFAULT_METHODS),
                             max_iter=max_iter, repeats=repeats)
    except (ValueError, ImportError) as error:
        raise fail(error) from None
    write_markdown(header(max_iter, repeats), roots_table(rows),
                   resolve_format(fmt, default=Format.markdown),
                   right=lambda i, column: i == 1 or i >= 3, notes=summary(rows))


@bench_app.command("generate")
def bench_generate(
    kernels: list[str] = typer.Option(None, "--kernel", help="Causal kernels to run (repeat; default all)."),
    tokens: int = typer.Option(4096, min=1, help="Tokens to generate after the prompt."),
    prompt: int = typer.Option(16, min=1, help="Prompt length."),
    dim: int = typer.Option(128, min=1),
    depth: int = typer.Option(4, min=1),
    heads: int = typer.Option(4, min=1),
    rounds: int = typer.Option(2, min=1, help="Interleaved rounds (minimum kept)."),
    repeats: int = typer.Option(3, min=1, help="Forwards per uncached point (median)."),
    positions: list[int] = typer.Option(None, "--at", help="Positions to report (repeat; default 1024 2048 4096)."),
    uncached: bool = typer.Option(True, help="Also measure the recompute path."),
    full_uncached: bool = typer.Option(False, help="Time the whole recompute loop instead of integrating per-position times (slow)."),
    threads: str = threads_option(what="(one count: this benchmark runs at one)"),
    device: str = typer.Option("cpu"),
    clock: str = typer.Option("wall", help="wall, or cpu (thread CPU time; needs --threads 1) on a shared machine."),
    fmt: Format = format_option(),
    markdown: bool = markdown_option(),
    hf: bool = typer.Option(False, "--hf", help="A Llama-shaped Hugging Face decoder (random weights, offline): per-token decode time at each --at context (default 1024 4096) and cache KiB per layer, the original model with its DynamicCache beside formerlab kernels (--kernel; default softmax, linear, performer) decoding with a FormerlabCache. --threads may list counts (1,2)."),
    kv_heads: int = typer.Option(2, "--kv-heads", min=1, help="--hf: key/value heads (grouped-query attention)."),
    vocab: int = typer.Option(512, min=2, help="--hf: vocabulary size."),
    steps: int = typer.Option(32, min=1, help="--hf: timed decoding steps per context (median)."),
) -> None:
    """Generation speed, cached vs recomputed, per causal kernel: tokens/s, ms per token at
    1k / 2k / 4k, decoder-state memory (quick run: --tokens 1024 --at 256 --at 1024).
    With --hf: a Hugging Face decoder, its own KV cache vs swapped formerlab kernels."""
    import torch

    from formerlab.bench import generate as bench

    fmt = resolve_format(fmt, markdown)
    if hf:
        _bench_generate_hf(kernels, dim, depth, heads, kv_heads, vocab, steps, rounds,
                           positions, parse_threads(threads), device, clock, fmt)
        return
    threads = one_thread_count(parse_threads(threads), "bench generate")

    try:
        results = bench.run_benchmark(
            kernels=tuple(kernels or ()) or None, tokens=tokens, prompt=prompt, dim=dim,
            depth=depth, heads=heads, rounds=rounds, repeats=repeats,
            report_at=tuple(positions or bench.REPORT_AT), uncached=uncached,
            full_uncached=full_uncached, threads=threads, device=device, clock=clock,
            progress=progress_line,
        )
    except ValueError as error:
        raise fail(error) from None
    rows = bench.summary_rows(results)
    title = (f"generation, {depth} layers, width {dim}, {tokens} tokens after {prompt}, "
             f"{device}, {torch.get_num_threads()} thread(s), {clock} clock")
    write_table(title, list(rows[0]), [list(r.values()) for r in rows], fmt)


def _bench_generate_hf(kernels, dim, depth, heads, kv_heads, vocab, steps, rounds, positions,
                       threads, device, clock, fmt) -> None:
    """``bench generate --hf``: see :func:`formerlab.bench.generate.run_hf_benchmark`."""
    import torch

    from formerlab.bench import generate as bench

    try:
        results = bench.run_hf_benchmark(
            kernels=tuple(kernels or ()) or None, contexts=tuple(positions or bench.HF_CONTEXTS),
            dim=dim, depth=depth, heads=heads, kv_heads=kv_heads, vocab=vocab, steps=steps,
            rounds=rounds, threads=threads or (torch.get_num_threads(),), device=device,
            clock=clock, progress=progress_line,
        )
    except (ValueError, ImportError) as error:
        raise fail(error) from None
    rows = bench.hf_summary_rows(results)
    title = (f"HF decoding, Llama-shaped, {depth} layers, width {dim}, {heads} heads "
             f"({kv_heads} kv), vocabulary {vocab}, median of {steps} steps, {device}, "
             f"{clock} clock")
    write_table(title, list(rows[0]), [list(r.values()) for r in rows], fmt)


@bench_app.command("compile")
def bench_compile(
    targets: list[str] = typer.Option(["decoder", "nystrom"], "--target", help="decoder (the demo LM's training step), nystrom (the attention module) and/or performer (the demo LM with performer, redrawing every step); repeat."),
    size: int = typer.Option(4096, "--size", min=2, help="N for the nystrom target."),
    warmup: int = typer.Option(2, min=0),
    repeats: int = typer.Option(5, min=1, help="Interleaved rounds (time = minimum)."),
    threads: str = threads_option("1", what="(one count: this benchmark runs at one)"),
    device: str = typer.Option("cpu"),
    backend: str = typer.Option("inductor", help="torch.compile backend."),
    fmt: Format = format_option(None, "; markdown when unset."),
) -> None:
    """Eager vs torch.compile step time (and compile time) of the demo decoder and the
    Nyström module."""
    import torch

    from formerlab.bench import compile as bench

    threads = one_thread_count(parse_threads(threads), "bench compile")
    torch.set_num_threads(threads)
    rows = []
    for target in targets:
        try:
            row = bench.compare(target, n=size, warmup=warmup, repeats=repeats, device=device,
                                backend=backend)
        except ValueError as error:
            raise fail(error) from None
        progress_line(f"{target}: eager {row.eager_ms:.1f} ms, compiled {row.compiled_ms:.1f} ms "
                      f"(compile {row.compile_s:.0f} s)")
        rows.append(row)
    write_markdown(f"eager vs torch.compile, {device}, backend {backend}",
                   bench.markdown_table(rows, threads),
                   resolve_format(fmt, default=Format.markdown))




@bench_app.command("nystrom")
def bench_nystrom(
    sizes: list[int] = typer.Option([1024, 4096, 8192, 16384, 32768], "--size", help="Sequence lengths N (repeat the option)."),
    methods: list[str] = typer.Option(
        ["nystrom", "softmax", "nystrom-attention"], "--method", help="Methods to run (repeat the option)."
    ),
    batch: int = typer.Option(1, min=1),
    heads: int = typer.Option(4, min=1),
    head_dim: int = typer.Option(64, min=1),
    landmarks: int = typer.Option(64, min=1),
    conv_kernel: int = typer.Option(33, min=1),
    warmup: int = typer.Option(1, min=0),
    repeats: int = typer.Option(5, min=1, help="Interleaved timing rounds (time = minimum)."),
    threads: str = threads_option("1", what="to time every method at each count, interleaved (time only)"),
    device: str = typer.Option("cpu", help="cpu or cuda (cuda adds SDPA's flash backend, run in bf16: it has no float32 kernel there, and its memory-efficient one)."),
    max_exact_n: int = typer.Option(16384, help="Skip exact softmax above this N."),
    memory: bool = typer.Option(True, help="Measure peak memory (one subprocess per case)."),
    fmt: Format = format_option(None, SCALING_NOTE),
    markdown: bool = markdown_option(),
) -> None:
    """Nyström vs exact softmax vs the nystrom-attention package: forward + backward of the
    whole module (projections included), time and peak memory, ratios from one run."""
    from formerlab.bench import nystrom as bench
    from formerlab.bench.threads import scaling_table

    scaling_fmt = resolve_format(fmt, markdown, default=Format.markdown)
    fmt = resolve_format(fmt, markdown)
    methods = with_sdpa_backends(methods, device)
    counts = parse_threads(threads)
    if len(counts) > 1:
        for n in sizes:
            try:
                times = bench.thread_scaling(n, counts, tuple(methods), batch, heads, head_dim,
                                             landmarks, conv_kernel, warmup, repeats, device)
            except ValueError as error:
                raise fail(error) from None
            write_markdown(f"nystrom module, forward + backward, N={n}, B={batch}, heads={heads}, "
                           f"d={head_dim}, m={landmarks}, {device}; min of {repeats} interleaved "
                           "rounds; paired: the median of the per-round ratios",
                           scaling_table(times, reference="nystrom" if "nystrom" in times else None),
                           scaling_fmt)
        return
    threads = counts[0]
    try:
        results = bench.run_benchmark(
            sizes=tuple(sizes), methods=tuple(methods), batch=batch, heads=heads,
            head_dim=head_dim, landmarks=landmarks, conv_kernel=conv_kernel, warmup=warmup,
            repeats=repeats, threads=threads, device=device, max_exact_n=max_exact_n,
            memory=memory, progress=progress_line,
        )
    except ValueError as error:
        raise fail(error) from None
    per_k = ", ".join(f"N={n}: {t:.1f}" for n, t in bench.linearity(results))
    write_markdown(
        f"nystrom, forward + backward, B={batch}, heads={heads}, d={head_dim}, m={landmarks}, "
        f"conv {conv_kernel}, {device}, {threads} thread(s): ms (peak MiB)",
        bench.markdown_table(results), fmt,
        notes=[f"nystrom ms per 1k tokens (flat = linear in N): {per_k}"],
    )




@bench_app.command("packing")
def bench_packing(
    tasks: list[str] = typer.Option(["sst2", "listops"], "--task", help="sst2 and/or listops (repeat the option)."),
    steps: int = typer.Option(40, min=2, help="Training steps of each copy (the same batches)."),
    batch_size: int = typer.Option(32, min=1),
    dim: int = typer.Option(128, min=1),
    depth: int = typer.Option(4, min=1),
    heads: int = typer.Option(4, min=1),
    lr: float = typer.Option(1e-3, min=0.0),
    seed: int = typer.Option(0),
    warmup: int = typer.Option(2, min=0, help="First steps trained but not timed."),
    listops_size: int = typer.Option(400, min=1, help="ListOps training pool size."),
    listops_max_len: int = typer.Option(128, min=16, help="ListOps longest expression."),
    curve_points: int = typer.Option(8, min=2, help="Steps shown of each loss curve."),
    threads: str = threads_option("1,2", what="to run the whole comparison at each count"),
    clock: str = typer.Option("wall", help="wall, or cpu (the process's CPU time, all threads: leaves out waits for a core on a shared machine)."),
    fmt: Format = format_option(None, "; markdown when unset."),
) -> None:
    """Packed vs padded training (train.packing): the same model, steps and examples,
    interleaved; real tokens/s, padding fraction, speed-up and both loss curves."""
    from formerlab.bench import packing as bench

    fmt = resolve_format(fmt, default=Format.markdown)
    options = {"listops": {"train_size": listops_size, "max_len": listops_max_len}}
    try:
        results = bench.run_benchmark(
            tasks=tuple(tasks), threads=parse_threads(threads) or (1,), steps=steps,
            batch_size=batch_size, dim=dim, depth=depth, heads=heads, lr=lr, seed=seed,
            warmup=warmup, options=options, progress=progress_line, clock=clock,
        )
    except (ValueError, FileNotFoundError) as error:
        raise fail(error) from None
    write_markdown(f"packed vs padded training, {steps} steps, batch {batch_size}, width {dim}, "
                   f"depth {depth}, {clock} clock; tok/s = real tokens per second (step: pack, "
                   "forward, backward, optimiser)", bench.summary_table(results), fmt)
    for result in results:
        write_markdown(f"loss curves, {result.task}, {result.threads} thread(s)",
                       bench.curve_table(result, curve_points), fmt)
