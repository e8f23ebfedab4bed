"""Multi-head self-attention with a pluggable attention kernel."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from formerlab import attention
from formerlab.errors import check_positive_int
from formerlab.mixers.base import TokenMixer
from formerlab.mixers.registry import register


def split_heads(x: Tensor, heads: int) -> Tensor:
    """(B, N, H·D) -> (B, H, N, D)."""
    b, n, _ = x.shape
    return x.view(b, n, heads, -1).transpose(1, 2)


def merge_heads(x: Tensor) -> Tensor:
    """(B, H, N, D) -> (B, N, H·D)."""
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


class SelfAttention(TokenMixer):
    """Project to per-head q, k, v; run ``kernel``; merge heads; project back.

    ``kernel`` is a registered attention-kernel name; ``kernel_options`` go to it
    (e.g. ``SelfAttention(128, 4, kernel="nystrom", num_landmarks=32)``).
    """

    name = "attention"

    def __init__(
        self,
        dim: int,
        heads: int = 4,
        kernel: str = "softmax",
        head_dim: int | None = None,
        qkv_bias: bool = False,
        **kernel_options: Any,
    ) -> None:
        super().__init__(dim)
        check_positive_int("heads", heads)
        if head_dim is None:
            if dim % heads:
                raise ValueError(f"dim={dim} must be divisible by heads={heads}")
            head_dim = dim // heads
        check_positive_int("head_dim", head_dim)
        self.heads, self.head_dim = heads, head_dim
        self.qkv = nn.Linear(dim, 3 * heads * head_dim, bias=qkv_bias)
        self.out = nn.Linear(heads * head_dim, dim)
        self.kernel = attention.build(kernel, **kernel_options)

    @property
    def supports_causal(self) -> bool:
        return self.kernel.supports_causal

    def mix(self, x: Tensor, key_padding_mask: Tensor | None, causal: bool) -> Tensor:
        q, k, v = (split_heads(t, self.heads) for t in self.qkv(x).chunk(3, dim=-1))
        out = self.kernel(q, k, v, key_padding_mask=key_padding_mask, causal=causal)
        return self.out(merge_heads(out))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, heads={self.heads}, head_dim={self.head_dim}"


register(
    "attention",
    causal=True,
    description="multi-head self-attention with any registered kernel (option: kernel=...)",
)(SelfAttention)
