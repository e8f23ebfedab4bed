"""Segment means over the real tokens of each sequence: the landmarks of Nyström attention.

Nyströmformer (Xiong et al., AAAI 2021, §3.3) takes its m landmarks as the means of m
contiguous segments of the sequence. Public implementations require m to divide N and
pad the sequence with zeros, which biases the last landmark, and they average padded
tokens into the landmarks. Here the segments are defined on the *real* tokens only:

* the real tokens of sequence b are ranked r = 0 … L_b − 1 in their order of appearance
  (L_b = number of True entries of ``attention_mask[b]``);
* token of rank r belongs to segment ``floor(r · m / L_b)``.

For L_b >= m every segment holds ⌊L_b/m⌋ or ⌈L_b/m⌉ consecutive real tokens (never
empty); for L_b < m every real token is its own segment and the remaining segments are
empty (``nonempty`` is False there, their mean is 0). Padded tokens belong to no segment,
so a padded sequence has exactly the landmarks of the same sequence run alone: this is
what makes the Nyström kernels padding invariant. m need not divide N.

Public API (stable; other kernels import it):

* :func:`segment_layout` — the assignment of tokens to segments (:class:`SegmentLayout`);
* :func:`segment_means` — the means of a (B, …, N, D) tensor per segment, (B, …, m, D);
* :func:`segment_sums` — the same, unnormalised.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from formerlab.errors import check_positive_int
from formerlab.linalg.numerics import compute_dtype


@dataclass(frozen=True)
class SegmentLayout:
    """Which segment every token belongs to.

    Attributes:
        ids: (B, N) long; segment index of each token, ``num_segments`` for padded tokens
            (a sink that the reductions drop).
        counts: (B, m) number of real tokens in each segment.
        lengths: (B,) number of real tokens of each sequence.
        nonempty: (B, m) bool, ``counts > 0``.
        num_segments: m.
    """

    ids: Tensor
    counts: Tensor
    lengths: Tensor
    nonempty: Tensor
    num_segments: int

    @property
    def exact(self) -> Tensor:
        """(B,) bool: sequences with L <= m, where every real token is its own segment."""
        return self.lengths <= self.num_segments


def segment_layout(
    n: int,
    num_segments: int,
    attention_mask: Tensor | None = None,
    batch: int = 1,
    device: torch.device | str | None = None,
) -> SegmentLayout:
    """Assign the real tokens of each of ``batch`` sequences of length ``n`` to segments.

    Args:
        n: sequence length N (padded length when a mask is given).
        num_segments: m >= 1, the number of segments (landmarks).
        attention_mask: optional bool (B, N), True = real token; ``batch`` and
            ``device`` are taken from it when given.
        batch: B when no mask is given.
        device: device of the layout when no mask is given.
    """
    check_positive_int("num_segments", num_segments)
    check_positive_int("n", n, minimum=0)
    if attention_mask is not None:
        if attention_mask.dtype != torch.bool or attention_mask.dim() != 2 or (
            attention_mask.shape[1] != n
        ):
            raise ValueError(
                f"attention_mask must be a bool (B, N={n}) tensor with True = real token; "
                f"got dtype {attention_mask.dtype}, shape {tuple(attention_mask.shape)}"
            )
        mask = attention_mask
        batch, device = mask.shape[0], mask.device
    else:
        check_positive_int("batch", batch)
        mask = torch.ones(batch, n, dtype=torch.bool, device=device)
    rank = mask.long().cumsum(dim=1) - 1  # rank of each real token among the real ones
    lengths = mask.sum(dim=1)
    # floor(r * m / L) with integer arithmetic (exact for any N, no float rounding)
    ids = rank.clamp(min=0) * num_segments // lengths.clamp(min=1)[:, None]
    ids = torch.where(mask, ids, torch.full_like(ids, num_segments))
    counts = torch.zeros(batch, num_segments + 1, dtype=torch.long, device=mask.device)
    counts.scatter_add_(1, ids, torch.ones_like(ids))
    counts = counts[:, :num_segments]
    return SegmentLayout(ids, counts, lengths, counts > 0, num_segments)


def _check_x(x: Tensor, layout: SegmentLayout) -> None:
    if not isinstance(x, Tensor) or x.dim() < 3:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"x must be a (B, ..., N, D) tensor with at least 3 dims; got {shape}")
    if x.shape[0] != layout.ids.shape[0] or x.shape[-2] != layout.ids.shape[1]:
        raise ValueError(
            f"x of shape {tuple(x.shape)} does not match the segment layout of "
            f"(B, N) = {tuple(layout.ids.shape)}"
        )


def segment_sums(x: Tensor, layout: SegmentLayout) -> Tensor:
    """Sum of x over each segment: (B, ..., N, D) -> (B, ..., m, D), padded tokens dropped.

    Accumulates in float32 (float64 for float64 input) and returns x's dtype.
    """
    _check_x(x, layout)
    work = compute_dtype(x.dtype)
    m = layout.num_segments
    extra = x.dim() - 3  # dims between B and N (e.g. heads)
    ids = layout.ids.view(x.shape[0], *([1] * extra), x.shape[-2], 1).expand(x.shape)
    out = torch.zeros(*x.shape[:-2], m + 1, x.shape[-1], dtype=work, device=x.device)
    out.scatter_add_(-2, ids, x.to(work))
    return out[..., :m, :].to(x.dtype)


def segment_means(
    x: Tensor,
    num_segments: int | None = None,
    attention_mask: Tensor | None = None,
    layout: SegmentLayout | None = None,
) -> tuple[Tensor, Tensor]:
    """Means of x over the segments of its real tokens (the Nyström landmarks).

    Args:
        x: (B, ..., N, D), e.g. per-head queries (B, H, N, D).
        num_segments: m; required unless ``layout`` is given.
        attention_mask: optional bool (B, N), True = real token.
        layout: a precomputed :func:`segment_layout` (saves recomputing it for q and k).

    Returns:
        ``(means, nonempty)``: means (B, ..., m, D) in x's dtype (accumulated in float32 or
        float64), zero for empty segments; nonempty (B, m) bool.
    """
    if layout is None:
        if num_segments is None:
            raise ValueError("segment_means needs num_segments or a layout; got neither")
        layout = segment_layout(x.shape[-2], num_segments, attention_mask, x.shape[0], x.device)
    _check_x(x, layout)
    b, n, m = x.shape[0], x.shape[-2], layout.num_segments
    # (under torch.compile the general path: this data-dependent test would break the graph)
    equal = not torch.compiler.is_compiling() and n >= m and n % m == 0
    if equal and bool((layout.lengths == n).all()):
        # equal contiguous segments: a reshape is the cheapest exact reduction
        work = compute_dtype(x.dtype)
        means = x.to(work).unflatten(-2, (m, n // m)).mean(dim=-2).to(x.dtype)
        return means, layout.nonempty
    sums = segment_sums(x, layout)
    extra = x.dim() - 3
    counts = layout.counts.clamp(min=1).view(b, *([1] * extra), m, 1)
    work = compute_dtype(x.dtype)
    return (sums.to(work) / counts.to(work)).to(x.dtype), layout.nonempty
