"""Learning-rate (and momentum) schedules of the training loop.

* ``cosine`` (default): linear warm-up to ``lr`` over ``warmup`` steps, then cosine decay to
  ``min_lr`` at the last step.
* ``one_cycle``: the linear one-cycle policy of Smith & Topin (2019) with the defaults of
  ``torch.optim.lr_scheduler.OneCycleLR(anneal_strategy="linear")``, as the Long Range Arena
  code of the Nyströmformer authors uses it: the rate rises from ``lr / 25`` to ``lr`` over
  ``warmup`` steps, then falls linearly to ``lr / 25 / 1e4`` at the last step, while AdamW's
  β₁ cycles the other way, from 0.95 down to 0.85 and back (``beta1`` is not used).

``step`` is the number of optimiser steps already taken: the rate for the next update.
"""

from __future__ import annotations

import math

from formerlab.train.config import TrainConfig

#: OneCycleLR's defaults: initial rate = lr / DIV, final rate = initial / FINAL_DIV
ONE_CYCLE_DIV = 25.0
ONE_CYCLE_FINAL_DIV = 1e4
ONE_CYCLE_BETA1 = (0.85, 0.95)  # (base, max)


def learning_rate(step: int, t: TrainConfig) -> float:
    """The learning rate of update ``step`` (0-based) under ``t.schedule``."""
    if t.schedule == "one_cycle":
        start = t.lr / ONE_CYCLE_DIV
        return _one_cycle(step, t, (start, t.lr, start / ONE_CYCLE_FINAL_DIV))
    if step < t.warmup:
        return t.lr * (step + 1) / t.warmup
    progress = (step - t.warmup) / max(1, t.steps - t.warmup)
    return t.min_lr + 0.5 * (t.lr - t.min_lr) * (1 + math.cos(math.pi * min(progress, 1.0)))


def beta1(step: int, t: TrainConfig) -> float:
    """AdamW's β₁ for update ``step``: cycled under ``one_cycle``, else ``t.beta1``."""
    if t.schedule != "one_cycle":
        return t.beta1
    base, top = ONE_CYCLE_BETA1
    return _one_cycle(step, t, (top, base, top))


def _one_cycle(step: int, t: TrainConfig, values: tuple[float, float, float]) -> float:
    """Linear interpolation through ``values`` at steps 0, warmup - 1 and steps - 1 (the
    phase boundaries of OneCycleLR with ``pct_start = warmup / steps``)."""
    first, peak, last = values
    turn = t.warmup / t.steps * t.steps - 1  # computed as OneCycleLR does (in floats)
    if step <= turn:
        return first + (peak - first) * step / turn
    return peak + (last - peak) * (step - turn) / (t.steps - 1 - turn)
