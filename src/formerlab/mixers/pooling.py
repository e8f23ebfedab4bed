"""Pooling token mixer: the attention-free PoolFormer baseline.

PoolFormer (Yu et al., 2022, "MetaFormer Is Actually What You Need for Vision", eq. 4)
mixes tokens by average pooling minus the identity,

    out_i = mean_{j ∈ W(i)} x_j − x_i,

(the block's residual already adds x_i back; padding is not counted in the mean). Here on
sequences: W(i) is a window of ``pool_size`` positions centred on i, or with
``causal=True`` the window [i − pool_size + 1, i] of past positions only. Padded tokens
(``attention_mask`` False) are left out of every window sum and every count, so they
never leak into real tokens, and outputs at padded positions are zero.

Streaming: the causal window only reaches ``pool_size − 1`` tokens back, so the state is
a buffer of the last ``pool_size − 1`` inputs (:class:`PoolingState`), memory independent
of the position. A step with an ``attention_mask`` also keeps which of them are real, and
equals the parallel call with the same mask (padding counted in no window).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from formerlab.attention.base import compute_dtype
from formerlab.errors import check_positive_int
from formerlab.mixers.base import TokenMixer
from formerlab.mixers.registry import register


def window_sum(x: Tensor, size: int, left: int) -> Tensor:
    """Σ_{j=i-left}^{i-left+size-1} x_j along dim 1 of (B, N, C), out of range counting as 0."""
    right = size - 1 - left
    cols = F.pad(x.transpose(1, 2), (left, right))  # (B, C, N + size - 1)
    # avg_pool1d over zero padding times size = the sum; exact for any size, O(N·size).
    return (F.avg_pool1d(cols, size, stride=1) * size).transpose(1, 2)


@dataclass
class PoolingState:
    """The last (up to) ``pool_size − 1`` inputs of the stream, (B, L, C) in the compute
    dtype (float32, float64 for float64 inputs); ``real`` (B, L) bool, once a step has had
    an ``attention_mask``: which of them are real tokens (None: all are)."""

    window: Tensor
    real: Tensor | None = None


def masked_pool(work: Tensor, real: Tensor, size: int, left: int) -> Tensor:
    """Mean over the real tokens of each window minus identity, on (B, N, C) with ``real``
    (B, N, 1) weights (1 real, 0 padding); 0 at padded positions."""
    total = window_sum(work * real, size, left)
    # Every real query counts itself, so count >= 1 there; the clamp only guards padded
    # queries whose window may hold no real token (their output is zeroed below).
    count = window_sum(real, size, left).round().clamp_min(1.0)
    return (total / count - work) * real


def causal_pool(work: Tensor, size: int) -> Tensor:
    """Causal mean over the last ``size`` positions minus identity, on (B, N, C) without
    padding (the count at position i is min(i + 1, size))."""
    total = window_sum(work, size, size - 1)
    count = window_sum(work.new_ones(work.shape[0], work.shape[1], 1), size, size - 1)
    return total / count.round() - work


class Pooling(TokenMixer):
    """Average pooling minus identity over a ``pool_size`` window (causal: past only).

    Has no parameters; ``heads`` is accepted by the registry factory and ignored.
    For even ``pool_size`` the centred window reaches one position further right than left.
    """

    name = "pooling"
    packs_bidirectional = True  # padding is counted in no window, centred or causal

    def __init__(self, dim: int, pool_size: int = 3) -> None:
        super().__init__(dim)
        self.pool_size = check_positive_int("pool_size", pool_size)

    @property
    def supports_causal(self) -> bool:
        return True

    @property
    def supports_streaming(self) -> bool:
        return True

    def new_state(self, batch: int, dtype: torch.dtype, device: Any) -> PoolingState:
        work = compute_dtype(dtype)
        return PoolingState(torch.zeros(batch, 0, self.dim, dtype=work, device=device))

    def step_mix(
        self, x: Tensor, state: PoolingState, attention_mask: Tensor | None = None
    ) -> tuple[Tensor, PoolingState]:
        # the buffered past plus the new tokens hold every window the new tokens need
        seen = torch.cat([state.window, x.to(state.window.dtype)], dim=1)
        start = seen.shape[1] - min(seen.shape[1], self.pool_size - 1)
        if attention_mask is None and state.real is None:
            out = causal_pool(seen, self.pool_size)[:, -x.shape[1] :]
            return out.to(x.dtype), PoolingState(seen[:, start:])
        past = state.real
        if past is None:
            past = torch.ones(state.window.shape[:2], dtype=torch.bool, device=seen.device)
        new = attention_mask
        if new is None:
            new = torch.ones(x.shape[:2], dtype=torch.bool, device=seen.device)
        real = torch.cat([past, new], dim=1)
        weight = real.to(seen.dtype).unsqueeze(-1)
        out = masked_pool(seen, weight, self.pool_size, self.pool_size - 1)[:, -x.shape[1] :]
        return out.to(x.dtype), PoolingState(seen[:, start:], real[:, start:])

    def mix(self, x: Tensor, attention_mask: Tensor | None, causal: bool) -> Tensor:
        size = self.pool_size
        left = size - 1 if causal else (size - 1) // 2
        work = x.to(compute_dtype(x.dtype))
        if attention_mask is None:
            real = work.new_ones(work.shape[0], work.shape[1], 1)
        else:
            real = attention_mask.to(work.dtype).unsqueeze(-1)
        return masked_pool(work, real, size, left).to(x.dtype)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, pool_size={self.pool_size}"


register(
    "pooling",
    causal=True,
    complexity="O(N·pool_size) time, no parameters",
    description="PoolFormer token mixer: average pool minus identity (causal: past window)",
    ignores=("heads",),  # models pass heads to every mixer; pooling has none
)(Pooling)
