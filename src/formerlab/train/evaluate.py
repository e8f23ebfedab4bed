"""Loss and metrics of a model on a fixed evaluation set of a task."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from formerlab.data import IGNORE_INDEX, Batch, Task
from formerlab.data.packing import PackedBatch, pack_batch
from formerlab.linalg.numerics import compute_dtype


def task_loss(logits: Tensor, batch: Batch | PackedBatch, task: Task) -> Tensor:
    """Mean cross-entropy: per sequence for encoders, per target token for decoders
    (a packed batch's targets give the padded batch's loss, term for term)."""
    logits = logits.to(compute_dtype(logits.dtype))  # float32, float64 when given float64
    if task.kind == "encoder":
        return nn.functional.cross_entropy(logits, batch.targets)
    return nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]),
        batch.targets.reshape(-1),
        ignore_index=IGNORE_INDEX,
    )


def model_logits(model: nn.Module, batch: Batch | PackedBatch) -> Tensor:
    """The model on a padded batch (with its mask) or on a packed one (with ``cu_seqlens``)."""
    if isinstance(batch, PackedBatch):
        return model(batch.inputs, cu_seqlens=batch.cu_seqlens)
    return model(batch.inputs, attention_mask=batch.attention_mask)


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
    packing: bool = False,
) -> dict[str, float]:
    """Summed ``task.metrics`` over the fixed evaluation batches, before ``task.summarize``.

    ``shard = (rank, world)`` keeps batches ``i`` with ``i % world == rank`` only, so the
    ranks of a data-parallel job split the set and their sums add up to one process's.
    ``packing``: run each batch packed (``formerlab.data.packing``) and score the logits
    put back in the padded layout, so the metrics are the padded batch's.
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
            packed = pack_batch(batch, task.kind) if packing else None
            with autocast(device, bf16):
                logits = model_logits(model, batch if packed is None else packed)
            if packed is not None:
                logits = packed.unpack(logits)
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
    packing: bool = False,
) -> dict[str, float]:
    """Metrics of ``model`` on ``task``'s fixed evaluation set (same batches every call);
    ``packing``: each batch run packed, with the same metrics (see ``metric_totals``)."""
    totals = metric_totals(
        model, task, split, batch_size, batches, device, bf16, seed, packing=packing
    )
    return task.summarize(totals)
