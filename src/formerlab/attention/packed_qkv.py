"""The packed q, k, v layout: per-head views (B, H, N, D) of one (B, N, 3, H, D) tensor.

A fused qkv projection leaves q, k and v as strided views of one (B, N, 3·H·D) output. A
kernel whose backward writes its three gradients into one buffer of the same layout
(:func:`empty_grads`) lets the split's backward hand that buffer to the projection as
it is (:func:`packed_buffer`), instead of copying three (B, H, N, D) gradients into a new
one: 3 × 8 MB at N = 8192, H·D = 256 (see ``SelfAttention``'s ``_SplitQKV``).
"""

from __future__ import annotations

import torch
from torch import Tensor


def packed_views(buffer: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(B, N, 3, H, D) -> its q, k, v views, each (B, H, N, D)."""
    return tuple(buffer[:, :, i].transpose(1, 2) for i in range(3))


def _strides_match(t: Tensor, strides: tuple[int, ...]) -> bool:
    # a size-1 dimension's stride never selects an element
    return all(size == 1 or got == want for size, got, want in zip(t.shape, t.stride(), strides))


def packed_buffer(q: Tensor | None, k: Tensor | None, v: Tensor | None) -> Tensor | None:
    """The (B, N, 3·H·D) tensor whose packed views are exactly q, k and v (same storage,
    dtype, strides and offsets), or None. Its memory is then q, k and v and nothing else,
    so returning it never exposes other data."""
    if q is None or k is None or v is None or q.dim() != 4:
        return None
    if not (q.shape == k.shape == v.shape) or not (q.dtype == k.dtype == v.dtype):
        return None
    b, h, n, d = q.shape
    c = 3 * h * d
    strides = (n * c, d, c, 1)
    base = q.storage_offset()
    storage = q.untyped_storage().data_ptr()
    for i, t in enumerate((q, k, v)):
        if t.untyped_storage().data_ptr() != storage or t.storage_offset() != base + i * h * d:
            return None
        if t.device != q.device or not _strides_match(t, strides):
            return None
    return q.as_strided((b, n, c), (n * c, c, 1), base)


def empty_grads(like: Tensor, packed: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Three uninitialised tensors shaped like ``like`` (B, H, N, D), for the gradients of
    q, k, v: the packed views of one new buffer if ``packed`` (the inputs were packed
    views, :func:`packed_buffer`), else contiguous."""
    if not packed:
        return tuple(torch.empty(like.shape, dtype=like.dtype, device=like.device) for _ in range(3))
    b, h, n, d = like.shape
    return packed_views(like.new_empty(b, n, 3, h, d))


__all__ = ["empty_grads", "packed_buffer", "packed_views"]
