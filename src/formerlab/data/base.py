"""The Task interface every dataset implements, and the batch it yields.

A task knows its vocabulary, how to draw batches for a split, which model kind it needs
(``"decoder"``: next-token targets, ``"encoder"``: one class per sequence, ``"tagger"``:
one class per position, predicted bidirectionally), which metrics
it reports and what a chance/majority predictor scores on them.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from formerlab.errors import check_choice, check_positive_int

IGNORE_INDEX = -100
SPLITS = ("train", "val")


@dataclass
class Batch:
    """One batch. ``targets`` is (B, N) for decoders and taggers (``IGNORE_INDEX`` = no
    loss there) and (B,) for encoders; ``attention_mask`` is bool (B, N), True = real token, or None."""

    inputs: Tensor
    targets: Tensor
    attention_mask: Tensor | None = None

    def to(self, device: torch.device | str) -> Batch:
        mask = None if self.attention_mask is None else self.attention_mask.to(device)
        return Batch(self.inputs.to(device), self.targets.to(device), mask)


class Task:
    """Base class for tasks; subclasses set the attributes and implement ``batch``."""

    name: str = "task"
    kind: str = "decoder"  # "decoder", "encoder" or "tagger"
    vocab: list[str]
    num_classes: int | None = None
    max_len: int = 0  # longest input sequence the task produces
    main_metric: str = "accuracy"
    higher_is_better: bool = True
    #: the splits ``batch`` / ``eval_batches`` accept; tasks with a held-out test split add
    #: ``"test"`` (scored once, at the best validation checkpoint: ``train.test_at_best``)
    splits: tuple[str, ...] = SPLITS

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def batch(self, split: str, batch_size: int, generator: torch.Generator) -> Batch:
        """Draw one batch of ``split`` using ``generator`` (so runs are reproducible)."""
        raise NotImplementedError

    def eval_batches(
        self, split: str, batch_size: int, max_batches: int, seed: int = 0
    ) -> Iterator[Batch]:
        """A fixed evaluation set: ``max_batches`` batches drawn from a generator seeded
        with ``seed`` (tasks with a finite dev set override this to walk all of it)."""
        check_choice("split", split, self.splits)
        generator = torch.Generator().manual_seed(seed)
        for _ in range(max_batches):
            yield self.batch(split, batch_size, generator)

    def metrics(self, logits: Tensor, batch: Batch) -> dict[str, float]:
        """Sum-form metrics of one batch: ``{"loss_sum", "correct", "count", ...}``;
        ``summarize`` turns the totals over batches into means."""
        if self.kind == "encoder":
            target = batch.targets
            flat_logits = logits.float()
            keep = torch.ones_like(target, dtype=torch.bool)
        else:
            target = batch.targets.reshape(-1)
            flat_logits = logits.float().reshape(-1, logits.shape[-1])
            keep = target != IGNORE_INDEX
        loss = torch.nn.functional.cross_entropy(
            flat_logits, target, ignore_index=IGNORE_INDEX, reduction="sum"
        )
        correct = ((flat_logits.argmax(-1) == target) & keep).sum()
        return {"loss_sum": loss.item(), "correct": correct.item(), "count": keep.sum().item()}

    def summarize(self, totals: dict[str, float]) -> dict[str, float]:
        """Turn summed metrics into ``{"loss", "accuracy", ...}``."""
        count = max(totals.get("count", 0.0), 1.0)
        return {"loss": totals["loss_sum"] / count, "accuracy": totals["correct"] / count}

    def baseline(self) -> dict[str, float]:
        """What a chance predictor scores: uniform loss and accuracy over the outputs."""
        outputs = self.vocab_size if self.kind == "decoder" else self.num_classes
        return {"loss": math.log(outputs), "accuracy": 1.0 / outputs}

    def encode(self, text: str) -> list[int]:
        """Text -> token ids (tasks with a text vocabulary override this)."""
        raise NotImplementedError(f"task {self.name!r} has no text encoder")

    def decode(self, ids: list[int]) -> str:
        return "".join(self.vocab[i] for i in ids)


class PooledSplits:
    """Mixin for tasks whose splits are fixed pools of examples (generated once): training
    batches sample a pool with the caller's generator; evaluation walks the val (or test)
    pool in order, at most ``max_batches`` batches, so no example is scored twice.

    A task provides ``pool_size(split)`` and ``_batch_of(split, index)``; list the mixin
    before the task base class (``class ListOps(PooledSplits, Task)``).
    """

    splits: tuple[str, ...]

    def pool_size(self, split: str) -> int:
        raise NotImplementedError

    def _batch_of(self, split: str, index: Tensor) -> Batch:
        raise NotImplementedError

    def batch(self, split: str, batch_size: int, generator: torch.Generator) -> Batch:
        check_choice("split", split, self.splits)
        check_positive_int("batch_size", batch_size)
        index = torch.randint(0, self.pool_size(split), (batch_size,), generator=generator)
        return self._batch_of(split, index)

    def eval_batches(
        self, split: str, batch_size: int, max_batches: int, seed: int = 0
    ) -> Iterator[Batch]:
        """The val (or test) pool in order; the train split as in ``Task``."""
        if split == "train":
            yield from super().eval_batches(split, batch_size, max_batches, seed)
            return
        check_choice("split", split, self.splits)
        check_positive_int("batch_size", batch_size)
        size = self.pool_size(split)
        for start in range(0, min(size, batch_size * max_batches), batch_size):
            yield self._batch_of(split, torch.arange(start, min(start + batch_size, size)))
