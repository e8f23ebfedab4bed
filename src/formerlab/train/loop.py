"""The training loop: read it top to bottom.

``train(cfg)`` builds the task and model, then repeats: draw a batch (with
``train.packing``, its examples packed into one row: ``formerlab.data.packing``), forward, loss
(+ any auxiliary losses the model registers), backward, clip, AdamW step with warm-up +
cosine learning rate, then each submodule's ``on_optimizer_step(step)`` hook (e.g.
performer's feature redraws); every ``eval_every`` steps it evaluates and writes a
checkpoint.
Everything random draws from seeded generators whose states are checkpointed, so a run
resumed with ``resume=RUN_DIR`` reproduces the uninterrupted run's losses exactly (CPU).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import nn

from formerlab.data import Task
from formerlab.data.packing import pack_batch, real_tokens
from formerlab.train import best as best_eval
from formerlab.train import distributed
from formerlab.train.build import build_model, build_task, check_packing
from formerlab.train.checkpoint import (
    TrainerState,
    checkpoint_folder,
    load_trainer_state,
    load_weights,
    save_checkpoint,
)
from formerlab.train.compile import compile_model
from formerlab.train.config import RunConfig, config_hash
from formerlab.train.evaluate import autocast, model_logits, task_loss
from formerlab.train.memory import WorkMemory
from formerlab.train.resume import flatten, resume_config
from formerlab.train.schedule import beta1, learning_rate
from formerlab.train.tracker import Tracker


class TrainingError(RuntimeError):
    """A run that cannot go on (non-finite loss, time budget exceeded)."""


@dataclass
class TrainResult:
    """What a finished (or stopped) run leaves behind."""

    run_dir: Path
    step: int
    metrics: dict[str, float]
    history: list[dict[str, Any]]
    evals: list[dict[str, Any]] = field(default_factory=list)
    sample: str | None = None
    parameters: int = 0
    tokens_per_s: float = 0.0
    #: peak memory of the run's work (model, optimizer, activations) above what the process
    #: held before the model was built, MiB: allocator peak on CUDA, resident-set peak on CPU
    peak_memory_mb: float = 0.0
    diagnostics: dict[str, float] = field(default_factory=dict)
    #: ``train.test_at_best``: ``{"best_step", "val", "test"}`` (also ``RUN_DIR/test.json``)
    test: dict[str, Any] | None = None


def make_optimizer(model: nn.Module, cfg: RunConfig) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices only (not on norms, biases or embeddings' positions)."""
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "positions" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "positions" not in n)]
    groups = [
        {"params": decay, "weight_decay": cfg.train.weight_decay},
        {"params": rest, "weight_decay": 0.0},
    ]
    t = cfg.train
    return torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps)


def model_diagnostics(model: nn.Module) -> dict[str, float]:
    """Average of every submodule's ``diagnostics()`` (pinv/solver iterations, ...)."""
    sums: dict[str, list[float]] = {}
    for module in model.modules():
        report = getattr(module, "diagnostics", None)
        if module is not model and callable(report):
            for key, value in (report() or {}).items():
                sums.setdefault(key, []).append(float(value))
    return {key: sum(values) / len(values) for key, values in sums.items()}


def on_optimizer_step(model: nn.Module, step: int) -> None:
    """Call ``on_optimizer_step(step)`` on every submodule that defines it, after optimiser
    step ``step`` (1, 2, ...): the one point between steps where modules may change state
    that a forward only reads (e.g. ``performer`` redraws its random features here, so all
    calls of one forward, a DEQ solve and its implicit backward included, see one draw)."""
    for module in model.modules():
        hook = getattr(module, "on_optimizer_step", None)
        if callable(hook):
            hook(step)


def auxiliary_loss(model: nn.Module) -> torch.Tensor | None:
    """Sum of the ``aux_loss`` tensors submodules set during the forward (e.g. Jacobian reg.)."""
    losses = [
        m.aux_loss for m in model.modules() if isinstance(getattr(m, "aux_loss", None), torch.Tensor)
    ]
    return torch.stack([loss.float() for loss in losses]).sum() if losses else None


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during training: the checkpoint at ``step`` is saved in ``run_dir``."""

    def __init__(self, run_dir: Path, step: int) -> None:
        super().__init__(f"interrupted at step {step}; checkpoint saved in {run_dir}")
        self.run_dir, self.step = Path(run_dir), step


def new_run_dir(cfg: RunConfig) -> Path:
    """Create and return ``runs_dir/<name>-<time>-<hash>`` (``-1``, ``-2``, ... on a collision).

    ``mkdir`` without ``exist_ok`` is atomic: of processes racing for one name exactly one
    creates it, the others move on to the next suffix, so two runs never share a folder.
    """
    return unique_run_dir(cfg.runs_dir, cfg.name, config_hash(cfg))


def unique_run_dir(runs_dir: str | Path, name: str, digest: str) -> Path:
    """Create and return ``runs_dir/<name>-<time>-<digest[:6]>`` (``-1``, ``-2``, ... on a
    collision; see :func:`new_run_dir`)."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path(runs_dir) / f"{name}-{stamp}-{digest[:6]}"
    base.parent.mkdir(parents=True, exist_ok=True)
    for n in range(10_000):
        run_dir = base if n == 0 else Path(f"{base}-{n}")
        try:
            run_dir.mkdir()
        except FileExistsError:
            continue
        return run_dir
    raise TrainingError(f"could not create a new run folder next to {base} (10000 taken)")


def generate_sample(model: nn.Module, task: Task, cfg: RunConfig) -> str | None:
    """Sample text from a language model whose task has a text vocabulary."""
    if task.kind != "decoder" or cfg.sample.tokens == 0:
        return None
    try:
        prompt = task.encode(cfg.sample.prompt)
    except NotImplementedError:
        return None
    device = cfg.train.device
    ids = torch.tensor([prompt or [0]], device=device)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    was_training = model.training
    model.eval()
    out = model.generate(
        ids, cfg.sample.tokens, cfg.sample.temperature, cfg.sample.top_k, generator=generator
    )
    model.train(was_training)
    return task.decode(out[0].tolist())


def train(
    cfg: RunConfig | None = None,
    run_dir: str | Path | None = None,
    resume: str | Path | None = None,
    tracker: Tracker | None = None,
    stop_after: int | None = None,
    progress: bool = True,
    console: Console | None = None,
    overrides: list[str] | None = None,
) -> TrainResult:
    """Train ``cfg`` (or continue the run in ``resume``) and return a ``TrainResult``.

    ``stop_after`` stops after that many total steps with a checkpoint, as if interrupted
    (used to test resumption). ``tracker`` receives params, metrics and artifacts.
    ``overrides`` (``["train.steps=2000"]``, with ``resume`` only) change the keys of the
    stored config that a resumed run may change (``RESUMABLE_KEYS``), e.g. to extend a
    finished run; ``resume`` refuses a ``RUN_DIR/config.yaml`` edited to differ from the
    checkpoint's config (see ``formerlab.train.resume``).
    Each evaluation is printed on ``console`` as it happens (``eval step S/T: val loss
    ...``), with or without the progress bar.
    """
    console = console or Console()
    tracker = tracker or Tracker()
    if resume is not None:
        cfg = resume_config(resume, overrides)
        run_dir = Path(resume)
    elif overrides:
        raise ValueError("train(overrides=...) changes a resumed run (resume=RUN_DIR); "
                         "for a new run apply them to the config (load_config(path, overrides))")
    elif cfg is None:
        raise ValueError("train() needs a config (cfg=...) or a run to resume (resume=RUN_DIR)")
    # one process, or this rank of a torchrun job (train/distributed.py): rank 0 writes
    ddp = distributed.setup(cfg.train.device)
    if not ddp.is_main:
        tracker, progress = Tracker(), False
    t = cfg.train
    ddp.check(t.batch_size)
    if t.threads:
        torch.set_num_threads(t.threads)

    # --- task, model, optimizer (seeded), or their state from the checkpoint -------------
    # built before the run folder exists: a config error (a kernel that cannot run causally
    # in a decoder, a missing dataset) must not leave an empty folder in runs_dir
    torch.manual_seed(cfg.seed)
    task = build_task(cfg)
    if t.test_at_best:
        best_eval.check_test_split(task)
    memory = WorkMemory(t.device)  # the work's memory: from here (model, optimizer, steps)
    model = ddp.prepare(build_model(cfg, task).to(t.device))
    check_packing(cfg, task, model)
    optimizer = make_optimizer(model, cfg)
    run_dir = ddp.from_main(lambda: Path(run_dir) if run_dir is not None else new_run_dir(cfg))
    data_rng = torch.Generator().manual_seed(cfg.seed + 1)
    step, history, evals = 0, [], []
    if resume is not None:
        state = load_trainer_state(run_dir, model, optimizer)
        step, history = state.step, state.history
        evals = [h for h in history if "eval" in h]
        history = [h for h in history if "eval" not in h]
        torch.set_rng_state(state.torch_rng)
        data_rng.set_state(state.data_rng)
        if step > t.steps:
            raise ValueError(
                f"train.steps={t.steps} is below the step the run in {str(run_dir)!r} reached "
                f"({step}); to extend it, set train.steps above {step}"
            )
    net = compile_model(ddp.wrap(model), t.device) if t.compile else ddp.wrap(model)
    if ddp.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    best = best_eval.read_best(run_dir) if resume is not None else None
    parameters = sum(p.numel() for p in model.parameters())
    params = {**flatten(cfg.model_dump(mode="json")), "parameters": parameters}
    tracker.start(cfg.name, run_dir, params)

    def checkpoint() -> None:
        if ddp.is_main:
            save_checkpoint(
                run_dir, cfg, model, optimizer,
                TrainerState(step, history + evals, torch.get_rng_state(), data_rng.get_state()),
            )

    # --- the loop ------------------------------------------------------------------------
    model.train()
    started, tokens = time.perf_counter(), 0
    # wall-clock seconds of the run so far, across resumes (each eval records it)
    earlier = evals[-1].get("elapsed_s", 0.0) if evals else 0.0
    last = stop_after if stop_after is not None else t.steps
    status = "FAILED"
    bar = Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"), TimeRemainingColumn(),
        console=console, disable=not progress, transient=False,
    )
    if ddp.is_main:  # last before the loop: from here on Ctrl-C checkpoints and says so
        (run_dir / "config.yaml").write_text(_yaml(cfg))
    try:
        with bar:
            job = bar.add_task(cfg.name, total=t.steps, completed=step, info="")
            while step < min(last, t.steps):
                lr = learning_rate(step, t)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                    group["betas"] = (beta1(step, t), t.beta2)
                with torch.device("cpu"):  # the task's draws, like its data, on the CPU
                    batch = task.batch("train", t.batch_size, data_rng)
                part, weight = ddp.shard(batch, task)  # this rank's rows (all of them alone)
                if t.packing:  # the same examples end to end in one row, no padding
                    part = pack_batch(part, task.kind)
                part = part.to(t.device)
                with autocast(t.device, t.bf16):
                    logits = model_logits(net, part)
                loss = task_loss(logits, part, task) * weight
                extra = auxiliary_loss(model)
                total = loss if extra is None else loss + extra
                checked = ddp.mean(total)  # the global loss: every rank stops together
                if not torch.isfinite(checked):
                    raise TrainingError(
                        f"loss became {checked.item()} at step {step}; stopping. The last good "
                        f"checkpoint is {_last_checkpoint(run_dir)}"
                    )
                optimizer.zero_grad(set_to_none=True)
                total.backward()
                if t.grad_clip is not None:
                    nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
                optimizer.step()
                step += 1
                on_optimizer_step(model, step)  # e.g. performer's feature redraws
                tokens += real_tokens(batch) if t.packing else batch.inputs.numel()
                history.append({"step": step, "loss": ddp.mean(loss).item(), "lr": lr})

                elapsed = time.perf_counter() - started
                if step % t.log_every == 0 or step == t.steps:
                    recent = [h["loss"] for h in history[-t.log_every :]]
                    metrics = {"train/loss": sum(recent) / len(recent), "train/lr": lr,
                               "train/tokens_per_s": tokens / elapsed}
                    metrics.update({f"diag/{k}": v for k, v in model_diagnostics(model).items()})
                    if extra is not None:
                        metrics["train/aux_loss"] = extra.item()
                    metrics = ddp.mean_metrics(metrics)
                    tracker.log_metrics(metrics, step)
                    bar.update(job, completed=step, info=(
                        f"loss {metrics['train/loss']:.3f}  lr {lr:.2e}  "
                        f"{metrics['train/tokens_per_s']:,.0f} tok/s"))
                if step % t.eval_every == 0 or step == t.steps:
                    scores = ddp.evaluate(model, task, "val", t.batch_size, t.eval_batches,
                                          t.device, t.bf16, t.packing)
                    evals.append({"step": step, "eval": scores,
                                  "elapsed_s": earlier + time.perf_counter() - started})
                    tracker.log_metrics({f"val/{k}": v for k, v in scores.items()}, step)
                    if ddp.is_main:  # as it happens, with or without the progress bar
                        bar.console.print(format_eval(step, t.steps, scores), highlight=False,
                                          markup=False, soft_wrap=True)
                    if t.test_at_best and best_eval.improves(task, scores, best):
                        best = {"step": step, "val": scores}  # every rank: scores are global
                        if ddp.is_main:
                            best_eval.save_best(run_dir, model, step, scores)
                if (t.checkpoint_every and step % t.checkpoint_every == 0) or step % t.eval_every == 0:
                    checkpoint()
                if t.time_budget_s is not None and ddp.any(elapsed > t.time_budget_s):
                    raise TrainingError(
                        f"time budget train.time_budget_s={t.time_budget_s} exceeded at step {step}"
                    )
            checkpoint()
        status = "FINISHED" if step >= t.steps else "KILLED"
    except KeyboardInterrupt:
        status = "KILLED"
        checkpoint()
        raise TrainingInterrupted(run_dir, step) from None
    finally:
        tracker.finish(status) if status != "FINISHED" else None

    # --- wrap up: final metrics, a sample, artifacts ---------------------------------------
    elapsed = max(time.perf_counter() - started, 1e-9)
    metrics = evals[-1]["eval"] if evals else {}
    sample = generate_sample(model, task, cfg) if step >= t.steps and ddp.is_main else None
    test = None
    if t.test_at_best and status == "FINISHED" and best is not None:
        test = score_test_at_best(model, task, cfg, run_dir, best, ddp)
        tracker.log_metrics({f"test/{k}": v for k, v in test["test"].items()}, step)
    if sample is not None:
        (run_dir / "sample.txt").write_text(sample)
        tracker.log_artifact(run_dir / "sample.txt")
    tracker.log_artifact(run_dir / "config.yaml")
    result = TrainResult(
        run_dir=run_dir, step=step, metrics=metrics, history=history, evals=evals,
        sample=sample, parameters=parameters, tokens_per_s=tokens / elapsed, test=test,
        peak_memory_mb=memory.peak_mb(), diagnostics=model_diagnostics(model),
    )
    if status == "FINISHED":
        tracker.log_metrics({"run/tokens_per_s": result.tokens_per_s,
                             "run/work_memory_mb": result.peak_memory_mb}, step)
        tracker.finish(status)
    return result


def score_test_at_best(
    model: nn.Module, task: Task, cfg: RunConfig, run_dir: Path, best: dict[str, Any], ddp: Any
) -> dict[str, Any]:
    """Load the best evaluation's weights into ``model`` and score the test split once
    (``train.eval_batches`` batches, as validation); write ``RUN_DIR/test.json``."""
    t = cfg.train
    load_weights(model, best_eval.best_weights(run_dir), cfg, device=t.device)
    scores = ddp.evaluate(model, task, "test", t.batch_size, t.eval_batches, t.device, t.bf16,
                          t.packing)
    return best_eval.write_test(run_dir, best, scores)


def format_eval(step: int, steps: int, scores: dict[str, float]) -> str:
    """One evaluation as printed during training: ``eval step 200/1000: val loss 1.8421
    accuracy 0.4170`` (the loss first, then the task's metrics)."""
    ordered = sorted(scores.items(), key=lambda item: item[0] != "loss")
    shown = "  ".join(f"{k} {v:.4f}" for k, v in ordered)
    return f"eval step {step}/{steps}: val {shown}"


def _last_checkpoint(run_dir: Path) -> str:
    try:
        return str(checkpoint_folder(run_dir))
    except FileNotFoundError:
        return "none (no checkpoint was written before the failure)"


def _yaml(cfg: RunConfig) -> str:
    import yaml

    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
