"""Packed variable-length batches (``cu_seqlens``) as padded batches with a mask, and back.

Packed sequences follow the convention of FlashAttention's varlen functions and of fla:
S sequences are concatenated along the token axis of a batch of one, and ``cu_seqlens``
(int32 / int64, shape (S + 1,)) holds their offsets ``[0, n_1, n_1 + n_2, …, N]``, strictly
increasing. Sequence s is tokens ``cu_seqlens[s] … cu_seqlens[s + 1] − 1``; nothing may
cross a boundary, and positions restart at each one.

Every kernel and mixer of formerlab already honours an ``attention_mask`` (bool (B, N),
True = real token), so a packed call is run as a padded one: the tokens are scattered into
a batch of S rows of the longest length L (:meth:`Packing.pad`), the mechanism runs on that
batch with the mask, and the real positions are gathered back (:meth:`Packing.unpad`).
Both are one ``index_copy`` / ``index_select`` with precomputed indices, so gradients flow.
This is exact wherever padding does not change the real outputs, which is what the
contracts say and the tests check:

* causal mechanisms are prefix consistent, so right padding leaves every real output as
  the sequence alone gives it (and rotary or learned positions, counted from each row's
  first real token, restart at 0 in every row);
* bidirectional kernels that leave padded keys out (``softmax``, ``linear``,
  ``performer``) and the Nyström kernels, whose landmarks are means over each row's real
  tokens only (:mod:`formerlab.linalg.segments`), give each row its own landmarks;
* a streaming prefill uses *left* padding (:meth:`Packing.pad` with ``left=True``): every
  row then ends in the last column, so the next tokens of all S sequences can be stepped
  together as a batch of S, one new token each. Right padding would leave a gap of padding
  between a short prompt and its continuation, which sliding windows (pooling, short
  convolutions) and positions would count.

The padded batch costs S·L instead of N positions (the price of reusing the masked paths;
a mechanism with a native varlen form can override the packed hook of its class).
"""

from __future__ import annotations

from functools import cached_property
from typing import Any

import torch
from torch import Tensor

from formerlab.attention.functional._common import check_cu_seqlens

__all__ = ["Packing", "as_packing", "refuse_mask_with_packing"]


class Packing:
    """Where the tokens of S packed sequences go in a padded (S, …, L, …) batch.

    Build it with :func:`as_packing` (which validates ``cu_seqlens``); one ``Packing`` can
    be reused for every layer of a model, so the offsets are read from the device once.

    Args:
        offsets: the S + 1 offsets, as Python ints (0 first, N last, strictly increasing).
        device: where the index tensors live (the device of the packed data).
    """

    def __init__(self, offsets: tuple[int, ...], device: torch.device | str | None = None) -> None:
        self.offsets = tuple(int(o) for o in offsets)
        self.device = torch.device("cpu") if device is None else torch.device(device)
        self.lengths = tuple(b - a for a, b in zip(self.offsets[:-1], self.offsets[1:]))

    @property
    def count(self) -> int:
        """S, the number of sequences."""
        return len(self.lengths)

    @property
    def total(self) -> int:
        """N, the number of packed tokens."""
        return self.offsets[-1]

    @property
    def max_len(self) -> int:
        """L, the length of the longest sequence (the width of the padded batch)."""
        return max(self.lengths)

    def __repr__(self) -> str:
        return f"Packing(lengths={list(self.lengths)}, device={self.device})"

    # --- indices --------------------------------------------------------------------

    @cached_property
    def sequence_ids(self) -> Tensor:
        """(N,) long: the sequence each packed token belongs to."""
        lengths = torch.tensor(self.lengths, device=self.device)
        return torch.repeat_interleave(torch.arange(self.count, device=self.device), lengths)

    @cached_property
    def _starts(self) -> Tensor:
        return torch.tensor(self.offsets[:-1], device=self.device)

    @cached_property
    def _local(self) -> Tensor:
        """(N,) long: each token's position in its own sequence."""
        return torch.arange(self.total, device=self.device) - self._starts[self.sequence_ids]

    @property
    def positions(self) -> Tensor:
        """(1, N) long: each token's position in its own sequence (restarting at 0)."""
        return self._local[None]

    def _index(self, left: bool) -> Tensor:
        """(N,) long: the slot of each packed token in the flattened (S·L) padded batch."""
        return self._left_index if left else self._right_index

    @cached_property
    def _right_index(self) -> Tensor:
        return self.sequence_ids * self.max_len + self._local

    @cached_property
    def _left_index(self) -> Tensor:
        lengths = torch.tensor(self.lengths, device=self.device)
        lead = self.max_len - lengths[self.sequence_ids]  # left padding of the token's row
        return self._right_index + lead

    def mask(self, left: bool = False) -> Tensor:
        """(S, L) bool, True = real token, of the right-padded (or left-padded) batch."""
        flat = torch.zeros(self.count * self.max_len, dtype=torch.bool, device=self.device)
        flat[self._index(left)] = True
        return flat.view(self.count, self.max_len)

    # --- moving data ----------------------------------------------------------------

    def pad(self, x: Tensor, dim: int, left: bool = False) -> Tensor:
        """A packed tensor (1, …, N at ``dim``, …) as a padded batch (S, …, L at ``dim``, …).

        Padded slots hold zeros; gradients flow back to ``x`` (``index_copy``).
        """
        self._check(x, dim)
        tokens = x.squeeze(0).movedim(dim - 1, 0)  # (N, *rest)
        rest = tokens.shape[1:]
        flat = tokens.new_zeros(self.count * self.max_len, *rest)
        flat = flat.index_copy(0, self._index(left), tokens)
        return flat.view(self.count, self.max_len, *rest).movedim(1, dim)

    def unpad(self, y: Tensor, dim: int, left: bool = False) -> Tensor:
        """The real positions of a padded batch (S, …, L at ``dim``, …) packed back into
        (1, …, N at ``dim``, …) (``index_select``: gradients flow, padding gets none)."""
        if y.shape[0] != self.count or y.shape[dim] != self.max_len:
            raise ValueError(
                f"expected a padded batch with S={self.count} rows and L={self.max_len} "
                f"positions along dim {dim}; got shape {tuple(y.shape)}"
            )
        rows = y.movedim(dim, 1)
        flat = rows.reshape(self.count * self.max_len, *rows.shape[2:])
        return flat.index_select(0, self._index(left)).movedim(0, dim - 1).unsqueeze(0)

    def segment_mean(self, x: Tensor) -> Tensor:
        """(S, C): the mean of each sequence's tokens of a packed x (1, N, C)."""
        self._check(x, 1)
        sums = x.new_zeros(self.count, *x.shape[2:]).index_add(0, self.sequence_ids, x[0])
        counts = torch.tensor(self.lengths, dtype=x.dtype, device=x.device)
        return sums / counts.view(-1, *([1] * (x.dim() - 2)))

    def _check(self, x: Tensor, dim: int) -> None:
        if x.dim() <= dim or x.shape[0] != 1 or x.shape[dim] != self.total:
            raise ValueError(
                f"expected a packed tensor with batch size 1 and N={self.total} tokens along "
                f"dim {dim}; got shape {tuple(x.shape)}"
            )


def as_packing(
    cu_seqlens: Any, batch: int, length: int, device: torch.device | str | None = None
) -> Packing:
    """The :class:`Packing` of ``cu_seqlens`` for packed data of batch size ``batch`` and
    ``length`` tokens, on ``device`` (default: the device of ``cu_seqlens``).

    ``cu_seqlens`` is an int32 / int64 tensor of S + 1 offsets, or a :class:`Packing`
    already built (returned as is when it fits, so a model validates once for all layers).

    Raises:
        ValueError: naming ``cu_seqlens`` (its type, dtype, shape or values) and what is
            expected: 1-D, from 0 to N = ``length``, strictly increasing, with B = 1.
    """
    if isinstance(cu_seqlens, Packing):
        if batch != 1 or cu_seqlens.total != length:
            raise ValueError(
                f"cu_seqlens {cu_seqlens!r} covers N={cu_seqlens.total} tokens with B = 1; "
                f"got B={batch}, N={length}"
            )
        if device is None or torch.device(device) == cu_seqlens.device:
            return cu_seqlens
        return Packing(cu_seqlens.offsets, device)
    offsets = check_cu_seqlens(cu_seqlens, batch, length)
    return Packing(offsets, cu_seqlens.device if device is None else device)


def refuse_mask_with_packing(attention_mask: Any, cu_seqlens: Any) -> None:
    """Raise ``ValueError`` when ``attention_mask`` and ``cu_seqlens`` are both given:
    packed sequences hold real tokens only (no padding to mask)."""
    if attention_mask is not None and cu_seqlens is not None:
        raise ValueError(
            "attention_mask cannot be combined with cu_seqlens: packed sequences hold real "
            "tokens only; leave the padding out of the packing and pass attention_mask=None"
        )
