"""Loss and metrics of a model on a fixed evaluation set of a task."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from formerlab.data import IGNORE_INDEX, Batch, Task


def task_loss(logits: Tensor, batch: Batch, task: Task) -> Tensor:
    """Mean cross-entropy: per sequence for encoders, per target token for decoders."""
    if task.kind == "encoder":
        return nn.functional.cross_entropy(logits.float(), batch.targets)
    return nn.functional.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]),
        batch.targets.reshape(-1),
        ignore_index=IGNORE_INDEX,
    )


def autocast(device: str, bf16: bool):
    """bf16 autocast on the run's device, or a no-op."""
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)


def drawn_on_cpu(batches: Iterator[Batch]) -> Iterator[Batch]:
    """``batches`` with each draw on the CPU (where task data lives) whatever the default
    device; the caller moves every batch to its device."""
    while True:
        with torch.device("cpu"):
            batch = next(batches, None)
        if batch is None:
            return
        yield batch


@torch.no_grad()
def metric_totals(
    model: nn.Module,
    task: Task,
    split: str = "val",
    batch_size: int = 32,
    batches: int = 20,
    device: str = "cpu",
    bf16: bool = False,
    seed: int = 1234,
    shard: tuple[int, int] = (0, 1),
) -> dict[str, float]:
    """Summed ``task.metrics`` over the fixed evaluation batches, before ``task.summarize``.

    ``shard = (rank, world)`` keeps batches ``i`` with ``i % world == rank`` only, so the
    ranks of a data-parallel job split the set and their sums add up to one process's.
    """
    rank, world = shard
    was_training = model.training
    model.eval()
    totals: dict[str, float] = {}
    try:
        drawn = drawn_on_cpu(task.eval_batches(split, batch_size, batches, seed=seed))
        for i, batch in enumerate(drawn):
            if i % world != rank:
                continue
            batch = batch.to(device)
            with autocast(device, bf16):
                logits = model(batch.inputs, attention_mask=batch.attention_mask)
            for key, value in task.metrics(logits, batch).items():
                totals[key] = totals.get(key, 0.0) + value
    finally:
        model.train(was_training)
    return totals


def evaluate(
    model: nn.Module,
    task: Task,
    split: str = "val",
    batch_size: int = 32,
    batches: int = 20,
    device: str = "cpu",
    bf16: bool = False,
    seed: int = 1234,
) -> dict[str, float]:
    """Metrics of ``model`` on ``task``'s fixed evaluation set (same batches every call)."""
    totals = metric_totals(model, task, split, batch_size, batches, device, bf16, seed)
    return task.summarize(totals)
