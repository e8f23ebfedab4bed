"""Pieces shared by the task modules (private: not a task, not auto-registered).

- ``Ragged``: variable-length sequences stored flat, padded per batch with a mask.
- ``AnswerSpanTask``: decoder tasks scored only on an answer span, with exact-match.
- ``draw_split``: content-hash split assignment so generated train and val examples can
  never coincide, whatever generator seeds the caller uses.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from formerlab.data.base import IGNORE_INDEX, Batch, Task
from formerlab.errors import check_choice

SPLITS = ("train", "val")


class Ragged:
    """Sequences of token ids of different lengths, stored as one flat tensor.

    ``pad(index, pad_id)`` returns the selected sequences padded to the longest of them and
    the bool mask (True = real token), without a Python loop over the batch.
    """

    def __init__(self, sequences: Sequence[Sequence[int]], dtype: torch.dtype = torch.int32):
        lengths = torch.tensor([len(s) for s in sequences], dtype=torch.int64)
        if len(sequences) and int(lengths.min()) < 1:
            raise ValueError("Ragged: every sequence needs at least one token")
        flat = [t for s in sequences for t in s]
        self.flat = torch.tensor(flat, dtype=dtype)
        self.lengths = lengths
        self.offsets = torch.cumsum(lengths, 0) - lengths

    @classmethod
    def from_flat(cls, flat: Tensor, lengths: Tensor) -> Ragged:
        """Rebuild from ``flat`` and ``lengths`` (e.g. loaded from a cache file)."""
        out = cls.__new__(cls)
        out.flat, out.lengths = flat, lengths.to(torch.int64)
        out.offsets = torch.cumsum(out.lengths, 0) - out.lengths
        return out

    def __len__(self) -> int:
        return len(self.lengths)

    def get(self, i: int) -> list[int]:
        start = int(self.offsets[i])
        return self.flat[start : start + int(self.lengths[i])].tolist()

    def pad(self, index: Tensor, pad_id: int) -> tuple[Tensor, Tensor]:
        """(B, W) int64 ids padded with ``pad_id`` and the (B, W) bool mask, W = longest."""
        lengths = self.lengths[index]
        positions = torch.arange(int(lengths.max()))
        mask = positions[None, :] < lengths[:, None]
        where = (self.offsets[index][:, None] + positions[None, :]).clamp_max(len(self.flat) - 1)
        return self.flat[where].long().masked_fill(~mask, pad_id), mask


class AnswerSpanTask(Task):
    """A decoder task whose targets are ``IGNORE_INDEX`` outside an answer span.

    Besides token accuracy over answer tokens it reports ``exact_match``: the share of
    sequences whose every answer token is predicted right.
    """

    kind = "decoder"

    def metrics(self, logits: Tensor, batch: Batch) -> dict[str, float]:
        out = super().metrics(logits, batch)
        scored = batch.targets != IGNORE_INDEX
        right = (logits.argmax(-1) == batch.targets) | ~scored
        has_answer = scored.any(-1)
        out["exact_correct"] = (right.all(-1) & has_answer).sum().item()
        out["sequences"] = has_answer.sum().item()
        return out

    def summarize(self, totals: dict[str, float]) -> dict[str, float]:
        out = super().summarize(totals)
        out["exact_match"] = totals.get("exact_correct", 0.0) / max(totals.get("sequences", 0.0), 1.0)
        return out

    def decode(self, ids: list[int]) -> str:
        # multi-character tokens ("12", "k3"): keep them apart
        return " ".join(self.vocab[i] for i in ids)


# One possible example in VAL_MODULUS belongs to the validation split.
VAL_MODULUS = 10
_PRIME = 2_147_483_647  # 2**31 - 1
_OFFSET = 1_234_567


def _hash_weights(width: int) -> Tensor:
    # fixed (seeded) so that an example's split never depends on the caller's generator
    return torch.randint(1, _PRIME, (width,), generator=torch.Generator().manual_seed(0x5EED))


def is_val_example(sequences: Tensor) -> Tensor:
    """(n, W) int ids -> (n,) bool: whether each sequence belongs to the validation split.

    A random linear hash modulo a prime decides, so membership depends only on content:
    the same sequence is always in the same split, and the splits are disjoint.
    """
    weights = _hash_weights(sequences.shape[1])
    # each product < 2**63 (ids < 2**32); reduce before summing so the sum cannot overflow
    terms = (sequences.long() * weights).remainder(_PRIME)
    # the offset keeps all-zero sequences from always landing in val
    return (terms.sum(-1) + _OFFSET).remainder(_PRIME).remainder(VAL_MODULUS) == 0


def draw_split(
    draw: Callable[[int, torch.Generator], Tensor],
    split: str,
    count: int,
    generator: torch.Generator,
    max_rounds: int = 200,
) -> Tensor:
    """``count`` examples of ``split`` from ``draw(n, generator) -> (n, W)`` candidates.

    Candidates are drawn in vectorised rounds and kept when their content hash puts them in
    ``split`` (rejection sampling: the result is distributed as ``draw`` restricted to the
    split). Raises ``ValueError`` when the task's example space is too small to give ``split``
    any examples.
    """
    check_choice("split", split, SPLITS)
    want_val = split == "val"
    share = 1.0 / VAL_MODULUS if want_val else 1.0 - 1.0 / VAL_MODULUS
    kept: list[Tensor] = []
    have = 0
    for _ in range(max_rounds):
        candidates = draw(math.ceil((count - have) / share * 1.25) + 8, generator)
        chosen = candidates[is_val_example(candidates) == want_val]
        kept.append(chosen)
        have += len(chosen)
        if have >= count:
            return torch.cat(kept)[:count]
    raise ValueError(
        f"could not draw {count} {split} examples in {max_rounds} rounds: the task's options "
        f"allow too few distinct sequences to split into disjoint train and val sets; "
        f"make the sequences longer or the vocabulary larger"
    )
