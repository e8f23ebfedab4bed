"""The ``formerlab`` command. Sub-commands are thin: they parse, then call into the library."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(
    help="formerlab: efficient and implicit Transformer layers, and a workbench to compare them.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)
attention_app = typer.Typer(help="Attention kernels.", no_args_is_help=True)
bench_app = typer.Typer(help="Speed / memory benchmarks (ratios measured side by side).", no_args_is_help=True)
app.add_typer(attention_app, name="attention")
app.add_typer(bench_app, name="bench")
console = Console()


#: exit codes (README, "Reliability"): 2 a usage / config / file error, 3 a sweep with failed
#: trials, 130 interrupted with Ctrl-C (after saving)
EXIT_USAGE, EXIT_TRIALS_FAILED, EXIT_INTERRUPTED = 2, 3, 130


def fail(error: Exception, code: int = EXIT_USAGE) -> typer.Exit:
    """Print a user error without a traceback; use as ``raise fail(err)``."""
    from rich.markup import escape

    console.print(f"[bold red]error:[/] {escape(str(error))}", highlight=False)
    return typer.Exit(code)


@app.command()
def train(
    config: str = typer.Argument(None, help="YAML config (defaults if omitted; not with --resume)."),
    set_: list[str] = typer.Option([], "--set", help="Override a key: --set train.steps=100."),
    resume: str = typer.Option(None, "--resume", help="Continue the run in RUN_DIR exactly."),
    progress: bool = typer.Option(True, help="Show the progress bar."),
    nproc: int = typer.Option(
        1, "--nproc", min=1,
        help="Data-parallel processes on this machine (as torchrun --nproc_per_node=N).",
    ),
) -> None:
    """Train a model from a config; prints where the run, checkpoint and MLflow record are."""
    import shlex

    from formerlab.experiments import run_training
    from formerlab.train import ConfigError, TrainingError, distributed, load_config
    from formerlab.train.loop import TrainingInterrupted

    if config is not None and resume is not None:
        raise fail(ValueError("give CONFIG or --resume RUN_DIR, not both"))
    rank, world = distributed.rank_and_world()
    if nproc > 1:
        if world > 1:
            raise fail(ValueError(f"--nproc={nproc} inside a {world}-process job: use one or the other"))
        raise typer.Exit(distributed.launch(_rank_command(config, set_, resume, progress), nproc))
    finished = False
    try:
        cfg = None if resume else load_config(config, set_)
        if resume and set_:
            raise ConfigError("--set cannot change a resumed run; its stored config is used")
        # only rank 0 tracks: the others must not even open the MLflow store
        runner = run_training if rank == 0 else _untracked_training
        result, record = runner(cfg, resume=resume, progress=progress, console=console)
        finished = True
    except (ConfigError, TrainingError, FileNotFoundError, ValueError) as error:
        raise fail(_rank_failure(error, distributed)) from None
    except TrainingInterrupted as stop:
        console.print(f"[bold]interrupted[/] at step {stop.step}; checkpoint saved in {stop.run_dir}",
                      highlight=False, soft_wrap=True)
        console.print(f"continue with: formerlab train --resume {shlex.quote(str(stop.run_dir))}",
                      highlight=False, soft_wrap=True, markup=False)
        raise typer.Exit(EXIT_INTERRUPTED) from None
    except Exception as error:
        if distributed.rank_and_world()[1] == 1:
            raise
        raise fail(_rank_failure(error, distributed), code=1) from None
    finally:
        distributed.shutdown(sync=finished)
    if rank != 0:
        return  # rank 0 reports
    metrics = "  ".join(f"{k} {v:.4f}" for k, v in result.metrics.items())
    console.print(f"[bold]validation[/] at step {result.step}: {metrics}")
    if result.sample:
        console.rule("sample")
        console.print(result.sample, highlight=False, markup=False)
        console.rule()
    console.print(f"run:        {result.run_dir}")
    console.print(f"checkpoint: {result.run_dir / 'checkpoint'}")
    console.print(f"mlflow:     {record or 'disabled (tracking: none)'}")


def _rank_command(config, set_, resume, progress) -> list[str]:
    """The command each rank of ``train --nproc N`` runs (this one, in one process)."""
    import sys

    command = [sys.executable, "-m", "formerlab", "train"]
    command += [config] if config else []
    command += [arg for item in set_ for arg in ("--set", item)]
    command += ["--resume", resume] if resume else []
    return command + ([] if progress else ["--no-progress"])


def _untracked_training(cfg, resume, progress, console):
    """``run_training`` without a tracker (ranks other than 0)."""
    from formerlab.train import train as train_run

    return train_run(cfg, resume=resume, progress=progress, console=console), None


def _rank_failure(error: Exception, distributed) -> Exception | str:
    """In a multi-process job, name the rank (and leave the error for the launcher)."""
    if distributed.rank_and_world()[1] == 1:
        return error
    return distributed.record_failure(error)


@app.command()
def generate(
    run_dir: str = typer.Argument(..., help="A run folder made by `formerlab train`."),
    prompt: str = typer.Option("\n", "--prompt", help="Text to continue (default: a newline)."),
    tokens: int = typer.Option(200, "--tokens", help="How many tokens to sample (>= 1)."),
    temperature: float = typer.Option(0.8, help="Sampling temperature (> 0)."),
    top_k: int = typer.Option(None, "--top-k", help="Sample among the k likeliest (>= 1)."),
    seed: int = typer.Option(0, help="Sampling seed."),
    cache: bool = typer.Option(True, "--cache/--no-cache", help="Stream through the model's state (--no-cache: recompute the context per token)."),
    progress: bool = typer.Option(True, help="Report progress on stderr for long generations (>= 500 tokens)."),
) -> None:
    """Sample text from a trained language model, streaming it as it is produced; the
    speed (tokens/s) goes to stderr at the end."""
    import itertools
    import time

    import torch

    from formerlab.train import load_run

    try:
        if tokens < 1:
            raise ValueError(f"--tokens={tokens} is not allowed; expected an integer >= 1")
        if prompt == "":
            raise ValueError("--prompt is empty; give at least one character to continue "
                             "(the default prompt is a newline)")
        model, task, _ = load_run(run_dir)
        if task.kind != "decoder":
            raise ValueError(f"run {run_dir!r} is a {task.kind} model for {task.name!r}, not a language model")
        ids = torch.tensor([task.encode(prompt)])
        stream = model.stream(ids, tokens, temperature, top_k,
                              torch.Generator().manual_seed(seed), use_cache=cache)
        start = time.perf_counter()
        first = next(stream)  # argument errors surface here, before any output
    except (FileNotFoundError, ValueError, NotImplementedError) as error:
        raise fail(error) from None
    seconds = _stream_text(task, itertools.chain([first], stream), prompt, tokens, start, progress)
    mode = "cached" if cache and model.supports_streaming else "recomputed"
    Console(stderr=True).print(
        f"{tokens} tokens in {seconds:.2f} s: {tokens / seconds:.1f} tokens/s ({mode})", highlight=False
    )


def _stream_text(task, stream, prompt: str, tokens: int, start: float, progress: bool) -> float:
    """Write the prompt, then each sampled token as it comes; progress on stderr for long
    runs (every 10%, >= 500 tokens). Returns the seconds since ``start``."""
    import time

    out, err = typer.get_text_stream("stdout"), Console(stderr=True)
    every = max(tokens // 10, 1) if progress and tokens >= 500 else 0
    out.write(prompt)
    for count, nxt in enumerate(stream, start=1):
        out.write(task.decode(nxt[0].tolist()))
        out.flush()
        if every and count % every == 0 and count < tokens:
            rate = count / (time.perf_counter() - start)
            err.print(f"\n[{count}/{tokens} tokens, {rate:.0f} tokens/s]", highlight=False)
    out.write("\n")
    out.flush()
    return time.perf_counter() - start


def registry_table(title: str, entries) -> Table:
    """A table of registry entries: name, causal support, cost, description."""
    table = Table(title=title)
    for column in ("name", "causal", "complexity", "description"):
        table.add_column(column)
    for entry in entries:
        table.add_row(entry.name, "yes" if entry.causal else "no", entry.complexity, entry.description)
    return table


@attention_app.command("list")
def attention_list() -> None:
    """List attention kernels: name, causal support, cost, description."""
    from formerlab import attention

    console.print(registry_table("attention kernels", attention.describe()))


mixers_app = typer.Typer(help="Token mixers.", no_args_is_help=True)
app.add_typer(mixers_app, name="mixers")


@mixers_app.command("list")
def mixers_list() -> None:
    """List token mixers: name, causal support, cost, description."""
    from formerlab import mixers

    console.print(registry_table("token mixers", mixers.describe()))


solvers_app = typer.Typer(help="Fixed-point / root solvers.", no_args_is_help=True)
app.add_typer(solvers_app, name="solvers")


@solvers_app.command("list")
def solvers_list() -> None:
    """List solvers and whether they solve general root problems (solve_root)."""
    from formerlab import solvers

    table = Table(title="solvers")
    for column in ("name", "general root problems", "description"):
        table.add_column(column)
    for entry in solvers.describe():
        table.add_row(entry.name, "yes" if entry.extra.get("root") else "fixed-point only", entry.description)
    console.print(table)


@app.command()
def params(
    config: str = typer.Argument(None, help="YAML config (defaults if omitted)."),
    set_: list[str] = typer.Option([], "--set", help="Override a key: --set model.dim=256."),
) -> None:
    """Parameter count of every token mixer at the config's width / heads / kernel."""
    from formerlab.mixers.params import parameter_table
    from formerlab.train import ConfigError, load_config

    try:
        cfg = load_config(config, set_)
    except (ConfigError, ValueError) as error:
        raise fail(error) from None
    m = cfg.model
    rows = parameter_table(m.dim, m.heads, m.kernel, m.kernel_options, {m.mixer: m.mixer_options})
    table = Table(title=f"token-mixer parameters (one block's mixer) at dim={m.dim}, "
                  f"heads={m.heads}, kernel={m.kernel}")
    for column in ("mixer", "options", "parameters", "vs attention"):
        table.add_column(column, justify="right" if column in ("parameters", "vs attention") else "left")
    configured = next((r for r in rows if r.mixer == m.mixer), None)  # listed first
    if configured is not None and configured.error:
        raise fail(ValueError(f"model.mixer={m.mixer!r}: {configured.error}"))
    for row in rows:
        mark = " (configured)" if row is configured else ""
        count = f"{row.params:,}" if row.params is not None else f"n/a: {row.error}"
        ratio = f"{row.ratio:.3f}" if row.ratio is not None else "–"
        table.add_row(row.mixer + mark, row.label(), count, ratio)
    console.print(table)


@bench_app.command("metric")
def bench_metric(
    sizes: list[int] = typer.Option([64, 128, 256, 512, 1024], "--size", help="Sequence lengths N (repeat the option)."),
    batch: int = typer.Option(2, min=1),
    heads: int = typer.Option(4, min=1),
    head_dim: int = typer.Option(32, min=1, help="k, the per-head projection size."),
    causal: bool = typer.Option(False, help="Causal masking in every method."),
    warmup: int = typer.Option(1, min=0),
    repeats: int = typer.Option(3, min=1),
    threads: int = typer.Option(None, min=1, help="torch threads per case (default: torch's)."),
    device: str = typer.Option("cpu"),
    max_materialised_gib: float = typer.Option(6.0, help="Skip the materialised form above this estimate."),
    markdown: bool = typer.Option(False, help="Print a markdown table instead of a rich one."),
    methods: list[str] = typer.Option(
        ["attention", "metric", "materialised"], "--method", help="Methods to run (repeat the option)."
    ),
) -> None:
    """Metric attention vs standard attention vs the materialising O(N²k²) form (fwd + bwd)."""
    from formerlab.bench.measure import markdown_table
    from formerlab.bench.metric import run_benchmark, summary_rows

    def progress(result) -> None:
        status = result.skipped or f"{result.time_s * 1e3:.1f} ms"
        console.print(f"  N={result.n:<5} {result.method:<13} {status}", highlight=False)

    try:
        results = run_benchmark(
            sizes=tuple(sizes), batch=batch, heads=heads, head_dim=head_dim, causal=causal,
            warmup=warmup, repeats=repeats, threads=threads, device=device,
            max_materialised_gib=max_materialised_gib, methods=tuple(methods), progress=progress,
        )
    except ValueError as error:
        raise fail(error) from None
    rows = summary_rows(results)
    if markdown:
        typer.echo(markdown_table(rows))  # plain: rich would wrap the long lines
        return
    table = Table(title=f"metric attention, forward + backward, B={batch}, heads={heads}, "
                  f"k={head_dim}, {'causal' if causal else 'bidirectional'} (ms / MiB)")
    for column in rows[0]:
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(*row.values())
    console.print(table)


@app.command()
def ablate(
    sweep: str = typer.Argument(..., help="Sweep YAML: a base config plus axes (see configs/quick-ablation.yaml)."),
    out: str = typer.Option(None, "--out", help="Sweep folder (default runs/<name>-<time>; with --resume the newest)."),
    backend: str = typer.Option("local", "--backend", help="local (this process / worker processes) or ray."),
    workers: int = typer.Option(None, "--workers", min=1, help="Worker processes (local, default 1 = in-process) or Ray CPUs (default all)."),
    address: str = typer.Option(None, "--address", help="Ray cluster address (e.g. auto or ray://host:10001); default: a local Ray."),
    resume: bool = typer.Option(False, "--resume", help="Continue the sweep in --out, skipping completed trials."),
    set_: list[str] = typer.Option([], "--set", help="Override a base key for every trial: --set train.device=cuda."),
    progress: bool = typer.Option(True, help="Show progress bars."),
) -> None:
    """Run an ablation sweep: every trial validated first, then trained and tracked."""
    from formerlab.experiments.sweep import run_sweep
    from formerlab.train import ConfigError

    try:
        outcome = run_sweep(sweep, out=out, backend=backend, workers=workers, address=address,
                            resume=resume, progress=progress, console=console, overrides=set_)
    except (ConfigError, ValueError, FileNotFoundError) as error:
        raise fail(error) from None
    except KeyboardInterrupt:
        console.print(f"[bold]interrupted[/]; continue with: formerlab ablate {sweep} --resume"
                      + (f" --out {out}" if out else ""), highlight=False, soft_wrap=True)
        raise typer.Exit(EXIT_INTERRUPTED) from None
    console.print(
        f"trials: {len(outcome.trials)}: {outcome.completed} completed, {outcome.failed} failed "
        f"({len(outcome.ran)} run now, {len(outcome.skipped)} skipped as already completed) "
        f"in {outcome.wall_s:.0f} s", soft_wrap=True,
    )
    console.print(f"sweep:  {outcome.sweep_dir}", soft_wrap=True)
    if outcome.parent_run_id:
        console.print(f"mlflow: parent run {outcome.parent_run_id} ({outcome.tracking_uri})", soft_wrap=True)
    console.print(f"report: formerlab report {outcome.sweep_dir}", soft_wrap=True)
    if outcome.failed:
        console.print(f"[bold red]{outcome.failed} trial(s) failed[/] (see their error above and "
                      f"result.json); rerun them with: formerlab ablate {sweep} --resume "
                      f"--out {outcome.sweep_dir}", highlight=False, soft_wrap=True)
        raise typer.Exit(EXIT_TRIALS_FAILED)


@app.command()
def report(
    sweep_dir: str = typer.Argument(..., help="A sweep folder made by `formerlab ablate`."),
) -> None:
    """Write report.md and plots for a sweep; print its tables."""
    import json
    from pathlib import Path

    from formerlab.experiments.report import print_tables, write_report

    sweep_file = Path(sweep_dir) / "sweep.json"
    try:
        written = write_report(sweep_dir)
    except json.JSONDecodeError as error:  # report.py reads only sweep.json strictly
        raise fail(ValueError(f"{sweep_file}: not valid JSON ({error.msg} at line {error.lineno}); "
                              "restore it, or rerun the sweep with `formerlab ablate SWEEP --resume "
                              f"--out {sweep_dir}`")) from None
    except (KeyError, TypeError, AttributeError) as error:
        raise fail(ValueError(f"{sweep_file}: not a sweep record (missing or wrong field {error}); "
                              "pass a folder made by `formerlab ablate`")) from None
    except (FileNotFoundError, ValueError) as error:
        raise fail(error) from None
    print_tables(written, console)
    console.print(f"report: {written.path}", soft_wrap=True)
    for path in written.plots:
        console.print(f"plot:   {path}", soft_wrap=True)


viz_app = typer.Typer(help="Pictures of trained models.", no_args_is_help=True)
app.add_typer(viz_app, name="viz")


@viz_app.command("attention")
def viz_attention(
    run_dir: str = typer.Argument(None, help="A trained run (or a sweep's trial folder); or use --hf."),
    text: str = typer.Option(..., "--text", help="Input text (tokens separated by spaces for tasks without a text encoder)."),
    layer: int = typer.Option(0, "--layer", min=0, help="Which block's attention."),
    head: int = typer.Option(0, "--head", min=0, help="Which head."),
    kernels: list[str] = typer.Option([], "--kernel", help="Another kernel to draw, e.g. performer or nystrom:num_landmarks=4 (repeat)."),
    landmarks: int = typer.Option(None, "--landmarks", min=1, help="Nyström landmarks (default: the run's, else N/4)."),
    out: str = typer.Option(None, "--out", help="PNG path (default RUN_DIR/attention-layerL-headH.png)."),
    hf: str = typer.Option(None, "--hf", help="MODEL_DIR: a local Hugging Face model (and tokenizer) instead of a run."),
    every: bool = typer.Option(False, "--every", help="With --hf: one PNG per layer and head (in --out as a folder)."),
) -> None:
    """Exact softmax vs Nyström (6 iterations, to tolerance, exact pinv) vs other kernels on
    the same q/k of a trained model, side by side, relative error in each title."""
    from formerlab.experiments.viz import attention_figure

    if hf is not None:
        _viz_attention_hf(hf, text, layer, head, kernels, landmarks, out, every)
        return
    if run_dir is None:
        raise fail(ValueError("give RUN_DIR or --hf MODEL_DIR"))
    try:
        path, panels = attention_figure(run_dir, text, layer, head, kernels, landmarks, out)
    except (FileNotFoundError, ValueError) as error:
        raise fail(error) from None
    for panel in panels[1:]:
        console.print(f"  {panel.title:<48} relative error {panel.error:.3e}", highlight=False)
    console.print(f"attention maps: {path}", soft_wrap=True)


def _viz_attention_hf(model_dir, text, layer, head, kernels, landmarks, out, every) -> None:
    """``viz attention --hf``: maps of a Hugging Face model, one PNG per layer/head asked."""
    from pathlib import Path

    from formerlab.experiments.viz import AttentionMap, draw_attention, parse_kernel_spec

    try:
        from formerlab.integrations import hf_study

        specs = [parse_kernel_spec(spec) for spec in kernels]
        first = hf_study.attention_maps(model_dir, text, layer, head, specs, landmarks)
        pairs = [(layer, head)]
        if every:
            model, _, _ = hf_study.load_study_model(model_dir)
            count = len(hf_study.attention_modules(model))
            heads = model.config.num_attention_heads
            pairs = [(i, h) for i in range(count) for h in range(heads)]
        folder = Path(out) if (out and every) else Path(model_dir)
        for i, h in pairs:
            tokens, maps, facts = first if (i, h) == (layer, head) else hf_study.attention_maps(
                model_dir, text, i, h, specs, landmarks)
            panels = [AttentionMap(m.title, m.weights, m.error) for m in maps]
            name = f"attention-layer{i}-head{h}.png"
            path = Path(out) if (out and not every) else folder / name
            path = draw_attention(tokens, panels, facts, path)
            for panel in panels[1:]:
                console.print(f"  layer {i} head {h}: {panel.title:<40} relative error {panel.error:.3e}", highlight=False)
            console.print(f"attention maps: {path}", soft_wrap=True)
    except (FileNotFoundError, ValueError, ImportError) as error:
        raise fail(error) from None


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
    threads: str = typer.Option(None, help="torch threads per case (default: torch's); a list like 1,2 times every method at each count, interleaved."),
    device: str = typer.Option("cpu", help="cpu or cuda (cuda adds SDPA's flash backend, run in bf16: it has no float32 kernel there, and its memory-efficient one)."),
    max_exact_n: int = typer.Option(16384, min=1, help="Skip exact softmax above this N (it grows as N²)."),
    markdown: bool = typer.Option(False, help="Print a markdown table instead of a rich one."),
    rounds: int = typer.Option(1, min=1, help="Interleaved rounds (median kept)."),
    option: list[str] = typer.Option([], "--option", help="A non-default kernel option METHOD.KEY=VALUE (repeat); labels the method, e.g. causal_nystrom[segment_size=128]."),
) -> None:
    """Causal kernels vs exact causal softmax (SDPA): forward + backward time, peak memory;
    every kernel at its defaults unless --option labels it."""
    from formerlab.bench.causal import (
        memory_growth,
        parse_options,
        run_benchmark,
        summary_rows,
        thread_scaling,
    )
    from formerlab.bench.measure import markdown_table
    from formerlab.bench.threads import parse_threads, scaling_table

    methods = _with_sdpa_backends(methods, device)
    try:
        counts = None if threads is None else parse_threads(threads)
    except ValueError as error:
        raise fail(error) from None
    if counts is not None and len(counts) > 1:
        for n in sizes:
            try:
                times = thread_scaling(n, counts, tuple(methods), batch, heads, head_dim,
                                       warmup, repeats, device)
            except ValueError as error:
                raise fail(error) from None
            console.print(f"causal, forward + backward, N={n}, B={batch}, H={heads}, D={head_dim}, "
                          f"{device}; min of {repeats} interleaved rounds; paired: the median of the "
                          "per-round ratios", highlight=False)
            typer.echo(scaling_table(times, reference=methods[0]))
        return
    threads = None if counts is None else counts[0]

    def progress(result) -> None:
        status = result.skipped or f"{result.time_s * 1e3:.0f} ms"
        console.print(f"  N={result.n:<6} {result.method:<15} {status}", highlight=False)

    try:
        results = run_benchmark(
            sizes=tuple(sizes), methods=tuple(methods), batch=batch, heads=heads,
            head_dim=head_dim, warmup=warmup, repeats=repeats, threads=threads, device=device,
            max_exact_n=max_exact_n, progress=progress, options=parse_options(option),
            rounds=rounds,
        )
    except ValueError as error:
        raise fail(error) from None
    rows = summary_rows(results)
    if markdown:
        console.print(markdown_table(rows), highlight=False, markup=False)
    else:
        table = Table(title=f"causal attention, forward + backward, B={batch}, H={heads}, "
                      f"D={head_dim} (ms / peak MiB)")
        for column in rows[0]:
            table.add_column(column, justify="right")
        for row in rows:
            table.add_row(*row.values())
        console.print(table)
    for method in methods:
        points = memory_growth(results, method)
        if points:
            per_token = ", ".join(f"N={n}: {b / 1024:.1f}" for n, b in points)
            console.print(f"peak KiB per token, {method}: {per_token}", highlight=False)


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
    threads: str = typer.Option(None, help="Thread counts like 1,2: time every solver (ours, torchdeq) at each, interleaved, at the first --gain."),
) -> None:
    """DEQ solvers (ours vs torchdeq) on DEQ-Transformer fixed points; DEQ vs explicit training memory."""
    from formerlab.bench.deq import run, thread_scaling
    from formerlab.bench.threads import parse_threads, scaling_table

    if threads is not None:
        try:
            counts = parse_threads(threads)
            times = thread_scaling(counts, dim, seq, batch, gains[0], tol, max_iter,
                                   compare_torchdeq=torchdeq, repeats=repeats, device=device)
        except ValueError as error:
            raise fail(error) from None
        console.print(f"DEQ solves, d={dim}, N={seq}, B={batch}, gain {gains[0]:g}, tol {tol:g}, "
                      f"{device}; min of {repeats} interleaved rounds", highlight=False)
        typer.echo(scaling_table(times, label="solver"))
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
) -> None:
    """Root solvers on MINPACK's Moré-Garbow-Hillstrom test list and larger problems, side by side with scipy.optimize.root (hybr)."""
    from formerlab.bench.roots import DEFAULT_METHODS, header, run_benchmark, summary
    from formerlab.bench.roots import markdown_table as roots_table

    try:
        rows = run_benchmark(names=problems or None, methods=tuple(methods or DEFAULT_METHODS),
                             max_iter=max_iter, repeats=repeats)
    except (ValueError, ImportError) as error:
        raise fail(error) from None
    console.print(header(max_iter, repeats), highlight=False, markup=False)
    console.print(roots_table(rows), highlight=False, markup=False, soft_wrap=True)
    for line in summary(rows):
        console.print(line, highlight=False, markup=False, soft_wrap=True)


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
    threads: int = typer.Option(None, min=1, help="torch threads (default: torch's)."),
    device: str = typer.Option("cpu"),
    clock: str = typer.Option("wall", help="wall, or cpu (thread CPU time; needs --threads 1) on a shared machine."),
    markdown: bool = typer.Option(False, help="Print a markdown table instead of a rich one."),
) -> None:
    """Generation speed, cached vs recomputed, per causal kernel: tokens/s, ms per token at
    1k / 2k / 4k, decoder-state memory (quick run: --tokens 1024 --at 256 --at 1024)."""
    import torch

    from formerlab.bench import generate as bench
    from formerlab.bench.measure import markdown_table

    try:
        results = bench.run_benchmark(
            kernels=tuple(kernels or ()) or None, tokens=tokens, prompt=prompt, dim=dim,
            depth=depth, heads=heads, rounds=rounds, repeats=repeats,
            report_at=tuple(positions or bench.REPORT_AT), uncached=uncached,
            full_uncached=full_uncached, threads=threads, device=device, clock=clock,
            progress=lambda msg: console.print(f"  {msg}", highlight=False),
        )
    except ValueError as error:
        raise fail(error) from None
    rows = bench.summary_rows(results)
    title = (f"generation, {depth} layers, width {dim}, {tokens} tokens after {prompt}, "
             f"{device}, {torch.get_num_threads()} thread(s), {clock} clock")
    if markdown:
        typer.echo(title)
        typer.echo(markdown_table(rows))
    else:
        _print_table(title, list(rows[0]), [list(r.values()) for r in rows])


@bench_app.command("compile")
def bench_compile(
    targets: list[str] = typer.Option(["decoder", "nystrom"], "--target", help="decoder (the demo LM's training step), nystrom (the attention module) and/or performer (the demo LM with performer, redrawing every step); repeat."),
    size: int = typer.Option(4096, "--size", min=2, help="N for the nystrom target."),
    warmup: int = typer.Option(2, min=0),
    repeats: int = typer.Option(5, min=1, help="Interleaved rounds (time = minimum)."),
    threads: int = typer.Option(1, min=1, help="torch threads."),
    device: str = typer.Option("cpu"),
    backend: str = typer.Option("inductor", help="torch.compile backend."),
) -> None:
    """Eager vs torch.compile step time (and compile time) of the demo decoder and the
    Nyström module."""
    import torch

    from formerlab.bench import compile as bench

    torch.set_num_threads(threads)
    rows = []
    for target in targets:
        try:
            row = bench.compare(target, n=size, warmup=warmup, repeats=repeats, device=device,
                                backend=backend)
        except ValueError as error:
            raise fail(error) from None
        console.print(f"  {target}: eager {row.eager_ms:.1f} ms, compiled {row.compiled_ms:.1f} ms "
                      f"(compile {row.compile_s:.0f} s)", highlight=False)
        rows.append(row)
    typer.echo(bench.markdown_table(rows, threads))


def _with_sdpa_backends(methods: list[str], device: str) -> list[str]:
    """On CUDA, exact attention on SDPA's flash and memory-efficient backends joins the
    comparison (unless already asked for)."""
    if not device.startswith("cuda"):
        return list(methods)
    return list(methods) + [m for m in ("sdpa-flash", "sdpa-efficient") if m not in methods]


def _print_table(title: str, columns: list[str], rows: list[list[str]]) -> None:
    table = Table(title=title)
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*row)
    console.print(table)


@app.command("pinv-study")
def pinv_study(
    sizes: list[int] = typer.Option(None, "--sizes", help="Matrix sizes (repeat the option); default 2 … 512."),
    kind: str = typer.Option("random", "--kind", help="random (mixed scales 1e-3…1e3) or softmax matrices."),
    tol: float = typer.Option(None, "--tol", help="Residual tolerance (default: 1e-12 float64, 1e-5 float32)."),
    max_iter: int = typer.Option(100, "--max-iter", min=1),
    batch: int = typer.Option(4, "--batch", min=1, help="Matrices per size."),
    dtype: str = typer.Option("float64", "--dtype", help="float64 or float32."),
    seed: int = typer.Option(0, "--seed"),
    markdown: bool = typer.Option(False, help="Print markdown instead of a rich table."),
    ratios: bool = typer.Option(False, "--ratios", help="Instead: the certificate's bound / true error by condition number (float64 1…1e8, float32 1…1e4) at each --sizes (default 64)."),
) -> None:
    """Iterative pseudoinverse: convergence per init (global, razavi, frobenius, spectral,
    auto) and order (2, 3, 7) per matrix size, and the error after the paper's 6 iterations;
    with --ratios, how sharp the convergence certificate is."""
    from formerlab.bench import pinv_study as study

    if ratios:
        for n in sizes or [64]:
            console.print(f"  bound / error at n={n} ...", highlight=False)
            typer.echo(study.ratio_markdown(study.all_ratios(n, seed=seed)))
        return
    try:
        rows = study.run_pinv_study(
            sizes=tuple(sizes) if sizes else study.DEFAULT_SIZES, kind=kind, tol=tol,
            max_iter=max_iter, batch=batch, dtype=dtype, seed=seed,
            progress=lambda msg: console.print(f"  {msg}", highlight=False),
        )
    except ValueError as error:
        raise fail(error) from None
    if markdown:
        typer.echo(study.markdown(rows))
        return
    _print_table(f"pinv-study: {kind} matrices, {dtype}", *study.table(rows))
    for init, (mm, ok, err) in sorted(study.auto_evidence(rows).items()):
        console.print(f"{init}: {mm} matmuls in total, {ok} cases fully converged, worst error {err:.1e}")


@app.command("approx")
def approx(
    n: int = typer.Option(1024, "--n", min=2, help="Sequence length of the synthetic q, k, v."),
    landmarks: int = typer.Option(64, "--landmarks", min=1, help="m, for kernels that take num_landmarks."),
    checkpoint: str = typer.Option(None, "--checkpoint", help="RUN_DIR: take q, k, v from a trained model."),
    causal: bool = typer.Option(False, "--causal", help="Compare the causal kernels with exact causal softmax."),
    scales: list[float] = typer.Option([1.0, 2.0], "--scale", help="std of q and k (repeat the option)."),
    data: list[str] = typer.Option(["smooth", "random"], "--data", help="smooth and/or random (repeat)."),
    width: float = typer.Option(8.0, "--width", help="Smoothing width (tokens) of the smooth data."),
    heads: int = typer.Option(4, "--heads", min=1),
    head_dim: int = typer.Option(64, "--head-dim", min=1),
    batch: int = typer.Option(1, "--batch", min=1, help="Sequences (of the checkpoint's validation data too)."),
    curve_iters: int = typer.Option(20, "--curve-iters", min=1, help="Iterations of the error curve."),
    weights: bool = typer.Option(True, help="Also compare the N×N matrices (memory N²)."),
    seed: int = typer.Option(0, "--seed"),
    markdown: bool = typer.Option(False, help="Print markdown instead of a rich table."),
    hf: str = typer.Option(None, "--hf", help="MODEL_DIR: q, k, v of a local Hugging Face model (with its tokenizer)."),
    text: str = typer.Option(None, "--text", help="With --hf: FILE of text to run the model on."),
    layers: list[int] = typer.Option([], "--layers", help="With --hf: layers to study (repeat; default all)."),
    max_tokens: int = typer.Option(512, "--max-tokens", min=4, help="With --hf: cut the text to this many tokens."),
    loss: bool = typer.Option(True, help="With --hf: also the model's own loss change per kernel setting."),
    plot: str = typer.Option(None, "--plot", help="With --hf: PNG of loss increase vs cost (default runs/hf-approx/MODEL-loss.png)."),
) -> None:
    """Approximation error of every registered approximate kernel against exact softmax,
    and Nyström's error by pseudoinverse iteration (semi-convergence)."""
    from formerlab.bench import approx as study

    if hf is not None:
        _approx_hf(hf, text, layers, landmarks, max_tokens, curve_iters, weights, loss, plot, markdown, seed)
        return
    try:
        report = study.run_approx(
            n=n, landmarks=landmarks, head_dim=head_dim, heads=heads, batch=batch,
            scales=tuple(scales), data=tuple(data), smooth_width=width, checkpoint=checkpoint,
            causal=causal, weights=weights, curve_iters=curve_iters, seed=seed,
        )
    except (ValueError, FileNotFoundError) as error:
        raise fail(error) from None
    if markdown:
        typer.echo(study.markdown(report))
        return
    s = report.settings
    _print_table(
        f"approximation error vs exact {'causal ' if causal else ''}softmax: N={s['n']}, "
        f"m={landmarks}, heads={s['heads']}, d={s['head_dim']}",
        *study.table(report),
    )
    for line in study.curve_lines(report):
        console.print(line, highlight=False)


def _approx_hf(model_dir, text, layers, landmarks, max_tokens, curve_iters, weights, loss, plot,
               markdown, seed) -> None:
    """``approx --hf``: kernel errors by layer, pinv curves, and the loss change per setting."""
    from pathlib import Path

    from formerlab.bench import approx as study

    if text is None:
        raise fail(ValueError("--hf needs --text FILE (the text to run the model on)"))
    try:
        from formerlab.integrations import hf_study

        content = hf_study.read_text(text)
        report = hf_study.approx_report(
            model_dir, content, list(layers) or None, landmarks, max_tokens, curve_iters,
            weights, seed,
        )
        s = report.settings
        title = (f"{Path(model_dir).name} ({s['kind']}): error vs exact {'causal ' if s['causal'] else ''}"
                 f"attention by layer, N={s['n']}, m={landmarks}, heads={s['heads']}, d={s['head_dim']}")
        if markdown:
            typer.echo(study.markdown(report))
        else:
            _print_table(title, *study.table(report))
            for line in study.curve_lines(report):
                console.print(line, highlight=False)
        if not loss:
            return
        base, rows, facts = hf_study.loss_study(
            model_dir, content, layers=list(layers) or None, max_tokens=max_tokens, seed=seed)
        cols, table_rows = hf_study.loss_table(base, rows)
        caption = (f"{facts['loss']} loss on the text after swapping (N={facts['n']}; time: "
                   f"median of 3 forwards, {facts['threads']} threads, noisy on a shared machine)")
        if markdown:
            lines = [caption, "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
            typer.echo("\n".join(lines + ["| " + " | ".join(r) + " |" for r in table_rows]))
        else:
            _print_table(caption, cols, table_rows)
        path = Path(plot) if plot else Path("runs") / "hf-approx" / f"{Path(model_dir).name}-loss.png"
        console.print(f"plot: {hf_study.loss_plot(base, rows, facts, path)}", soft_wrap=True)
    except (FileNotFoundError, ValueError, ImportError) as error:
        raise fail(error) from None


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
    threads: str = typer.Option("1", help="torch threads; a list like 1,2 times every method at each count, interleaved (time only)."),
    device: str = typer.Option("cpu", help="cpu or cuda (cuda adds SDPA's flash backend, run in bf16: it has no float32 kernel there, and its memory-efficient one)."),
    max_exact_n: int = typer.Option(16384, help="Skip exact softmax above this N."),
    memory: bool = typer.Option(True, help="Measure peak memory (one subprocess per case)."),
    markdown: bool = typer.Option(False, help="Print a markdown table instead of a rich one."),
) -> None:
    """Nyström vs exact softmax vs the nystrom-attention package: forward + backward of the
    whole module (projections included), time and peak memory, ratios from one run."""
    from formerlab.bench import nystrom as bench
    from formerlab.bench.threads import parse_threads, scaling_table

    methods = _with_sdpa_backends(methods, device)
    try:
        counts = parse_threads(threads)
    except ValueError as error:
        raise fail(error) from None
    if len(counts) > 1:
        for n in sizes:
            try:
                times = bench.thread_scaling(n, counts, tuple(methods), batch, heads, head_dim,
                                             landmarks, conv_kernel, warmup, repeats, device)
            except ValueError as error:
                raise fail(error) from None
            console.print(f"nystrom module, forward + backward, N={n}, B={batch}, heads={heads}, "
                          f"d={head_dim}, m={landmarks}, {device}; min of {repeats} interleaved "
                          "rounds; paired: the median of the per-round ratios", highlight=False)
            typer.echo(scaling_table(times, reference="nystrom" if "nystrom" in times else None))
        return
    threads = counts[0]
    try:
        results = bench.run_benchmark(
            sizes=tuple(sizes), methods=tuple(methods), batch=batch, heads=heads,
            head_dim=head_dim, landmarks=landmarks, conv_kernel=conv_kernel, warmup=warmup,
            repeats=repeats, threads=threads, device=device, max_exact_n=max_exact_n,
            memory=memory, progress=lambda msg: console.print(f"  {msg}", highlight=False),
        )
    except ValueError as error:
        raise fail(error) from None
    if markdown:
        typer.echo(bench.markdown_table(results))
    else:
        lines = bench.markdown_table(results).splitlines()
        cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
        _print_table(
            f"nystrom, forward + backward, B={batch}, heads={heads}, d={head_dim}, m={landmarks}, "
            f"conv {conv_kernel}, {device}, {threads} thread(s): ms (peak MiB)",
            cells[0], cells[2:],
        )
    per_k = ", ".join(f"N={n}: {t:.1f}" for n, t in bench.linearity(results))
    console.print(f"nystrom ms per 1k tokens (flat = linear in N): {per_k}", highlight=False)


def main() -> None:  # pragma: no cover - console-script entry
    app()
