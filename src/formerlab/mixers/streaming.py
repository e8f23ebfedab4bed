"""What the kernel-based mixers (attention, metric, quadratic) share: one kernel call on
per-head (q, k, v), in parallel or as a streaming step, with optional rotary positions.

Rotary embeddings (Su et al., 2021, "RoFormer") rotate the q and k handed to the kernel by
their absolute positions, before any feature map (``formerlab.attention.rope`` says what
that means for each kernel: exact relative positions for softmax / causal_nystrom, in
expectation for performer, a valid non-negative kernel for linear). A streaming step
continues the positions of its stream, so stepping equals the parallel call.

Padding. With an ``attention_mask`` (bool (B, N), True = real token) positions count from
each row's first real token (:func:`row_positions`): a left-padded row is rotated exactly
as the row alone (and the learned positions of :mod:`formerlab.models.embedding` use the
same count). A streaming step with a mask continues each row's count
(:func:`advance_positions`) and hands the mask to the kernel's step, which gives the
parallel call with the same mask (:mod:`formerlab.attention.streaming`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

from formerlab.attention.rope import apply_rope


@dataclass
class AttentionMixerState:
    """Streaming state of a kernel-based mixer: the kernel's own state and the number of
    tokens consumed so far (the position of the next token, the rotary offset).

    ``lead`` (B,), once a step has had an ``attention_mask``: each row's first real
    position (``position`` for a row without one yet); the row's rotary positions count
    from it. None: every row started at 0.

    ``window`` (B, c - 1, 3·H·D): the last projected q, k, v inputs of a mixer with a
    short convolution (``conv=c``); None without one."""

    kernel: Any
    position: int = 0
    lead: Tensor | None = None
    window: Tensor | None = None


def row_positions(attention_mask: Tensor) -> Tensor:
    """(B, N) positions counted from each row's first real token (negative before it):
    ``arange(N) - leading padding`` for ``attention_mask`` bool (B, N)."""
    n = attention_mask.shape[1]
    lead = attention_mask.to(torch.uint8).argmax(dim=1)  # the first maximum: leading padding
    return torch.arange(n, device=attention_mask.device)[None, :] - lead[:, None]


def advance_positions(
    lead: Tensor | None, position: int, attention_mask: Tensor | None, batch: int,
    tokens: int, device: Any,
) -> tuple[Tensor | None, Tensor | None]:
    """``(lead, positions)`` of a streaming step of ``tokens`` new tokens at ``position``.

    ``lead`` (B,): each row's first real position, ``position`` for a row that has none
    yet (None: every row started at 0); ``positions`` (B, T) of the new tokens, counted
    from it. Both None while no mask was given (the positions are ``position + i``).
    """
    if lead is None and attention_mask is None:
        return None, None
    if lead is None:
        lead = torch.zeros(batch, dtype=torch.long, device=device)
    if attention_mask is not None:
        first = attention_mask.to(torch.uint8).argmax(dim=1)
        first = torch.where(attention_mask.any(dim=1), first, tokens)
        lead = torch.where(lead == position, position + first, lead)
    steps = torch.arange(position, position + tokens, device=device)
    return lead, steps[None, :] - lead[:, None]


def kernel_streams(kernel: Any) -> bool:
    """Whether an attention kernel offers ``init_state`` / ``step`` for causal decoding."""
    flag = getattr(kernel, "supports_streaming", None)
    if flag is not None:
        return bool(flag) and bool(getattr(kernel, "supports_causal", False))
    return hasattr(kernel, "init_state") and hasattr(kernel, "step")


def kernel_packs(kernel: Any, causal: bool) -> bool:
    """Whether an attention kernel takes packed sequences (``cu_seqlens``) in a call with
    this ``causal`` flag (False for a kernel that does not say)."""
    packs = getattr(kernel, "packs", None)
    return bool(packs(causal)) if callable(packs) else False


def rotate(q: Tensor, k: Tensor, start: int | Tensor) -> tuple[Tensor, Tensor]:
    """q, k (B, H, T, D) rotated for positions ``start … start + T − 1`` (or for the
    positions in ``start``, a (B, T) tensor)."""
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
    """The parallel kernel call, positions 0 … N − 1 (with a mask: counted from each
    row's first real token)."""
    if rope:
        start = 0 if attention_mask is None else row_positions(attention_mask)
        q, k = rotate(q, k, start)
    return kernel(q, k, v, attention_mask=attention_mask, causal=causal)


def attend_step(
    kernel: Any, q: Tensor, k: Tensor, v: Tensor, state: AttentionMixerState, rope: bool,
    attention_mask: Tensor | None = None,
) -> tuple[Tensor, AttentionMixerState]:
    """One streaming kernel step on the next T tokens; positions continue the stream.
    ``attention_mask`` (B, T), True = real: as the parallel call with the same mask."""
    b, _, t, _ = q.shape
    lead, positions = advance_positions(
        state.lead, state.position, attention_mask, b, t, q.device
    )
    if rope:
        q, k = rotate(q, k, state.position if positions is None else positions)
    if attention_mask is None:  # kernels outside the registry may not take the argument
        out, kernel_state = kernel.step(q, k, v, state.kernel)
    else:
        out, kernel_state = kernel.step(q, k, v, state.kernel, attention_mask=attention_mask)
    return out, AttentionMixerState(kernel_state, state.position + t, lead)


def with_window(
    state: AttentionMixerState, conv: Any, batch: int, dtype: torch.dtype, device: Any
) -> AttentionMixerState:
    """``state`` with the empty window of a mixer's short convolution ``conv`` (a
    :class:`~formerlab.mixers.short_conv.ShortConv`; None: ``state`` as it is)."""
    if conv is None:
        return state
    return replace(state, window=conv.empty_window(batch, dtype, device))


def new_attention_state(
    kernel: Any, batch: int, heads: int, head_dim: int, value_dim: int,
    dtype: torch.dtype, device: Any,
) -> AttentionMixerState:
    """An empty stream for ``kernel`` with q/k size ``head_dim`` and values ``value_dim``."""
    state = kernel.init_state(
        batch, heads, head_dim, dtype=dtype, device=device, value_dim=value_dim
    )
    return AttentionMixerState(state, 0)
