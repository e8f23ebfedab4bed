"""``formerlab train`` and ``formerlab generate``."""

from __future__ import annotations

import typer

from formerlab.cli.common import EXIT_INTERRUPTED, console, err_console, fail, set_option


def train(
    config: str = typer.Argument(None, help="YAML config (defaults if omitted; not with --resume)."),
    set_: list[str] = set_option("train.steps=100"),
    resume: str = typer.Option(None, "--resume", help="Continue the run in RUN_DIR exactly; --set may then change only train.steps, train.eval_every, train.eval_batches, train.log_every, train.checkpoint_every, train.time_budget_s, sample.tokens (e.g. extend a finished run)."),
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
        # only rank 0 tracks: the others must not even open the MLflow store
        runner = run_training if rank == 0 else _untracked_training
        result, record = runner(cfg, resume=resume, progress=progress, console=console,
                                overrides=set_ if resume else None)
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
    if result.test is not None:
        scores = "  ".join(f"{k} {v:.4f}" for k, v in result.test["test"].items())
        console.print(f"[bold]test[/] at the best validation (step {result.test['best_step']}): "
                      f"{scores}")
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


def _untracked_training(cfg, resume, progress, console, overrides=None):
    """``run_training`` without a tracker (ranks other than 0)."""
    from formerlab.train import train as train_run

    return train_run(cfg, resume=resume, overrides=overrides, progress=progress,
                     console=console), None


def _rank_failure(error: Exception, distributed) -> Exception | str:
    """In a multi-process job, name the rank (and leave the error for the launcher)."""
    if distributed.rank_and_world()[1] == 1:
        return error
    return distributed.record_failure(error)


def generate(
    run_dir: str = typer.Argument(..., help="A run folder made by `formerlab train`."),
    prompt: list[str] = typer.Option(
        None, "--prompt",
        help="Text to continue (default: a newline); repeat for several prompts, generated "
        "as one left-padded batch (each as it would be alone).",
    ),
    tokens: int = typer.Option(200, "--tokens", help="How many tokens to sample (>= 1)."),
    temperature: float = typer.Option(0.8, help="Sampling temperature (> 0)."),
    top_k: int = typer.Option(None, "--top-k", help="Sample among the k likeliest (>= 1)."),
    seed: int = typer.Option(0, help="Sampling seed."),
    cache: bool = typer.Option(True, "--cache/--no-cache", help="Stream through the model's state (--no-cache: recompute the context per token)."),
    progress: bool = typer.Option(True, help="Report progress on stderr for long generations (>= 500 tokens)."),
) -> None:
    """Sample text from a trained language model, streaming it as it is produced; the
    speed (tokens/s) goes to stderr at the end.

    Several ``--prompt`` options are generated together, as one batch of left-padded
    prompts; each sample is printed after a ``=== sample i/n ===`` line once all are done,
    and equals what the prompt alone gives (each row samples with its own generator,
    seeded with ``--seed``)."""
    import itertools
    import time

    import torch

    from formerlab.train import load_run

    prompts = list(prompt) if prompt else ["\n"]
    try:
        if tokens < 1:
            raise ValueError(f"--tokens={tokens} is not allowed; expected an integer >= 1")
        if "" in prompts:
            which = f" (prompt {prompts.index('') + 1})" if len(prompts) > 1 else ""
            raise ValueError(f"--prompt is empty{which}; give at least one character to "
                             "continue (the default prompt is a newline)")
        model, task, _ = load_run(run_dir)
        if task.kind != "decoder":
            raise ValueError(f"run {run_dir!r} is a {task.kind} model for {task.name!r}, not a language model")
        ids, mask = _left_padded([task.encode(text) for text in prompts])
        # one generator per row, each seeded alike: a row samples as its prompt alone does
        generators = [torch.Generator().manual_seed(seed) for _ in prompts]
        stream = model.stream(ids, tokens, temperature, top_k, generators, use_cache=cache,
                              attention_mask=mask)
        start = time.perf_counter()
        first = next(stream)  # argument errors surface here, before any output
    except (FileNotFoundError, ValueError, NotImplementedError) as error:
        raise fail(error) from None
    stream = itertools.chain([first], stream)
    mode = "cached" if cache and model.supports_streaming else "recomputed"
    if len(prompts) == 1:
        seconds = _stream_text(task, stream, prompts[0], tokens, start, progress)
        speed_line(f"{tokens} tokens in {seconds:.2f} s: {tokens / seconds:.1f} tokens/s ({mode})")
        return
    seconds = _batch_text(task, stream, prompts, tokens, start, progress)
    total = tokens * len(prompts)
    speed_line(f"{len(prompts)} × {tokens} tokens in {seconds:.2f} s: {total / seconds:.1f} "
               f"tokens/s ({mode}, batch of {len(prompts)})")


def _left_padded(encoded: list[list[int]]):
    """(ids, mask) of prompts of token ids, left-padded to the longest (padding id 0,
    masked out); the mask is None for a single prompt."""
    import torch

    width = max(len(row) for row in encoded)
    ids = torch.tensor([[0] * (width - len(row)) + row for row in encoded])
    if len(encoded) == 1:
        return ids, None
    lengths = torch.tensor([len(row) for row in encoded])
    return ids, torch.arange(width)[None, :] >= (width - lengths)[:, None]


def _batch_text(task, stream, prompts: list[str], tokens: int, start: float, progress: bool) -> float:
    """Collect a batch's tokens (progress on stderr as in ``_stream_text``), then write each
    prompt and its continuation after a ``=== sample i/n ===`` line. Returns the seconds."""
    import time

    import torch

    out, err = typer.get_text_stream("stdout"), err_console
    every = max(tokens // 10, 1) if progress and tokens >= 500 else 0
    new = []
    for count, nxt in enumerate(stream, start=1):
        new.append(nxt)
        if every and count % every == 0 and count < tokens:
            rate = count / (time.perf_counter() - start)
            err.print(f"[{count}/{tokens} tokens × {len(prompts)}, {rate:.0f} tokens/s per prompt]",
                      highlight=False)
    seconds = time.perf_counter() - start
    rows = torch.cat(new, dim=1).tolist()
    for i, (text, row) in enumerate(zip(prompts, rows), start=1):
        out.write(f"=== sample {i}/{len(prompts)} ===\n{text}{task.decode(row)}\n")
    out.flush()
    return seconds


def _stream_text(task, stream, prompt: str, tokens: int, start: float, progress: bool) -> float:
    """Write the prompt, then each sampled token as it comes; progress on stderr for long
    runs (every 10%, >= 500 tokens). Returns the seconds since ``start``."""
    import time

    out, err = typer.get_text_stream("stdout"), err_console
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


def speed_line(text: str) -> None:
    """The speed line on a line of its own: the text before it (same terminal, stdout) may
    end without a newline, and a terminal shows both streams on one screen."""
    out = typer.get_text_stream("stdout")
    out.flush()
    err = typer.get_text_stream("stderr")
    err.write("\n" + text + "\n")
    err.flush()


