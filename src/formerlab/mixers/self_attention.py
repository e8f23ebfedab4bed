"""Multi-head self-attention with a pluggable attention kernel."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from formerlab import attention
from formerlab.attention.packed_qkv import packed_buffer
from formerlab.errors import check_positive_int
from formerlab.mixers.base import TokenMixer
from formerlab.mixers.registry import register
from formerlab.mixers.streaming import (
    attend,
    attend_step,
    check_rope,
    kernel_packs,
    kernel_streams,
    new_attention_state,
)


def split_heads(x: Tensor, heads: int) -> Tensor:
    """(B, N, H·D) -> (B, H, N, D)."""
    b, n, _ = x.shape
    return x.view(b, n, heads, -1).transpose(1, 2)


#: from this many elements per head (N·D) the gradient is copied head by head: at
#: N = 8192, D = 64 that measured 6.2 instead of 8.3 ms for q, k, v (1 thread)
_PER_HEAD_COPY = 1 << 16


class _SplitQKV(torch.autograd.Function):
    """(B, N, 3·H·D) -> per-head q, k, v (B, H, N, D) views; the backward writes the three
    gradients straight into one (B, N, 3, H, D) buffer. Autograd's own chunk backward
    first copies each (B, H, N, D) gradient to (B, N, H·D) and then concatenates (one
    pass more): at N = 8192, H·D = 256 that measured 8 ms of a 350 ms Nyström step.
    Gradients that already are that buffer's views (a kernel that writes them so,
    :mod:`formerlab.attention.packed_qkv`) are passed on without a copy."""

    @staticmethod
    def forward(ctx, qkv: Tensor, heads: int):
        ctx.shape, ctx.heads = qkv.shape, heads
        return tuple(split_heads(t, heads) for t in qkv.chunk(3, dim=-1))

    @staticmethod
    def backward(ctx, *grads):
        given = [g for g in grads if g is not None]
        if not given:
            return None, None
        packed = packed_buffer(*grads)  # the kernel wrote them in this layout: no copy
        if packed is not None and packed.shape == ctx.shape:
            return packed, None
        b, n, c3 = ctx.shape
        shape = (b, n, 3, ctx.heads, c3 // (3 * ctx.heads))
        # an unused one of q, k, v has no gradient: its block stays zero
        out = given[0].new_empty(shape) if len(given) == 3 else given[0].new_zeros(shape)
        for i, g in enumerate(grads):
            if g is None:
                continue
            if n * shape[-1] >= _PER_HEAD_COPY:  # one (N, D) block per head
                for h in range(ctx.heads):
                    out[:, :, i, h].copy_(g[:, h])
            else:
                out[:, :, i].copy_(g.transpose(1, 2))
        return out.view(b, n, c3), None


def _hooked(module: nn.Module) -> bool:
    """Whether forward hooks (the module's own or global ones) expect its forward to run."""
    glob = torch.nn.modules.module
    return bool(module._forward_hooks or module._forward_pre_hooks
                or glob._global_forward_hooks or glob._global_forward_pre_hooks)


def merge_heads(x: Tensor) -> Tensor:
    """(B, H, N, D) -> (B, N, H·D)."""
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


class SelfAttention(TokenMixer):
    """Project to per-head q, k, v; run ``kernel``; merge heads; project back.

    ``kernel`` is a registered attention-kernel name; ``kernel_options`` go to it
    (e.g. ``SelfAttention(128, 4, kernel="nystrom", num_landmarks=32)``).
    ``rope=True`` rotates q and k by their positions (rotary embeddings, see
    ``formerlab.mixers.streaming``); ``init_state`` / ``step`` stream through the kernel's
    state when the kernel has one.
    """

    name = "attention"

    def __init__(
        self,
        dim: int,
        heads: int = 4,
        kernel: str = "softmax",
        head_dim: int | None = None,
        qkv_bias: bool = False,
        rope: bool = False,
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
        self.rope = check_rope(rope, head_dim)
        self.qkv = nn.Linear(dim, 3 * heads * head_dim, bias=qkv_bias)
        self.out = nn.Linear(heads * head_dim, dim)
        self.kernel = attention.build(kernel, **kernel_options)

    @property
    def supports_causal(self) -> bool:
        return self.kernel.supports_causal

    def packs(self, causal: bool) -> bool:
        """Packed sequences (``cu_seqlens``) wherever the kernel takes them."""
        return (self.supports_causal or not causal) and kernel_packs(self.kernel, causal)

    @property
    def supports_streaming(self) -> bool:
        return self.supports_causal and kernel_streams(self.kernel)

    def qkv_heads(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x (B, N, C) -> per-head q, k, v (B, H, N, D)."""
        qkv = self.qkv(x)
        if torch.compiler.is_compiling():  # the traced graph fuses the copies itself
            return tuple(split_heads(t, self.heads) for t in qkv.chunk(3, dim=-1))
        return _SplitQKV.apply(qkv, self.heads)

    def mix(self, x: Tensor, attention_mask: Tensor | None, causal: bool) -> Tensor:
        if attention_mask is None and not causal and self._projection_fusable(x):
            out = self.kernel.attend_projected(x, self.qkv.weight, self.qkv.bias, self.heads)
        else:
            out = attend(self.kernel, *self.qkv_heads(x), attention_mask, causal, self.rope)
        return self.out(merge_heads(out))

    def _projection_fusable(self, x: Tensor) -> bool:
        """Whether the kernel may take x and the qkv weights instead of q, k, v (e.g.
        Nyström: six of its twelve large products fewer). Not with rotary embeddings
        (q and k are rotated per position) or a replaced or hooked projection, whose own
        forward must run (as must a hooked kernel's)."""
        qkv = self.qkv
        plain = type(qkv) is nn.Linear and not (_hooked(qkv) or _hooked(self.kernel))
        return plain and not self.rope and self.kernel.fuses_projection(x, qkv.weight, self.heads)

    def new_state(self, batch: int, dtype: torch.dtype, device: Any):
        d = self.head_dim
        return new_attention_state(self.kernel, batch, self.heads, d, d, dtype, device)

    def step_mix(self, x: Tensor, state, attention_mask: Tensor | None = None):
        out, state = attend_step(
            self.kernel, *self.qkv_heads(x), state, self.rope, attention_mask
        )
        return self.out(merge_heads(out)), state

    def extra_repr(self) -> str:
        rope = ", rope=True" if self.rope else ""
        return f"dim={self.dim}, heads={self.heads}, head_dim={self.head_dim}{rope}"


register(
    "attention",
    causal=True,
    description="multi-head self-attention with any registered kernel (option: kernel=...)",
)(SelfAttention)
