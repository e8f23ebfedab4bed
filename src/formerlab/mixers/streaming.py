"""What the kernel-based mixers (attention, metric, quadratic) share: one kernel call on
per-head (q, k, v), in parallel or as a streaming step, with optional rotary positions.

Rotary embeddings (Su et al., 2021, "RoFormer") rotate the q and k handed to the kernel by
their absolute positions, before any feature map (``formerlab.attention.rope`` says what
that means for each kernel: exact relative positions for softmax / causal_nystrom, in
expectation for performer, a valid non-negative kernel for linear). A streaming step
continues the positions of its stream, so stepping equals the parallel call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from formerlab.attention.rope import apply_rope


@dataclass
class AttentionMixerState:
    """Streaming state of a kernel-based mixer: the kernel's own state and the number of
    tokens consumed so far (the position of the next token, the rotary offset)."""

    kernel: Any
    position: int = 0


def kernel_streams(kernel: Any) -> bool:
    """Whether an attention kernel offers ``init_state`` / ``step`` for causal decoding."""
    flag = getattr(kernel, "supports_streaming", None)
    if flag is not None:
        return bool(flag) and bool(getattr(kernel, "supports_causal", False))
    return hasattr(kernel, "init_state") and hasattr(kernel, "step")


def rotate(q: Tensor, k: Tensor, start: int) -> tuple[Tensor, Tensor]:
    """q, k (B, H, T, D) rotated for positions ``start … start + T − 1``."""
    return apply_rope(q, start), apply_rope(k, start)


def check_rope(rope: Any, *dims: int) -> bool:
    """``rope`` as a bool; rotary pairs features, so every rotated size must be even."""
    if not isinstance(rope, bool):
        raise ValueError(f"rope={rope!r} is not allowed; expected True or False")
    odd = [d for d in dims if d % 2]
    if rope and odd:
        raise ValueError(
            f"rope=True rotates feature pairs, so q/k sizes must be even; got {sorted(set(odd))}"
        )
    return rope


def attend(
    kernel: Any, q: Tensor, k: Tensor, v: Tensor, attention_mask: Tensor | None,
    causal: bool, rope: bool,
) -> Tensor:
    """The parallel kernel call, positions 0 … N − 1."""
    if rope:
        q, k = rotate(q, k, 0)
    return kernel(q, k, v, attention_mask=attention_mask, causal=causal)


def attend_step(
    kernel: Any, q: Tensor, k: Tensor, v: Tensor, state: AttentionMixerState, rope: bool
) -> tuple[Tensor, AttentionMixerState]:
    """One streaming kernel step on the next T tokens; positions continue the stream."""
    if rope:
        q, k = rotate(q, k, state.position)
    out, kernel_state = kernel.step(q, k, v, state.kernel)
    return out, AttentionMixerState(kernel_state, state.position + q.shape[-2])


def new_attention_state(
    kernel: Any, batch: int, heads: int, head_dim: int, value_dim: int,
    dtype: torch.dtype, device: Any,
) -> AttentionMixerState:
    """An empty stream for ``kernel`` with q/k size ``head_dim`` and values ``value_dim``."""
    state = kernel.init_state(
        batch, heads, head_dim, dtype=dtype, device=device, value_dim=value_dim
    )
    return AttentionMixerState(state, 0)
