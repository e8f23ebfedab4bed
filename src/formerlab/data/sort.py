"""Sorting: a sequence of integer tokens, a separator, then the same integers sorted.

A decoder (next-token) task in the style of the algorithmic probes used for efficient
attention (e.g. the sorting task of Tay et al., 2020, "Sparse Sinkhorn Attention"): the loss
and the metrics count only the answer part, so the model is scored on sorting, not on
predicting random input digits.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from formerlab.data._common import AnswerSpanTask, draw_split
from formerlab.data.base import IGNORE_INDEX, Batch
from formerlab.data.registry import register
from formerlab.errors import check_choice, check_positive_int

SEPARATOR = "|"
BLANK = "_"
MODES = ("decoder", "tagger")


class SortTask(AnswerSpanTask):
    """``x_1 .. x_L | y_1 .. y_L`` with ``y = sorted(x)``, ``x_i`` uniform in ``[0, num_values)``.

    Inputs are the sequence without its last token (length ``2 * length``), targets are
    the next tokens with ``IGNORE_INDEX`` everywhere before the answer, so exactly the
    ``length`` sorted tokens are scored. Metrics: ``accuracy`` (per answer token, the main
    metric) and ``exact_match`` (whole answer right).

    Train and val examples are disjoint by construction (a content hash assigns every
    possible input sequence to one split), so any generator seed gives held-out val data.
    Baseline: a constant or input-blind uniform guess, ``accuracy = 1 / num_values``,
    ``loss = log(num_values)``, ``exact_match = num_values ** -length``.

    ``mode="tagger"`` poses the same problem non-autoregressively, so that non-causal
    mechanisms (Nyström, landmark, double softmax) can be compared on it too: the input is
    ``x_1 .. x_L | _ .. _`` (``length`` blank slots) and a bidirectional model writes the
    sorted sequence into the blanks (one class per slot, classes = the values).
    """

    name = "sort"
    main_metric = "accuracy"
    higher_is_better = True

    def __init__(self, length: int = 16, num_values: int = 10, mode: str = "decoder") -> None:
        self.length = check_positive_int("length", length, minimum=2)
        self.num_values = check_positive_int("num_values", num_values, minimum=2)
        self.mode = check_choice("mode", mode, MODES)
        self.vocab = [str(v) for v in range(num_values)] + [SEPARATOR]
        self.separator_id = num_values
        self.max_len = 2 * length
        if mode == "tagger":
            self.kind = "tagger"
            self.num_classes = num_values
            self.vocab.append(BLANK)
            self.max_len = 2 * length + 1

    def _draw(self, n: int, generator: torch.Generator) -> Tensor:
        return torch.randint(0, self.num_values, (n, self.length), generator=generator)

    def batch(self, split: str, batch_size: int, generator: torch.Generator) -> Batch:
        check_positive_int("batch_size", batch_size)
        x = draw_split(self._draw, split, batch_size, generator)
        sep = torch.full((batch_size, 1), self.separator_id, dtype=x.dtype)
        answer = x.sort(dim=1).values
        if self.mode == "tagger":
            blanks = torch.full_like(x, len(self.vocab) - 1)
            inputs = torch.cat([x, sep, blanks], dim=1)
            targets = torch.full_like(inputs, IGNORE_INDEX)
            targets[:, self.length + 1 :] = answer
            return Batch(inputs, targets)
        seq = torch.cat([x, sep, answer], dim=1)
        targets = seq[:, 1:].clone()
        targets[:, : self.length] = IGNORE_INDEX  # input digits and the separator
        return Batch(seq[:, :-1].contiguous(), targets)

    def baseline(self) -> dict[str, float]:
        return {
            "loss": math.log(self.num_values),
            "accuracy": 1.0 / self.num_values,
            "exact_match": float(self.num_values) ** -self.length,
        }


@register("sort", description="sort integer tokens after a separator (decoder or tagger mode)")
def _build(length: int = 16, num_values: int = 10, mode: str = "decoder") -> SortTask:
    return SortTask(length=length, num_values=num_values, mode=mode)
