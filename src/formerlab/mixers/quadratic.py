"""Quadratic-form attention: a general, per-head bilinear score in a low-rank factored form.

Dot-product attention scores are a bilinear form rᵢⱼ = xᵢᵀ Uₙ xⱼ with Uₙ = Q̂ₙᵀ K̂ₙ
(Vaswani et al., 2017). Metric-tensor attention (``formerlab.mixers.metric``) constrains
Uₙ = PₙᵀMₙPₙ with Mₙ symmetric and reuses p = Pₙx as values. This mixer is the
unconstrained member of that family, for ablations: the same shared projection
p = Pₙ x (dimension k), but a **general** (not symmetric) core Cₙ,

    Uₙ = Pₙᵀ Cₙ Pₙ,   rᵢⱼ = pᵢᵀ Cₙ pⱼ,   out = softmax(r) (Vₙ x),

with values through their own projection Vₙ. ``rank=None`` stores Cₙ as a full k × k matrix
(k² parameters per head); ``rank=r`` factors it as Cₙ = AₙBₙᵀ with Aₙ, Bₙ ∈ R^{k×r}
(2kr parameters per head), so rank(Uₙ) <= r. Either way it is one kernel call on
(q = pCₙ or pAₙ, k = p or pBₙ, v = Vₙx), so every registered kernel, ``causal=True`` and
key padding masks work. Scores are scaled by the kernel's own convention (1/√D for the
softmax kernel, with D = k for the full core and D = r for the factored one).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn

from formerlab.errors import check_positive_int
from formerlab.mixers.base import TokenMixer
from formerlab.mixers.metric import build_kernel, resolve_head_dim
from formerlab.mixers.registry import register
from formerlab.mixers.self_attention import merge_heads, split_heads
from formerlab.mixers.short_conv import checked_window, convolve_padded, optional_short_conv
from formerlab.mixers.streaming import (
    attend,
    attend_step,
    check_rope,
    kernel_packs,
    kernel_streams,
    new_attention_state,
    with_window,
)


class QuadraticAttention(TokenMixer):
    """General bilinear-form attention: rᵢⱼ = pᵢᵀCₙpⱼ, values from their own projection.

    Args:
        dim: model width C.
        heads: number of heads H.
        head_dim: size k of the shared projection p and of the values (default dim // heads).
        rank: ``None`` for a full k × k core Cₙ, or r for the factored Cₙ = AₙBₙᵀ.
        kernel: registered attention-kernel name; ``kernel_options`` go to it.
        proj_bias: bias on the projections P and V.
        rope: rotate the kernel's queries and keys by position (rotary embeddings).
        conv: taps of a short causal convolution over p and the values (SiLU) before the
            scores; 0 for none (as the ``attention`` mixer's ``conv``).

    The core starts at the identity (full) or at the rank-r truncated identity
    Aₙ = Bₙ = I[:, :r] (factored), i.e. at tied query/key attention; training is free
    to make it non-symmetric.
    """

    name = "quadratic"

    def __init__(
        self,
        dim: int,
        heads: int = 4,
        head_dim: int | None = None,
        rank: int | None = None,
        kernel: str = "softmax",
        proj_bias: bool = False,
        rope: bool = False,
        conv: int = 0,
        **kernel_options: Any,
    ) -> None:
        super().__init__(dim)
        self.head_dim = k = resolve_head_dim(dim, heads, head_dim)
        self.heads = heads
        if rank is not None:
            check_positive_int("rank", rank)
            if rank > k:
                raise ValueError(
                    f"rank={rank} is not allowed; expected an integer in [1, head_dim={k}]"
                )
        self.rank = rank
        self.rope = check_rope(rope, k if rank is None else rank)
        self.proj = nn.Linear(dim, heads * k, bias=proj_bias)
        self.value = nn.Linear(dim, heads * k, bias=proj_bias)
        self.out = nn.Linear(heads * k, dim)
        self.conv = optional_short_conv(conv, 2 * heads * k)
        self.kernel = build_kernel(
            "quadratic", ["head_dim", "rank", "kernel", "proj_bias", "rope", "conv"], kernel,
            kernel_options,
        )
        if rank is None:
            self.core = nn.Parameter(torch.eye(k).repeat(heads, 1, 1))
        else:
            start = torch.eye(k)[:, :rank].repeat(heads, 1, 1)
            self.left = nn.Parameter(start.clone())
            self.right = nn.Parameter(start.clone())

    @property
    def supports_causal(self) -> bool:
        return self.kernel.supports_causal

    def packs(self, causal: bool) -> bool:
        """Packed sequences (``cu_seqlens``) wherever the kernel takes them."""
        return (self.supports_causal or not causal) and kernel_packs(self.kernel, causal)

    def core_matrix(self) -> Tensor:
        """Cₙ for every head, shape (H, k, k) (rank <= ``rank`` when factored)."""
        if self.rank is None:
            return self.core
        return self.left @ self.right.transpose(-1, -2)

    @property
    def supports_streaming(self) -> bool:
        return self.supports_causal and kernel_streams(self.kernel)

    def qkv_heads(
        self, x: Tensor, attention_mask: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """x (B, N, C) -> the kernel's per-head queries, keys and values."""
        return self._project(x, attention_mask, None)[0]

    def _project(
        self, x: Tensor, attention_mask: Tensor | None, window: Tensor | None
    ) -> tuple[tuple[Tensor, Tensor, Tensor], Tensor | None]:
        """:meth:`qkv_heads` after the convolution window ``window`` (None: zeros), and
        the convolution's new window (None without one)."""
        pv = torch.cat([self.proj(x), self.value(x)], dim=-1)
        pv, window = convolve_padded(self.conv, pv, attention_mask, window)
        p, v = pv.chunk(2, dim=-1)
        p, v = split_heads(p, self.heads), split_heads(v, self.heads)
        if self.rank is None:
            return (p @ self.core.to(p.dtype), p, v), window
        # never form the k × k core: the kernel works in the rank-r space
        return (p @ self.left.to(p.dtype), p @ self.right.to(p.dtype), v), window

    def mix(self, x: Tensor, attention_mask: Tensor | None, causal: bool) -> Tensor:
        heads = self.qkv_heads(x, attention_mask)
        out = attend(self.kernel, *heads, attention_mask, causal, self.rope)
        return self.out(merge_heads(out))

    def new_state(self, batch: int, dtype: torch.dtype, device: Any):
        qk = self.head_dim if self.rank is None else self.rank
        state = new_attention_state(
            self.kernel, batch, self.heads, qk, self.head_dim, dtype, device
        )
        return with_window(state, self.conv, batch, dtype, device)

    def step_mix(self, x: Tensor, state, attention_mask: Tensor | None = None):
        window = checked_window(state, self.conv, f"token mixer 'quadratic' ({self.extra_repr()})")
        heads, window = self._project(x, attention_mask, window)
        out, state = attend_step(self.kernel, *heads, state, self.rope, attention_mask)
        return self.out(merge_heads(out)), replace(state, window=window)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, heads={self.heads}, head_dim={self.head_dim}, rank={self.rank}"


register(
    "quadratic",
    causal=True,
    complexity="O(N²·k) time with the softmax kernel (one kernel call)",
    description="general bilinear-form attention pᵢᵀCpⱼ, C full or low-rank (option: rank=), "
    "values via their own projection",
)(QuadraticAttention)
