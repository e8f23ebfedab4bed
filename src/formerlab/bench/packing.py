"""Packed vs padded training: the same model, the same steps, the same examples.

For each task two copies of one freshly initialised model are trained side by side with
the trainer's pieces (``build_model``, ``make_optimizer``, the learning-rate schedule,
``task_loss``): one on the padded batches, one on the same batches packed into one row
with ``cu_seqlens`` (:mod:`formerlab.data.packing`). The steps are interleaved (step i of
one, then step i of the other, the order alternating), so load from other processes hits
both alike. A step's time covers packing (for the packed copy), forward, backward,
clipping and the optimiser step; drawing the batch is left out of both.

Reported per task and thread count: real tokens per second of each (the same tokens for
both), the padding fraction of the padded batches, the speed-up (total time of padded over
packed, and the median of the per-step ratios), and the two loss curves with their
largest difference: the losses are the same numbers up to float rounding, so the curves
agree as far as rounding lets two trainings agree.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from formerlab.data.packing import pack_batch, real_tokens
from formerlab.errors import check_choice, check_positive_int
from formerlab.train.build import build_model, build_task
from formerlab.train.config import RunConfig, validate_config
from formerlab.train.evaluate import model_logits, task_loss
from formerlab.train.loop import make_optimizer
from formerlab.train.schedule import learning_rate

#: the two tasks of the benchmark and their default options (ListOps kept small)
TASKS: dict[str, dict[str, Any]] = {
    "sst2": {},
    "listops": {"train_size": 400, "val_size": 10, "min_len": 16, "max_len": 128},
}


CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}


@dataclass
class PackingResult:
    """One task at one thread count: per-step times (s) and losses of both copies."""

    task: str
    threads: int
    batch_size: int
    tokens: list[int] = field(default_factory=list)  # real tokens of each timed step
    positions: list[int] = field(default_factory=list)  # B·W of each timed step's padded batch
    padded_s: list[float] = field(default_factory=list)
    packed_s: list[float] = field(default_factory=list)
    padded_loss: list[float] = field(default_factory=list)  # every step, warm-up included
    packed_loss: list[float] = field(default_factory=list)

    @property
    def padding_fraction(self) -> float:
        return 1.0 - sum(self.tokens) / sum(self.positions)

    def tokens_per_s(self, mode: str) -> float:
        """Real tokens per second of ``"padded"`` or ``"packed"`` over the timed steps."""
        return sum(self.tokens) / sum(self.padded_s if mode == "padded" else self.packed_s)

    @property
    def speedup(self) -> float:
        """Total padded time over total packed time (= the tokens/s ratio packed/padded)."""
        return sum(self.padded_s) / sum(self.packed_s)

    @property
    def paired(self) -> list[float]:
        """Per-step ratios padded / packed (each pair ran back to back)."""
        return [a / b for a, b in zip(self.padded_s, self.packed_s)]

    @property
    def max_loss_gap(self) -> float:
        return max(abs(a - b) for a, b in zip(self.padded_loss, self.packed_loss))


def bench_config(
    task: str,
    options: dict[str, Any],
    steps: int,
    batch_size: int,
    dim: int,
    depth: int,
    heads: int,
    lr: float,
    seed: int,
) -> RunConfig:
    """The run config both copies are built from (warm-up: a tenth of the steps)."""
    return validate_config(
        {
            "seed": seed,
            "task": {"name": task, "options": options},
            "model": {"dim": dim, "depth": depth, "heads": heads},
            "train": {"steps": steps, "batch_size": batch_size, "lr": lr, "warmup": steps // 10},
            "tracking": "none",
        }
    )


def _step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: Any,
    task: Any,
    lr: float,
    clip: float | None,
    packed: bool,
    clock: Callable[[], float] = time.perf_counter,
) -> tuple[float, float]:
    """One training step; returns (seconds on ``clock``, loss)."""
    start = clock()
    if packed:
        batch = pack_batch(batch, task.kind)
    for group in optimizer.param_groups:
        group["lr"] = lr
    loss = task_loss(model_logits(model, batch), batch, task)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if clip is not None:
        nn.utils.clip_grad_norm_(model.parameters(), clip)
    optimizer.step()
    return clock() - start, loss.item()


def run_case(
    cfg: RunConfig,
    threads: int,
    warmup: int = 2,
    progress: Callable[[str], None] | None = None,
    clock: str = "wall",
) -> PackingResult:
    """Train the padded and the packed copy for ``cfg.train.steps`` interleaved steps at
    ``threads`` torch threads; the first ``warmup`` steps are trained but not timed.
    ``clock``: ``"wall"`` (elapsed time) or ``"cpu"`` (the process's CPU time, all its
    threads together: on a machine shared with other jobs it leaves out the waits for a
    core, and with several threads it measures work, not latency)."""
    timer = CLOCKS[check_choice("clock", clock, CLOCKS)]
    t = cfg.train
    task = build_task(cfg)
    torch.manual_seed(cfg.seed)
    padded_model = build_model(cfg, task)
    packed_model = copy.deepcopy(padded_model)
    models = {"padded": padded_model, "packed": packed_model}
    optimizers = {mode: make_optimizer(model, cfg) for mode, model in models.items()}
    generator = torch.Generator().manual_seed(cfg.seed + 1)
    result = PackingResult(cfg.task.name, threads, t.batch_size)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for step in range(t.steps):
            batch = task.batch("train", t.batch_size, generator)
            order = ("padded", "packed") if step % 2 == 0 else ("packed", "padded")
            times: dict[str, float] = {}
            for mode in order:
                times[mode], loss = _step(
                    models[mode],
                    optimizers[mode],
                    batch,
                    task,
                    learning_rate(step, t),
                    t.grad_clip,
                    mode == "packed",
                    timer,
                )
                getattr(result, f"{mode}_loss").append(loss)
            if step >= warmup:
                result.padded_s.append(times["padded"])
                result.packed_s.append(times["packed"])
                result.tokens.append(real_tokens(batch))
                result.positions.append(batch.inputs.numel())
            if progress is not None and (step + 1) % max(1, t.steps // 5) == 0:
                progress(
                    f"{cfg.task.name} @{threads} thr: step {step + 1}/{t.steps}, loss "
                    f"padded {result.padded_loss[-1]:.4f} packed {result.packed_loss[-1]:.4f}"
                )
    finally:
        torch.set_num_threads(before)
    return result


def run_benchmark(
    tasks: Sequence[str] = ("sst2", "listops"),
    threads: Sequence[int] = (1, 2),
    steps: int = 40,
    batch_size: int = 32,
    dim: int = 128,
    depth: int = 4,
    heads: int = 4,
    lr: float = 1e-3,
    seed: int = 0,
    warmup: int = 2,
    options: dict[str, dict[str, Any]] | None = None,
    progress: Callable[[str], None] | None = None,
    clock: str = "wall",
) -> list[PackingResult]:
    """Every task at every thread count (:func:`run_case`); ``options`` overrides a task's
    options (default :data:`TASKS`)."""
    check_positive_int("steps", steps)
    if warmup >= steps:
        raise ValueError(f"warmup={warmup} must be below steps={steps} (no step would be timed)")
    results = []
    for name in tasks:
        if name not in TASKS:
            raise ValueError(f"task={name!r} is not allowed; expected one of {list(TASKS)}")
        task_options = {**TASKS[name], **(options or {}).get(name, {})}
        cfg = bench_config(name, task_options, steps, batch_size, dim, depth, heads, lr, seed)
        for count in threads:
            results.append(run_case(cfg, count, warmup, progress, clock))
    return results


def summary_table(results: Sequence[PackingResult]) -> str:
    """Markdown: tokens/s of both, the padding fraction, the speed-up and loss agreement."""
    head = [
        "task",
        "threads",
        "padding",
        "padded tok/s",
        "packed tok/s",
        "packed / padded",
        "paired: median (range)",
        "final loss padded / packed",
        "mean loss padded / packed",
        "max abs loss gap",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        paired = r.paired
        cells = [
            r.task,
            str(r.threads),
            f"{100 * r.padding_fraction:.1f}%",
            f"{r.tokens_per_s('padded'):,.0f}",
            f"{r.tokens_per_s('packed'):,.0f}",
            f"{r.speedup:.2f}×",
            f"{statistics.median(paired):.2f}× ({min(paired):.2f}–{max(paired):.2f})",
            f"{r.padded_loss[-1]:.4f} / {r.packed_loss[-1]:.4f}",
            f"{statistics.fmean(r.padded_loss):.4f} / {statistics.fmean(r.packed_loss):.4f}",
            f"{r.max_loss_gap:.1e}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def curve_table(result: PackingResult, points: int = 8) -> str:
    """Markdown: the two loss curves side by side at ``points`` evenly spaced steps."""
    steps = len(result.padded_loss)
    shown = sorted({round(i * (steps - 1) / max(points - 1, 1)) for i in range(points)})
    lines = ["| step | padded loss | packed loss | gap |", "|---|---|---|---|"]
    for i in shown:
        a, b = result.padded_loss[i], result.packed_loss[i]
        lines.append(f"| {i + 1} | {a:.5f} | {b:.5f} | {abs(a - b):.1e} |")
    return "\n".join(lines)


__all__ = ["TASKS", "PackingResult", "curve_table", "run_benchmark", "run_case", "summary_table"]
