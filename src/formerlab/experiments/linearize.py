"""Linearize a trained causal LM: swap a linear-family attention into chosen layers, teach
it to imitate the original attention (attention transfer), then fine-tune on next tokens.

``linearize(cfg)`` (the ``formerlab linearize CONFIG`` command) runs, on the HF causal LM
in the folder ``cfg.model``:

1. the validation loss of the original model and of the plain swap
   (:func:`formerlab.integrations.linearize.apply_mechanism`);
2. attention transfer (``cfg.transfer``): every weight of the model frozen, only the new
   mechanism's parameters (Hedgehog feature maps, gates) train so that each swapped layer's
   output matches its original softmax attention's on the task's text (MSE, optionally
   the cross-entropy of the attention matrices; Zhang et al., 2024, "The Hedgehog & the
   Porcupine"), the original attention feeding the next layer meanwhile;
3. fine-tuning (``cfg.finetune``) on next-token loss: the whole model, or LoRA adapters
   (``peft``) plus the mechanism's parameters.

Checkpoints are ``formerlab train``'s (``RUN_DIR/checkpoint``: safetensors + state.json,
written crash-safely), ``resume=RUN_DIR`` continues exactly, MLflow tracks as for
``formerlab train``. The result is an HF folder (``RUN_DIR/model``) that
:func:`~formerlab.integrations.linearize.load_linearized` reloads with the swap applied,
and ``RUN_DIR/results.json``: the four losses and the share of the swap's loss gap each
stage closed, (swap − after) / (swap − original).

:func:`train_base` trains the base model for such a study with ``formerlab train``'s loop
(a random-init Llama-shaped HF model) and exports it as an HF folder.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from pydantic import Field, ValidationError, field_validator, model_validator
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from safetensors.torch import load_file, load_model
from torch import Tensor, nn

from formerlab import attention, data
from formerlab.experiments.run import run_training
from formerlab.experiments.tracking import MLflowTracker, default_tracking_uri
from formerlab.integrations.hf_model import load_local
from formerlab.integrations.linearize import (
    HEDGEHOG,
    apply_mechanism,
    attention_transfer,
    check_mechanism,
    mechanism_parameters,
    save_linearized,
)
from formerlab.train import RunConfig, Tracker, TrainResult, load_run
from formerlab.train.checkpoint import (
    TrainerState,
    checkpoint_folder,
    read_state,
    recover_checkpoint,
    save_checkpoint,
)
from formerlab.train.config import (
    ConfigError,
    StrictModel,
    TaskConfig,
    TrackingConfig,
    TrainConfig,
    apply_override,
    format_validation_error,
    read_yaml_file,
)
from formerlab.train.evaluate import evaluate, task_loss
from formerlab.train.loop import TrainingInterrupted, unique_run_dir
from formerlab.train.resume import flatten
from formerlab.train.schedule import learning_rate

# --------------------------------------------------------------------------- the base model


def init_llama(folder: str | Path, llama: dict[str, Any], seed: int = 0) -> Path:
    """Save a randomly initialised Llama-shaped causal LM (``transformers.LlamaConfig(**llama)``,
    seeded) as an HF folder; returns the folder."""
    import transformers

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(**llama))
    model.save_pretrained(str(folder))
    return Path(folder)


def train_base(
    cfg: RunConfig,
    llama: dict[str, Any],
    out: str | Path,
    resume: str | Path | None = None,
    progress: bool = True,
    console: Console | None = None,
) -> tuple[TrainResult, Path]:
    """Train the base model for linearization with ``formerlab train``'s loop and save it as
    an HF folder in ``out``.

    ``cfg``: a run config whose ``model.hf.path`` names the folder of the random init
    (created from ``llama``, seeded with ``cfg.seed``, when it has no ``config.json``) and
    whose ``model.hf.kernel`` is ``softmax`` (the original attention). Checkpoints, resume
    (``resume=RUN_DIR``; ``cfg`` is then read from the run) and MLflow are the trainer's.
    """
    if resume is None:
        if cfg.model.hf is None or cfg.model.hf.kernel != "softmax":
            raise ValueError(
                "the base model's config needs model.hf = {path: <init folder>, kernel: softmax}; "
                f"got model.hf={cfg.model.hf!r}"
            )
        if not (Path(cfg.model.hf.path) / "config.json").is_file():
            init_llama(cfg.model.hf.path, llama, cfg.seed)
    result, _ = run_training(cfg, resume=resume, progress=progress, console=console)
    export_hf(result.run_dir, out)
    return result, Path(out)


def export_hf(run_dir: str | Path, out: str | Path) -> Path:
    """The model of a ``formerlab train`` run with ``model.hf`` saved as a plain HF folder
    (original attention; loads with ``AutoModelForCausalLM.from_pretrained``)."""
    model, _, _ = load_run(run_dir)
    if not hasattr(model, "save_pretrained"):
        raise ValueError(f"run {str(run_dir)!r} did not train an HF model (model.hf is unset)")
    return model.save_pretrained(out)


# --------------------------------------------------------------------------- the config


class StageConfig(StrictModel):
    """One training stage: AdamW with warm-up and cosine decay (``formerlab.train.schedule``)."""

    steps: int = Field(200, ge=0)
    batch_size: int = Field(16, ge=1)
    lr: float = Field(1e-3, gt=0)
    min_lr: float = Field(1e-4, ge=0)
    warmup: int = Field(20, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float | None = Field(1.0, gt=0)

    def schedule(self) -> TrainConfig:
        """The :class:`~formerlab.train.config.TrainConfig` whose schedule this stage uses."""
        steps = max(self.steps, 1)
        return TrainConfig(
            steps=steps,
            lr=self.lr,
            min_lr=self.min_lr,
            warmup=min(self.warmup, steps - 1),
            batch_size=self.batch_size,
        )


class TransferConfig(StageConfig):
    """Attention transfer: only the new mechanism's parameters train, to imitate each
    layer's original attention (``mse`` × output MSE + ``attention_ce`` × cross-entropy of
    the attention matrices)."""

    lr: float = Field(1e-2, gt=0)
    min_lr: float = Field(1e-3, ge=0)
    mse: float = Field(1.0, ge=0)
    attention_ce: float = Field(0.0, ge=0)


class LoraConfig(StrictModel):
    """Low-rank adapters (``peft``, the ``[peft]`` extra) on these linear layers."""

    r: int = Field(8, ge=1)
    alpha: float = Field(16.0, gt=0)
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"]
    )


class FinetuneConfig(StageConfig):
    """Next-token fine-tuning of the whole model (``lora: null``) or of LoRA adapters; the
    mechanism's own parameters train in both."""

    lora: LoraConfig | None = None


class MechanismConfig(StrictModel):
    """What replaces softmax attention: ``kernel`` = ``hedgehog`` or a causal registry
    kernel (``linear``, ...), its ``options``, and the ``layers`` (default all)."""

    kernel: str = "hedgehog"
    options: dict[str, Any] = Field(default_factory=dict)
    layers: list[int] | None = None

    @model_validator(mode="after")
    def _known(self) -> MechanismConfig:
        check_mechanism(self.kernel, self.options)
        return self


class LinearizeConfig(StrictModel):
    """A linearization run of the HF causal LM in the folder ``model``."""

    name: str = "linearize"
    seed: int = 0
    runs_dir: str = "runs/linearize"
    model: str
    task: TaskConfig = Field(default_factory=TaskConfig)
    mechanism: MechanismConfig = Field(default_factory=MechanismConfig)
    transfer: TransferConfig = Field(default_factory=TransferConfig)
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    eval_every: int = Field(100, ge=1)
    eval_batches: int = Field(20, ge=1)
    eval_batch_size: int = Field(32, ge=1)
    log_every: int = Field(10, ge=1)
    threads: int | None = Field(None, ge=1)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @field_validator("tracking", mode="before")
    @classmethod
    def _tracking_shorthand(cls, value: Any) -> Any:
        return {"backend": value} if isinstance(value, str) else value


def load_linearize_config(
    path: str | Path | None, overrides: list[str] | None = None
) -> LinearizeConfig:
    """Read a linearize YAML config, apply ``key=value`` overrides, validate
    (``ConfigError`` naming the key, the value and what is allowed)."""
    raw: dict[str, Any] = {}
    if path is not None:
        raw = read_yaml_file(path, "config")
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: a config must be a mapping of keys")
    for assignment in overrides or []:
        apply_override(raw, assignment)
    try:
        return LinearizeConfig.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(format_validation_error(error)) from None


# --------------------------------------------------------------------------- the run


class CausalLM(nn.Module):
    """An HF causal LM behind formerlab's model interface: ``forward(ids, attention_mask)
    -> logits`` (what ``formerlab.train.evaluate`` calls)."""

    def __init__(self, hf: nn.Module) -> None:
        super().__init__()
        self.hf = hf

    def forward(self, ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        mask = None if attention_mask is None else attention_mask.long()
        return self.hf(input_ids=ids, attention_mask=mask, use_cache=False).logits


@dataclass
class LinearizeResult:
    """Validation losses of the original model, the plain swap, after attention transfer and
    after fine-tuning (None for a stage of 0 steps); the share of the swap's loss gap each stage closed
    ((swap − after) / (swap − original)); the steps of each stage; where it is all saved."""

    run_dir: Path
    model_dir: Path | None
    losses: dict[str, float]
    gap_closed: dict[str, float | None]
    steps: dict[str, int]
    history: list[dict[str, Any]]
    evals: list[dict[str, Any]]

    def as_dict(self) -> dict[str, Any]:
        return {
            "run_dir": str(self.run_dir),
            "model_dir": str(self.model_dir),
            "losses": self.losses,
            "gap_closed": self.gap_closed,
            "steps": self.steps,
            "evals": self.evals,
            "history": self.history,
        }


def gap_closed(original: float, swap: float, after: float) -> float | None:
    """(swap − after) / (swap − original); None where the swap lost nothing."""
    gap = swap - original
    return None if abs(gap) < 1e-12 else (swap - after) / gap


class _Run:
    """The state of one linearization run (model, stage, optimizer, RNGs, records)."""

    def __init__(self, cfg: LinearizeConfig, task, tracker: Tracker, console: Console) -> None:
        self.cfg, self.task, self.tracker, self.console = cfg, task, tracker, console
        self.hf = load_local(cfg.model, "decoder")
        self.net: nn.Module = self.hf  # the peft wrapper during LoRA fine-tuning
        self.data_rng = torch.Generator().manual_seed(cfg.seed + 1)
        self.step = 0
        self.history: list[dict[str, Any]] = []
        self.evals: list[dict[str, Any]] = []
        self.optimizer: torch.optim.Optimizer | None = None
        self.stage = ""
        # wall-clock seconds of the run so far, across resumes (each evaluation records it)
        self.started, self.earlier = time.perf_counter(), 0.0

    # --- pieces --------------------------------------------------------------------------

    @property
    def transfer_steps(self) -> int:
        return self.cfg.transfer.steps if self.trainable_mechanism else 0

    @property
    def total_steps(self) -> int:
        return self.transfer_steps + self.cfg.finetune.steps

    def evaluate(self, label: str) -> float:
        c = self.cfg
        scores = evaluate(CausalLM(self.hf), self.task, "val", c.eval_batch_size, c.eval_batches)
        elapsed = self.earlier + time.perf_counter() - self.started
        self.evals.append({"step": self.step, "label": label, "eval": scores, "elapsed_s": elapsed})
        self.tracker.log_metrics({f"val/{k}": v for k, v in scores.items()}, self.step)
        self.console.print(
            f"eval {label:<9} step {self.step}/{self.total_steps}: val loss {scores['loss']:.4f}",
            highlight=False,
            markup=False,
        )
        return scores["loss"]

    def enter_transfer(self) -> None:
        self.stage = "transfer"
        params = mechanism_parameters(self.hf)
        for p in self.hf.parameters():
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        s = self.cfg.transfer
        self.optimizer = torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay)

    def enter_finetune(self) -> None:
        self.stage = "finetune"
        s = self.cfg.finetune
        if s.lora is None:
            for p in self.hf.parameters():
                p.requires_grad_(True)
            self.net = self.hf
        else:
            self.net = with_lora(self.hf, s.lora)
        params = [p for p in self.net.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay)

    @property
    def trainable_mechanism(self) -> bool:
        """Whether the mechanism has parameters of its own (then it gets attention transfer)."""
        m = self.cfg.mechanism
        if m.kernel == HEDGEHOG:
            return True
        return any(True for _ in attention.build(m.kernel, **m.options).parameters())

    def stage_config(self) -> StageConfig:
        return self.cfg.transfer if self.stage == "transfer" else self.cfg.finetune

    def train_step(self) -> float:
        s = self.stage_config()
        local = self.step - (self.transfer_steps if self.stage == "finetune" else 0)
        lr = learning_rate(local, s.schedule())
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        batch = self.task.batch("train", s.batch_size, self.data_rng)
        if self.stage == "transfer":
            t = self.cfg.transfer
            with attention_transfer(self.hf, t.attention_ce, t.mse) as losses:
                self.hf(input_ids=batch.inputs, use_cache=False)
                loss = losses.total()
            extra = {"transfer/output_mse": sum(losses.output_mse()) / len(losses.output_mse())}
        else:
            logits = self.net(input_ids=batch.inputs, use_cache=False).logits
            loss = task_loss(logits, batch, self.task)
            extra = {}
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        if s.grad_clip is not None:
            nn.utils.clip_grad_norm_(params, s.grad_clip)
        self.optimizer.step()
        self.step += 1
        self.history.append(
            {"step": self.step, "stage": self.stage, "loss": loss.item(), "lr": lr, **extra}
        )
        return loss.item()

    # --- checkpoints ---------------------------------------------------------------------

    def save(self, run_dir: Path) -> None:
        state = TrainerState(
            self.step, self.history + self.evals, torch.get_rng_state(), self.data_rng.get_state()
        )
        save_checkpoint(run_dir, self.cfg, self.net, self.optimizer, state)

    def restore(self, run_dir: Path) -> None:
        """Continue from the checkpoint of ``run_dir``: its stage, weights, optimizer, RNGs."""
        recover_checkpoint(run_dir)
        folder = checkpoint_folder(run_dir)
        meta = read_state(folder)
        self.step = meta["step"]
        self.evals = [h for h in meta["history"] if "eval" in h]
        self.history = [h for h in meta["history"] if "eval" not in h]
        self.earlier = self.evals[-1].get("elapsed_s", 0.0) if self.evals else 0.0
        boundary = (
            self.step == self.transfer_steps
            and self.history[-1:]
            and self.history[-1].get("stage") == "transfer"
        )
        if self.step < self.transfer_steps or boundary:
            self.enter_transfer()
        else:
            self.enter_finetune()
        load_model(self.net, str(folder / "model.safetensors"))
        load_optimizer(self.optimizer, folder, meta)
        tensors = load_file(str(folder / "trainer.safetensors"))
        torch.set_rng_state(tensors["rng.torch"])
        self.data_rng.set_state(tensors["rng.data"])


def with_lora(model: nn.Module, lora: LoraConfig) -> nn.Module:
    """``model`` with ``peft`` LoRA adapters on ``lora.target_modules``; the adapters and
    the swapped mechanism's parameters train, everything else is frozen."""
    try:
        import peft
    except ImportError as error:
        raise ImportError(
            "fine-tuning with LoRA (finetune.lora) needs the peft package: "
            "pip install formerlab[peft]"
        ) from error
    config = peft.LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=0.0,
        target_modules=list(lora.target_modules),
        bias="none",
    )
    wrapped = peft.get_peft_model(model, config)
    for p in mechanism_parameters(model):
        p.requires_grad_(True)
    return wrapped


def load_optimizer(optimizer: torch.optim.Optimizer, folder: Path, meta: dict[str, Any]) -> None:
    """Load the optimizer state that ``save_checkpoint`` split into ``trainer.safetensors``
    (tensors) and ``state.json`` (the rest)."""
    tensors = load_file(str(folder / "trainer.safetensors"))
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, index, key = name.split(".", 2)
            state.setdefault(int(index), {})[key] = value
    for index, slots in meta["optimizer"]["plain_state"].items():
        state.setdefault(int(index), {}).update(slots)
    optimizer.load_state_dict({"state": state, "param_groups": meta["optimizer"]["param_groups"]})


def _new_run_dir(cfg: LinearizeConfig) -> Path:
    digest = hashlib.sha256(json.dumps(cfg.model_dump(mode="json"), sort_keys=True).encode())
    return unique_run_dir(cfg.runs_dir, cfg.name, digest.hexdigest())


def make_linearize_tracker(cfg: LinearizeConfig) -> Tracker:
    """MLflow (``cfg.tracking``) as for ``formerlab train``, or a tracker that records nothing."""
    if cfg.tracking.backend == "none":
        return Tracker()
    import os

    uri = (
        cfg.tracking.uri
        or os.environ.get("MLFLOW_TRACKING_URI")
        or default_tracking_uri(cfg.runs_dir)
    )
    Path(cfg.runs_dir).mkdir(parents=True, exist_ok=True)
    return MLflowTracker(
        uri, cfg.tracking.experiment, artifact_root=Path(cfg.runs_dir) / "mlartifacts"
    )


def linearize(
    cfg: LinearizeConfig | None = None,
    resume: str | Path | None = None,
    run_dir: str | Path | None = None,
    stop_after: int | None = None,
    progress: bool = True,
    console: Console | None = None,
    tracker: Tracker | None = None,
) -> LinearizeResult:
    """Linearize ``cfg.model`` (or continue the run in ``resume``): swap the mechanism in,
    attention transfer, fine-tuning; evaluations of the original, the swap and each stage.

    Writes ``RUN_DIR/checkpoint`` (``formerlab train``'s format; ``resume=RUN_DIR``
    continues exactly), ``RUN_DIR/results.json`` and, at the end, the linearized model as
    an HF folder ``RUN_DIR/model`` (:func:`~formerlab.integrations.linearize.load_linearized`).
    ``stop_after``: stop with a checkpoint after that many steps, as if interrupted.
    """
    console = console or Console()
    if resume is not None:
        folder = checkpoint_folder(resume)
        cfg = LinearizeConfig.model_validate(read_state(folder)["config"])
        run_dir = Path(resume)
    elif cfg is None:
        raise ValueError("linearize() needs a config (cfg=...) or a run to resume (resume=RUN_DIR)")
    tracker = tracker or make_linearize_tracker(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    with torch.device("cpu"):
        task = data.build(cfg.task.name, **cfg.task.options)
    if task.kind != "decoder":
        raise ValueError(
            f"task {cfg.task.name!r} is a {task.kind} task; linearize needs a "
            "language-model (decoder) task"
        )
    run = _Run(cfg, task, tracker, console)
    run_dir = Path(run_dir) if run_dir is not None else _new_run_dir(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(
        yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
    )
    tracker.start(cfg.name, run_dir, flatten(cfg.model_dump(mode="json")))
    if resume is None:
        run.evaluate("original")
    m = cfg.mechanism
    apply_mechanism(run.hf, m.kernel, m.options, m.layers)
    if resume is None:
        run.evaluate("swap")
        if not run.trainable_mechanism:
            console.print(
                f"{m.kernel!r} has no parameters of its own: no attention transfer", highlight=False
            )
        if run.transfer_steps:
            run.enter_transfer()
        else:
            run.enter_finetune()
    else:
        run.restore(run_dir)
    status = "FAILED"
    last = run.total_steps if stop_after is None else min(stop_after, run.total_steps)
    try:
        _loop(run, run_dir, last, progress)
        status = "FINISHED" if run.step >= run.total_steps else "KILLED"
    finally:
        if status != "FINISHED":
            tracker.finish(status)
    model_dir = None
    if status == "FINISHED":
        model_dir = save_linearized(run.net, run_dir / "model")
        run.net = run.hf
    result = _result(run, run_dir, model_dir)
    (run_dir / "results.json").write_text(json.dumps(result.as_dict(), indent=1))
    if status == "FINISHED":
        for key, value in result.gap_closed.items():
            if value is not None:
                tracker.log_metrics({f"gap_closed/{key}": value}, run.step)
        tracker.log_artifact(run_dir / "results.json")
        tracker.finish(status)
    return result


def _loop(run: _Run, run_dir: Path, last: int, progress: bool) -> None:
    bar = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeRemainingColumn(),
        console=run.console,
        disable=not progress,
        transient=False,
    )
    try:
        with bar:
            _steps(run, run_dir, last, bar)
    except KeyboardInterrupt:
        if run.optimizer is not None:
            run.save(run_dir)
        raise TrainingInterrupted(run_dir, run.step) from None


def _steps(run: _Run, run_dir: Path, last: int, bar: Progress) -> None:
    """Train up to step ``last``: evaluations and checkpoints every ``eval_every`` steps,
    an evaluation and a checkpoint at the end of the transfer stage and of the run."""
    cfg = run.cfg
    job = bar.add_task(cfg.name, total=run.total_steps, completed=run.step, info="")
    while run.step < last:
        if run.stage == "transfer" and run.step == run.transfer_steps:
            run.evaluate("transfer")
            run.save(run_dir)
            run.enter_finetune()
            continue
        run.train_step()
        if run.step % cfg.log_every == 0:
            recent = [h["loss"] for h in run.history[-cfg.log_every :]]
            mean = sum(recent) / len(recent)
            run.tracker.log_metrics({f"{run.stage}/loss": mean}, run.step)
            bar.update(job, completed=run.step, info=f"{run.stage} loss {mean:.4f}")
        boundary = run.stage == "transfer" and run.step == run.transfer_steps
        if run.step % cfg.eval_every == 0 and not boundary and run.step != run.total_steps:
            run.evaluate(run.stage)
            run.save(run_dir)
    if run.step == run.total_steps and run.step > 0:
        label = "finetune" if run.stage == "finetune" else "transfer"
        if not any(e["label"] == label and e["step"] == run.step for e in run.evals):
            run.evaluate(label)
    if run.optimizer is not None:
        run.save(run_dir)


def _final(evals: list[dict[str, Any]], label: str) -> float | None:
    found = [e["eval"]["loss"] for e in evals if e["label"] == label]
    return found[-1] if found else None


def _result(run: _Run, run_dir: Path, model_dir: Path | None) -> LinearizeResult:
    original, swap = _final(run.evals, "original"), _final(run.evals, "swap")
    transfer = _final(run.evals, "transfer") if run.transfer_steps else None
    finetune = _final(run.evals, "finetune") if run.cfg.finetune.steps else None
    losses = {"original": original, "swap": swap, "transfer": transfer, "finetune": finetune}
    closed = {
        stage: (gap_closed(original, swap, value) if value is not None else None)
        for stage, value in (("transfer", transfer), ("finetune", finetune))
    }
    steps = {"transfer": run.transfer_steps, "finetune": run.cfg.finetune.steps}
    return LinearizeResult(run_dir, model_dir, losses, closed, steps, run.history, run.evals)


def plot_linearize(run_dirs: list[str | Path], path: str | Path) -> Path:
    """Loss curves of linearization runs (run folders or their ``results.json`` files) as
    one PNG: validation loss by step (the original model's as a dotted line; the stage
    boundary marked), and the attention-transfer output MSE by step (averaged over
    layers, smoothed)."""
    from formerlab.experiments.plots import new_figure, save, smooth

    figure = new_figure(10.0, 4.0)
    val, mse = figure.subplots(1, 2)
    for where in run_dirs:
        file = Path(where) if Path(where).is_file() else Path(where) / "results.json"
        found = json.loads(file.read_text())
        label = Path(found["run_dir"]).name.rsplit("-", 3)[0]
        evals = [e for e in found["evals"] if e["label"] != "original"]
        (line,) = val.plot(
            [e["step"] for e in evals],
            [e["eval"]["loss"] for e in evals],
            marker="o",
            markersize=3,
            label=label,
        )
        original = [e for e in found["evals"] if e["label"] == "original"]
        if original:
            val.axhline(original[0]["eval"]["loss"], color="grey", linestyle=":", linewidth=1)
        if found["steps"]["transfer"]:
            val.axvline(
                found["steps"]["transfer"],
                color=line.get_color(),
                linestyle="--",
                linewidth=0.8,
                alpha=0.6,
            )
        transfer = [h for h in found["history"] if h.get("stage") == "transfer"]
        if transfer:
            mse.plot(
                [h["step"] for h in transfer],
                smooth([h["transfer/output_mse"] for h in transfer], 10),
                color=line.get_color(),
                label=label,
            )
    val.set(
        xlabel="step (transfer, then fine-tuning)",
        ylabel="validation loss (nats/token)",
        title="validation loss (dotted: original model)",
    )
    val.legend(fontsize=8)
    mse.set(
        xlabel="transfer step",
        ylabel="output MSE (mean over layers)",
        yscale="log",
        title="attention transfer",
    )
    if mse.lines:
        mse.legend(fontsize=8)
    return save(figure, path)


__all__ = [
    "CausalLM",
    "FinetuneConfig",
    "LinearizeConfig",
    "LinearizeResult",
    "LoraConfig",
    "MechanismConfig",
    "TransferConfig",
    "export_hf",
    "gap_closed",
    "init_llama",
    "linearize",
    "load_linearize_config",
    "plot_linearize",
    "train_base",
]
