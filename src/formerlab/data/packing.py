"""Packed batches: the real tokens of a batch's examples in one row, with ``cu_seqlens``.

A padded :class:`~formerlab.data.base.Batch` of B examples costs B·W positions (W the
longest example); most of them may be padding. :func:`pack_batch` keeps the same examples
but lays their real tokens end to end in one row of N tokens (B = 1) with the offsets
``cu_seqlens = [0, n_1, n_1 + n_2, …, N]`` of FlashAttention's varlen functions and fla.
Every formerlab model takes such a row (``model(ids, cu_seqlens=cu)``): nothing attends
across a boundary and positions restart at 0 in each example, so each example is treated
as it is alone, as it is in the padded batch.

Targets follow the task's kind (see :class:`~formerlab.data.base.Task`):

* ``"encoder"`` (one class per example): the (S,) targets are kept; the model returns one
  row of logits per example (its own pooling);
* ``"decoder"`` / ``"tagger"`` (one target per position): the targets of the real tokens,
  (1, N), ``IGNORE_INDEX`` kept where it was. A target on a padded position must be
  ``IGNORE_INDEX`` (it is in every formerlab task): otherwise the padded loss would score
  it and the packed one could not.

So the mean loss of a packed batch is the padded batch's mean loss, term for term, and
:meth:`PackedBatch.unpack` puts logits back into the padded layout, where a task's own
``metrics`` score them exactly as for the padded batch.

:func:`pack_examples` packs a list of examples into several rows of at most ``max_tokens``
tokens each (in order, none split across rows).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from formerlab.data.base import IGNORE_INDEX, Batch
from formerlab.errors import check_choice, check_positive_int

KINDS = ("decoder", "encoder", "tagger")

__all__ = ["PackedBatch", "pack_batch", "pack_examples", "padding_fraction", "real_tokens"]


@dataclass
class PackedBatch:
    """The examples of a padded batch of shape ``shape = (B, W)`` packed in one row.

    Attributes:
        inputs: (1, N) int64 token ids, the real tokens of the B examples end to end.
        cu_seqlens: (B + 1,) int32 offsets of the examples in ``inputs``.
        targets: (B,) for encoders, (1, N) for decoders and taggers.
        index: (N,) int64, the slot ``b * W + t`` of each packed token in the padded batch.
        shape: (B, W), the padded batch's shape.
        kind: the task kind the targets follow.
    """

    inputs: Tensor
    cu_seqlens: Tensor
    targets: Tensor
    index: Tensor
    shape: tuple[int, int]
    kind: str

    attention_mask = None  # a packed row holds real tokens only

    def to(self, device: torch.device | str) -> PackedBatch:
        return PackedBatch(
            self.inputs.to(device),
            self.cu_seqlens.to(device),
            self.targets.to(device),
            self.index.to(device),
            self.shape,
            self.kind,
        )

    @property
    def tokens(self) -> int:
        """N, the number of real tokens."""
        return self.inputs.shape[1]

    @property
    def padding_fraction(self) -> float:
        """The share of the padded batch's B·W positions that are padding."""
        return 1.0 - self.tokens / (self.shape[0] * self.shape[1])

    def unpack(self, logits: Tensor) -> Tensor:
        """Logits of the packed row in the padded batch's layout.

        Encoders: the (B, classes) logits are already one row per example (returned as is).
        Decoders / taggers: (1, N, V) -> (B, W, V), zeros on padded positions (whose
        targets are ``IGNORE_INDEX``); gradients flow back to the packed logits.
        """
        if self.kind == "encoder":
            if logits.shape[0] != self.shape[0]:
                raise ValueError(
                    f"expected encoder logits with {self.shape[0]} rows (one per "
                    f"example); got shape {tuple(logits.shape)}"
                )
            return logits
        if logits.dim() < 2 or logits.shape[:2] != (1, self.tokens):
            raise ValueError(
                f"expected packed logits of shape (1, {self.tokens}, ...); got "
                f"{tuple(logits.shape)}"
            )
        rest = logits.shape[2:]
        flat = logits.new_zeros(self.shape[0] * self.shape[1], *rest)
        flat = flat.index_copy(0, self.index, logits[0])
        return flat.view(*self.shape, *rest)


def real_tokens(batch: Batch) -> int:
    """The number of real tokens of a padded batch (all of them without a mask)."""
    if batch.attention_mask is None:
        return batch.inputs.numel()
    return int(batch.attention_mask.sum())


def padding_fraction(batch: Batch) -> float:
    """The share of a padded batch's positions that are padding."""
    return 1.0 - real_tokens(batch) / max(batch.inputs.numel(), 1)


def _check_mask(batch: Batch) -> Tensor:
    """The (B, W) bool mask (all True without one), after checking that every row's real
    tokens are one contiguous run of at least one token."""
    inputs, mask = batch.inputs, batch.attention_mask
    if inputs.dim() != 2 or inputs.shape[1] == 0:
        raise ValueError(
            f"batch.inputs must be (B, W) with W >= 1; got shape {tuple(inputs.shape)}"
        )
    if mask is None:
        return torch.ones_like(inputs, dtype=torch.bool)
    if mask.dtype != torch.bool or mask.shape != inputs.shape:
        raise ValueError(
            f"batch.attention_mask must be bool of shape {tuple(inputs.shape)}; "
            f"got {mask.dtype} {tuple(mask.shape)}"
        )
    lengths = mask.sum(1)
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    first = torch.where(mask, positions, mask.shape[1]).amin(1)
    last = torch.where(mask, positions, -1).amax(1)
    bad = (lengths == 0) | (last - first + 1 != lengths)
    if bool(bad.any()):
        row = int(bad.nonzero()[0])
        raise ValueError(
            f"batch.attention_mask row {row} is {mask[row].int().tolist()}: packing needs every "
            "example's real tokens to be one contiguous run of at least one token"
        )
    return mask


def pack_batch(batch: Batch, kind: str, max_tokens: int | None = None) -> PackedBatch:
    """The examples of ``batch`` packed into one row (see the module doc).

    Args:
        batch: a padded batch: ``inputs`` (B, W), ``attention_mask`` (B, W) bool or None,
            ``targets`` (B,) for ``kind="encoder"``, else (B, W).
        kind: the task's kind, ``"decoder"``, ``"encoder"`` or ``"tagger"``.
        max_tokens: the row's token budget; a batch with more real tokens is refused.

    Raises:
        ValueError: naming the argument: an unknown kind, targets of the wrong shape, a
            scored target on a padded position, a mask with holes or an empty row, or more
            than ``max_tokens`` tokens.
    """
    check_choice("kind", kind, KINDS)
    mask = _check_mask(batch)
    rows, width = mask.shape
    targets = batch.targets
    want = (rows,) if kind == "encoder" else (rows, width)
    if tuple(targets.shape) != want:
        raise ValueError(
            f"batch.targets of a kind={kind!r} batch must have shape {want}; got "
            f"{tuple(targets.shape)}"
        )
    if kind != "encoder" and bool((targets[~mask] != IGNORE_INDEX).any()):
        raise ValueError(
            f"batch.targets has targets on padded positions (attention_mask False) "
            f"that are not IGNORE_INDEX={IGNORE_INDEX}; packing drops padding, so "
            "they could not be scored"
        )
    lengths = mask.sum(1)
    total = int(lengths.sum())
    if max_tokens is not None and total > check_positive_int("max_tokens", max_tokens):
        raise ValueError(f"the batch has {total} real tokens, more than max_tokens={max_tokens}")
    index = mask.reshape(-1).nonzero().squeeze(1)  # row-major: example by example, in order
    cu_seqlens = torch.zeros(rows + 1, dtype=torch.int32, device=mask.device)
    cu_seqlens[1:] = lengths.cumsum(0)
    packed_targets = targets if kind == "encoder" else targets.reshape(-1)[index][None]
    return PackedBatch(
        batch.inputs.reshape(-1)[index][None],
        cu_seqlens,
        packed_targets,
        index,
        (rows, width),
        kind,
    )


def pack_examples(
    examples: Sequence[tuple[Sequence[int], int | Sequence[int]]],
    kind: str,
    max_tokens: int,
    pad_id: int = 0,
) -> list[PackedBatch]:
    """Pack ``(token ids, target)`` examples into rows of at most ``max_tokens`` tokens.

    Examples keep their order; a row takes examples while they fit (none is split across
    rows). ``target`` is a class (encoders) or one target per token (decoders, taggers).

    Raises:
        ValueError: an example longer than ``max_tokens`` (naming its index and length), an
            empty example, or per-token targets whose length differs from the ids'.
    """
    check_positive_int("max_tokens", max_tokens)
    groups: list[list[int]] = []
    used = max_tokens  # forces a new row for the first example
    for i, (ids, target) in enumerate(examples):
        n = len(ids)
        if n == 0 or n > max_tokens:
            raise ValueError(f"example {i} has {n} tokens; expected 1 to max_tokens={max_tokens}")
        if kind != "encoder" and len(target) != n:
            raise ValueError(f"example {i} has {n} tokens but {len(target)} targets")
        if used + n > max_tokens:
            groups.append([])
            used = 0
        groups[-1].append(i)
        used += n
    return [pack_batch(_padded(examples, group, kind, pad_id), kind) for group in groups]


def _padded(examples, group: list[int], kind: str, pad_id: int) -> Batch:
    """The right-padded batch of the examples ``group``."""
    width = max(len(examples[i][0]) for i in group)
    inputs = torch.full((len(group), width), pad_id, dtype=torch.int64)
    mask = torch.zeros(len(group), width, dtype=torch.bool)
    if kind == "encoder":
        targets = torch.tensor([int(examples[i][1]) for i in group])
    else:
        targets = torch.full((len(group), width), IGNORE_INDEX, dtype=torch.int64)
    for row, i in enumerate(group):
        ids, target = examples[i]
        inputs[row, : len(ids)] = torch.as_tensor(ids)
        mask[row, : len(ids)] = True
        if kind != "encoder":
            targets[row, : len(ids)] = torch.as_tensor(target)
    return Batch(inputs, targets, mask)
