"""``formerlab linearize`` and ``formerlab linearize-base``."""

from __future__ import annotations

import typer

from formerlab.cli.common import EXIT_INTERRUPTED, console, fail, set_option


def linearize(
    config: str = typer.Argument(None, help="Linearize YAML config (not with --resume)."),
    set_: list[str] = set_option("transfer.steps=300"),
    resume: str = typer.Option(None, "--resume", help="Continue the run in RUN_DIR exactly."),
    progress: bool = typer.Option(True, help="Show the progress bar."),
) -> None:
    """Swap a linear-family attention into an HF causal LM, train it to imitate the original
    attention (attention transfer), fine-tune; prints the validation losses of the original,
    the swap and each stage, and the share of the swap's loss gap each stage closed."""
    import shlex

    from formerlab.experiments.linearize import linearize as run_linearize
    from formerlab.experiments.linearize import load_linearize_config
    from formerlab.train import ConfigError
    from formerlab.train.loop import TrainingInterrupted

    if config is not None and resume is not None:
        raise fail(ValueError("give CONFIG or --resume RUN_DIR, not both"))
    if config is None and resume is None:
        raise fail(ValueError("give a CONFIG (see configs/linearize/) or --resume RUN_DIR"))
    if resume is not None and set_:
        raise fail(ValueError("--set does not apply with --resume: a resumed run keeps its config"))
    try:
        cfg = None if resume else load_linearize_config(config, set_)
        result = run_linearize(cfg, resume=resume, progress=progress, console=console)
    except (ConfigError, FileNotFoundError, ValueError, ImportError) as error:
        raise fail(error) from None
    except TrainingInterrupted as stop:
        console.print(
            f"[bold]interrupted[/] at step {stop.step}; checkpoint saved in {stop.run_dir}",
            highlight=False,
            soft_wrap=True,
        )
        console.print(
            f"continue with: formerlab linearize --resume {shlex.quote(str(stop.run_dir))}",
            highlight=False,
            soft_wrap=True,
            markup=False,
        )
        raise typer.Exit(EXIT_INTERRUPTED) from None
    for stage, loss in result.losses.items():
        closed = result.gap_closed.get(stage)
        share = "" if closed is None else f"  (gap closed {closed:.1%})"
        shown = "-" if loss is None else f"{loss:.4f}"
        console.print(f"{stage:<9} val loss {shown}{share}", highlight=False)
    console.print(
        f"steps:      transfer {result.steps['transfer']}, finetune {result.steps['finetune']}",
        highlight=False,
    )
    console.print(f"run:        {result.run_dir}", highlight=False)
    console.print(f"model:      {result.model_dir}", highlight=False)


def linearize_base(
    config: str = typer.Argument(
        None, help="`formerlab train` YAML config with model.hf (not with --resume)."
    ),
    llama: str = typer.Option(
        None,
        "--llama",
        help="YAML of transformers.LlamaConfig keyword arguments: the random init created in model.hf.path when that folder has no config.json.",
    ),
    out: str = typer.Option(..., "--out", help="Folder for the trained model (an HF folder)."),
    set_: list[str] = set_option("train.steps=100"),
    resume: str = typer.Option(
        None, "--resume", help="Continue the training run in RUN_DIR exactly."
    ),
    progress: bool = typer.Option(True, help="Show the progress bar."),
) -> None:
    """Train the base model of a linearization study (a random-init Llama-shaped HF model,
    exact softmax attention) with `formerlab train`'s loop, and save it as an HF folder."""
    from formerlab.experiments.linearize import train_base
    from formerlab.train import ConfigError, TrainingError, load_config
    from formerlab.train.config import read_yaml_file

    if (config is None) == (resume is None):
        raise fail(ValueError("give CONFIG or --resume RUN_DIR (one of them)"))
    try:
        cfg = None if resume else load_config(config, set_)
        kwargs = read_yaml_file(llama, "--llama") if llama else None
        if cfg is not None and cfg.model.hf is not None and kwargs is None:
            from pathlib import Path

            if not (Path(cfg.model.hf.path) / "config.json").is_file():
                raise ValueError(
                    f"model.hf.path={cfg.model.hf.path!r} holds no model yet: give "
                    "--llama LLAMA.yaml to create the random init there"
                )
        result, folder = train_base(
            cfg, kwargs or {}, out, resume=resume, progress=progress, console=console
        )
    except (ConfigError, TrainingError, FileNotFoundError, ValueError) as error:
        raise fail(error) from None
    metrics = "  ".join(f"{k} {v:.4f}" for k, v in result.metrics.items())
    console.print(f"[bold]validation[/] at step {result.step}: {metrics}")
    console.print(f"run:   {result.run_dir}", highlight=False)
    console.print(f"model: {folder}", highlight=False)
