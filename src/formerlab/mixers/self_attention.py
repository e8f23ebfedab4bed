"""Multi-head self-attention with a pluggable attention kernel.

``conv=c`` (c >= 2) puts a short causal depthwise convolution (``c`` taps, SiLU; the one
of the DeltaNet and Mamba-2 layers, :mod:`formerlab.mixers.short_conv`) between the q, k,
v projection and the kernel, so each query, key and value also sees the ``c - 1`` tokens
before it. The recurrent mixers have it by design; given to attention it makes token
mixers with and without it comparable, and it lets two-layer models learn recall tasks
in far fewer steps (an induction head no longer has to be learned across two layers:
the key of the previous token is already in each value). Streaming keeps the last
``c - 1`` projected inputs in the state; padded tokens enter the convolution as zeros, so
padding and packing stay exact.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn

from formerlab import attention
from formerlab.attention.packed import Packing
from formerlab.attention.packed_qkv import packed_buffer
from formerlab.errors import check_positive_int
from formerlab.mixers.base import TokenMixer
from formerlab.mixers.registry import register
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
    ``formerlab.mixers.streaming``); ``conv=c`` convolves the projected q, k, v over the
    last ``c`` tokens first (module docstring); ``init_state`` / ``step`` stream through
    the kernel's state when the kernel has one.
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
        conv: int = 0,
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
        self.conv = optional_short_conv(conv, 3 * heads * head_dim)
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

    def qkv_heads(
        self, x: Tensor, attention_mask: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """x (B, N, C) -> per-head q, k, v (B, H, N, D) (a new sequence: the convolution,
        if any, starts from zeros; padded tokens enter it as zeros)."""
        return self._project(x, attention_mask, None)[0]

    def _project(
        self, x: Tensor, attention_mask: Tensor | None, window: Tensor | None
    ) -> tuple[tuple[Tensor, Tensor, Tensor], Tensor | None]:
        """:meth:`qkv_heads` after the convolution window ``window`` (the projected inputs
        before ``x``; None: zeros), and the new window (None without a convolution)."""
        qkv, window = convolve_padded(self.conv, self.qkv(x), attention_mask, window)
        if torch.compiler.is_compiling():  # the traced graph fuses the copies itself
            return tuple(split_heads(t, self.heads) for t in qkv.chunk(3, dim=-1)), window
        return _SplitQKV.apply(qkv, self.heads), window

    def mix(self, x: Tensor, attention_mask: Tensor | None, causal: bool) -> Tensor:
        if attention_mask is None and not causal and self._projection_fusable(x):
            out = self.kernel.attend_projected(x, self.qkv.weight, self.qkv.bias, self.heads)
        else:
            heads = self.qkv_heads(x, attention_mask)
            out = attend(self.kernel, *heads, attention_mask, causal, self.rope)
        return self.out(merge_heads(out))

    def mix_packed(self, x: Tensor, packing: Packing, causal: bool) -> Tensor:
        """Packed sequences: the projections run on the N real tokens only; q, k, v are
        padded per sequence for the kernel (and the convolution, which must not reach
        across a boundary) and its output is packed again before the output projection."""
        mask = packing.mask()
        qkv, _ = convolve_padded(self.conv, packing.pad(self.qkv(x), 1), mask, None)  # (S, L, 3·H·D)
        heads = tuple(split_heads(t, self.heads) for t in qkv.chunk(3, dim=-1))
        out = attend(self.kernel, *heads, mask, causal, self.rope)
        return self.out(packing.unpad(merge_heads(out), 1))

    def _projection_fusable(self, x: Tensor) -> bool:
        """Whether the kernel may take x and the qkv weights instead of q, k, v (e.g.
        Nyström: six of its twelve large products fewer). Not with rotary embeddings
        (q and k are rotated per position) or a replaced or hooked projection, whose own
        forward must run (as must a hooked kernel's)."""
        qkv = self.qkv
        plain = type(qkv) is nn.Linear and not (_hooked(qkv) or _hooked(self.kernel))
        plain = plain and self.conv is None and not self.rope
        return plain and self.kernel.fuses_projection(x, qkv.weight, self.heads)

    def new_state(self, batch: int, dtype: torch.dtype, device: Any):
        d = self.head_dim
        state = new_attention_state(self.kernel, batch, self.heads, d, d, dtype, device)
        return with_window(state, self.conv, batch, dtype, device)

    def step_mix(self, x: Tensor, state, attention_mask: Tensor | None = None):
        window = checked_window(state, self.conv, f"this attention mixer ({self.extra_repr()})")
        heads, window = self._project(x, attention_mask, window)
        out, state = attend_step(self.kernel, *heads, state, self.rope, attention_mask)
        return self.out(merge_heads(out)), replace(state, window=window)

    def extra_repr(self) -> str:
        rope = ", rope=True" if self.rope else ""
        conv = f", conv={self.conv.size}" if self.conv is not None else ""
        return f"dim={self.dim}, heads={self.heads}, head_dim={self.head_dim}{rope}{conv}"



register(
    "attention",
    causal=True,
    description="multi-head self-attention with any registered kernel (option: kernel=...)",
)(SelfAttention)
