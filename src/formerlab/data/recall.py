"""Multi-query associative recall in the spirit of MQAR (Arora et al., 2023), simplified.

Key-value pairs come first, then queries: each query is a key seen earlier and the model
must emit its value. This variant feeds each answer back into the input, uses a separate
filler token and queries some of the keys; the ``mqar`` task follows Zoology's generator
exactly (power-law query slots, every key queried once) and is the one to compare with
published MQAR numbers. MQAR is the probe on which sub-quadratic mixers most clearly trail
softmax attention, which makes it the natural stress test for the kernels here.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from formerlab.data._common import AnswerSpanTask, draw_split
from formerlab.data.base import IGNORE_INDEX, Batch
from formerlab.data.registry import register
from formerlab.errors import check_positive_int

FILLER = "."


class RecallTask(AnswerSpanTask):
    """``k_1 v_1 .. k_D v_D`` then a query section holding ``Q`` pairs ``k v``.

    - keys: ``num_pairs`` distinct tokens out of ``num_keys``; values: uniform (with
      repetition) over ``num_values`` tokens, disjoint from the keys;
    - queries: ``num_queries`` distinct keys of the example in random order, each followed
      by its value (teacher forcing), so the target after a query key is its value;
    - ``seq_len`` (default the dense ``2 * (num_pairs + num_queries) - 1``) stretches the
      query section as in Zoology: queries sit at random even offsets, the gaps are a
      filler token, so recall distance and sequence length grow with ``seq_len``.

    Inputs are ``seq_len`` tokens; targets are ``IGNORE_INDEX`` except after query keys,
    so only answers are scored. Metrics: ``accuracy`` per answer (main) and ``exact_match``
    (all queries of a sequence right). Train and val are disjoint by a content hash.
    Baseline: a constant or input-blind guess, ``accuracy = 1 / num_values``,
    ``loss = log(num_values)``, ``exact_match = num_values ** -num_queries``.
    """

    name = "recall"
    main_metric = "accuracy"
    higher_is_better = True

    def __init__(
        self,
        num_pairs: int = 8,
        num_queries: int = 8,
        num_keys: int = 32,
        num_values: int = 32,
        seq_len: int | None = None,
    ) -> None:
        self.num_pairs = check_positive_int("num_pairs", num_pairs)
        self.num_keys = check_positive_int("num_keys", num_keys, minimum=num_pairs)
        self.num_values = check_positive_int("num_values", num_values, minimum=2)
        self.num_queries = check_positive_int("num_queries", num_queries)
        if num_queries > num_pairs:
            raise ValueError(
                f"num_queries={num_queries!r} is not allowed; expected an integer between 1 "
                f"and num_pairs={num_pairs} (each query asks a different key)"
            )
        dense = 2 * (num_pairs + num_queries) - 1
        self.seq_len = dense if seq_len is None else check_positive_int("seq_len", seq_len, dense)
        self.max_len = self.seq_len
        self.vocab = (
            [f"k{i}" for i in range(num_keys)] + [f"v{i}" for i in range(num_values)] + [FILLER]
        )
        self.filler_id = num_keys + num_values
        # the full sequence is one token longer than the inputs; queries take 2-token slots
        self._query_tokens = self.seq_len + 1 - 2 * num_pairs
        self._slots = self._query_tokens // 2

    def _draw(self, n: int, generator: torch.Generator) -> Tensor:
        d, q = self.num_pairs, self.num_queries
        keys = torch.rand(n, self.num_keys, generator=generator).argsort(-1)[:, :d]
        values = torch.randint(0, self.num_values, (n, d), generator=generator) + self.num_keys
        pairs = torch.stack([keys, values], dim=-1).reshape(n, 2 * d)
        asked = torch.rand(n, d, generator=generator).argsort(-1)[:, :q]
        # queries fill the chosen slots in slot order; the asked order is already random
        slots = torch.rand(n, self._slots, generator=generator).argsort(-1)[:, :q].sort(-1).values
        section = torch.full((n, self._query_tokens), self.filler_id, dtype=torch.int64)
        section.scatter_(1, 2 * slots, keys.gather(1, asked))
        section.scatter_(1, 2 * slots + 1, values.gather(1, asked))
        return torch.cat([pairs, section], dim=1)

    def batch(self, split: str, batch_size: int, generator: torch.Generator) -> Batch:
        check_positive_int("batch_size", batch_size)
        seq = draw_split(self._draw, split, batch_size, generator)
        inputs, targets = seq[:, :-1], seq[:, 1:].clone()
        is_query = inputs < self.num_keys
        is_query[:, : 2 * self.num_pairs] = False  # keys in the context are not questions
        targets[~is_query] = IGNORE_INDEX
        return Batch(inputs.contiguous(), targets)

    def baseline(self) -> dict[str, float]:
        return {
            "loss": math.log(self.num_values),
            "accuracy": 1.0 / self.num_values,
            "exact_match": float(self.num_values) ** -self.num_queries,
        }


@register(
    "recall",
    description="simplified multi-query associative recall (decoder, answer-only loss); "
    "mqar is Zoology's",
)
def _build(
    num_pairs: int = 8,
    num_queries: int = 8,
    num_keys: int = 32,
    num_values: int = 32,
    seq_len: int | None = None,
) -> RecallTask:
    return RecallTask(num_pairs, num_queries, num_keys, num_values, seq_len)
