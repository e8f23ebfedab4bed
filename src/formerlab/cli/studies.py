"""Studies of the library: ``params``, ``pinv-study``, ``approx`` and ``viz attention``."""

from __future__ import annotations

import typer

from formerlab.cli.common import (
    Format,
    console,
    fail,
    format_option,
    markdown_option,
    progress_line,
    resolve_format,
    set_option,
    write_table,
)

viz_app = typer.Typer(help="Pictures of trained models.", no_args_is_help=True)


def params(
    config: str = typer.Argument(None, help="YAML config (defaults if omitted)."),
    set_: list[str] = set_option("model.dim=256"),
    fmt: Format = format_option(),
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
    title = (f"token-mixer parameters (one block's mixer) at dim={m.dim}, "
             f"heads={m.heads}, kernel={m.kernel}")
    columns = ["mixer", "options", "parameters", "vs attention"]
    cells = []
    configured = next((r for r in rows if r.mixer == m.mixer), None)  # listed first
    if configured is not None and configured.error:
        raise fail(ValueError(f"model.mixer={m.mixer!r}: {configured.error}"))
    for row in rows:
        mark = " (configured)" if row is configured else ""
        count = f"{row.params:,}" if row.params is not None else f"n/a: {row.error}"
        ratio = f"{row.ratio:.3f}" if row.ratio is not None else "–"
        cells.append([row.mixer + mark, row.label(), count, ratio])
    write_table(title, columns, cells, fmt, right=lambda i, column: i >= 2)



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
        from formerlab.bench import hf_study

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



def pinv_study(
    sizes: list[int] = typer.Option(None, "--sizes", help="Matrix sizes (repeat the option); default 2 … 512."),
    kind: str = typer.Option("random", "--kind", help="random (mixed scales 1e-3…1e3) or softmax matrices."),
    tol: float = typer.Option(None, "--tol", help="Residual tolerance (default: 1e-12 float64, 1e-5 float32)."),
    max_iter: int = typer.Option(100, "--max-iter", min=1),
    batch: int = typer.Option(4, "--batch", min=1, help="Matrices per size."),
    dtype: str = typer.Option("float64", "--dtype", help="float64 or float32."),
    seed: int = typer.Option(0, "--seed"),
    fmt: Format = format_option(),
    markdown: bool = markdown_option(),
    ratios: bool = typer.Option(False, "--ratios", help="Instead: the certificate's bound / true error by condition number (float64 1…1e8, float32 1…1e4) at each --sizes (default 64)."),
) -> None:
    """Iterative pseudoinverse: convergence per init (global, razavi, frobenius, spectral,
    auto) and order (2, 3, 7) per matrix size, and the error after the paper's 6 iterations;
    with --ratios, how sharp the convergence certificate is."""
    from formerlab.bench import pinv_study as study

    fmt = resolve_format(fmt, markdown)
    if ratios:
        for n in sizes or [64]:
            progress_line(f"bound / error at n={n} ...")
            typer.echo(study.ratio_markdown(study.all_ratios(n, seed=seed)))
        return
    try:
        rows = study.run_pinv_study(
            sizes=tuple(sizes) if sizes else study.DEFAULT_SIZES, kind=kind, tol=tol,
            max_iter=max_iter, batch=batch, dtype=dtype, seed=seed,
            progress=progress_line,
        )
    except ValueError as error:
        raise fail(error) from None
    notes = [f"{init}: {mm} matmuls in total, {ok} cases fully converged, worst error {err:.1e}"
             for init, (mm, ok, err) in sorted(study.auto_evidence(rows).items())]
    write_table(f"pinv-study: {kind} matrices, {dtype}", *study.table(rows), fmt, notes=notes)


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
    fmt: Format = format_option(),
    markdown: bool = markdown_option(),
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

    fmt = resolve_format(fmt, markdown)
    if hf is not None:
        _approx_hf(hf, text, layers, landmarks, max_tokens, curve_iters, weights, loss, plot, fmt, seed)
        return
    try:
        report = study.run_approx(
            n=n, landmarks=landmarks, head_dim=head_dim, heads=heads, batch=batch,
            scales=tuple(scales), data=tuple(data), smooth_width=width, checkpoint=checkpoint,
            causal=causal, weights=weights, curve_iters=curve_iters, seed=seed,
            progress=progress_line,
        )
    except (ValueError, FileNotFoundError) as error:
        raise fail(error) from None
    s = report.settings
    write_table(
        f"approximation error vs exact {'causal ' if causal else ''}softmax: N={s['n']}, "
        f"m={landmarks}, heads={s['heads']}, d={s['head_dim']}",
        *study.table(report), fmt, notes=study.curve_lines(report),
    )


def _approx_hf(model_dir, text, layers, landmarks, max_tokens, curve_iters, weights, loss, plot,
               fmt, seed) -> None:
    """``approx --hf``: kernel errors by layer, pinv curves, and the loss change per setting."""
    from pathlib import Path

    from formerlab.bench import approx as study

    if text is None:
        raise fail(ValueError("--hf needs --text FILE (the text to run the model on)"))
    try:
        from formerlab.bench import hf_study

        content = hf_study.read_text(text)
        report = hf_study.approx_report(
            model_dir, content, list(layers) or None, landmarks, max_tokens, curve_iters,
            weights, seed,
        )
        s = report.settings
        title = (f"{Path(model_dir).name} ({s['kind']}): error vs exact {'causal ' if s['causal'] else ''}"
                 f"attention by layer, N={s['n']}, m={landmarks}, heads={s['heads']}, d={s['head_dim']}")
        write_table(title, *study.table(report), fmt, notes=study.curve_lines(report))
        if not loss:
            return
        base, rows, facts = hf_study.loss_study(
            model_dir, content, layers=list(layers) or None, max_tokens=max_tokens, seed=seed)
        cols, table_rows = hf_study.loss_table(base, rows)
        caption = (f"{facts['loss']} loss on the text after swapping (N={facts['n']}; time: "
                   f"median of 3 forwards, {facts['threads']} threads, noisy on a shared machine)")
        write_table(caption, cols, table_rows, fmt)
        path = Path(plot) if plot else Path("runs") / "hf-approx" / f"{Path(model_dir).name}-loss.png"
        console.print(f"plot: {hf_study.loss_plot(base, rows, facts, path)}", soft_wrap=True)
    except (FileNotFoundError, ValueError, ImportError) as error:
        raise fail(error) from None



