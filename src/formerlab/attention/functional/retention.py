"""Retention (RetNet): linear attention with a fixed exponential decay per head.

Sun et al., 2023, "Retentive Network: A Successor to Transformer for Large Language
Models" (arXiv:2307.08621), Eq. (7)-(8) with the multi-scale decay of Sec. 2.2: head
``h = 0 .. H-1`` decays its state by ``gamma_h = 1 - 2^(-5-h)`` per token,

.. math::

    S_t = \\gamma_h S_{t-1} + k_t v_t^\\top, \\qquad o_t = \\text{scale} \\cdot S_t^\\top q_t.

This is simple GLA with ``g_gamma = log(gamma)`` (as in fla), so both ops delegate to
:mod:`formerlab.attention.functional.gla`.
"""

from __future__ import annotations

import torch

from formerlab.attention.functional._common import DEFAULT_CHUNK_SIZE, check_qkv, work_dtype
from formerlab.attention.functional.gla import chunk_simple_gla, fused_recurrent_simple_gla


def retention_log_decay(
    num_heads: int, dtype: torch.dtype = torch.float64, device: torch.device | str | None = None
) -> torch.Tensor:
    """RetNet's per-head log decay ``log(1 - 2^(-5-h))``, ``h = 0 .. num_heads-1``, ``[H]``.

    Computed in float64 with ``log1p`` (exact to rounding) and then cast to ``dtype``.
    """
    heads = torch.arange(num_heads, dtype=torch.float64, device=device)
    return torch.log1p(-torch.exp2(-5.0 - heads)).to(dtype)


def _log_decay_like(q, k, v, initial_state) -> torch.Tensor:
    """The log decay in the dtype the op computes in (so it never promotes the inputs)."""
    state = initial_state if isinstance(initial_state, torch.Tensor) else None
    return retention_log_decay(q.shape[2], work_dtype(q, k, v, state), q.device)


def chunk_retention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Retention, chunked-parallel form (fla's ``chunk_retention``).

    Args:
        q: queries ``[B, T, H, K]``.
        k: keys ``[B, T, H, K]``.
        v: values ``[B, T, H, V]``.
        scale: score scale; ``None`` means ``K ** -0.5``.
        initial_state: ``[N, H, K, V]``, ``N = B`` or the number of ``cu_seqlens``
            sequences; ``None`` is a zero state.
        output_final_state: whether to return the final state ``[N, H, K, V]``.
        cu_seqlens: offsets ``[S + 1]`` of sequences packed along ``T`` (needs ``B = 1``).
        chunk_size: chunk length, a power of two (fla's keyword, default 64).

    Returns:
        ``(o, final_state)``: ``o`` ``[B, T, H, V]`` in the dtype of ``v``; the final state
        (float64 for float64 inputs, else float32) or ``None``.

    Raises:
        ValueError: on a bad argument, naming it.
    """
    check_qkv(q, k, v)
    return chunk_simple_gla(
        q,
        k,
        v,
        g_gamma=_log_decay_like(q, k, v, initial_state),
        scale=scale,
        initial_state=initial_state,
        output_final_state=output_final_state,
        cu_seqlens=cu_seqlens,
        chunk_size=chunk_size,
    )


def fused_recurrent_retention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    reverse: bool = False,
    state_v_first: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Retention, token-by-token recurrence (fla's ``fused_recurrent_retention``).

    The reference for :func:`chunk_retention` and the streaming step.

    Args:
        q, k, v, scale, initial_state, output_final_state, cu_seqlens: as in
            :func:`chunk_retention`.
        reverse: run the recurrence from the last token to the first.
        state_v_first: states in ``[N, H, V, K]`` layout instead of ``[N, H, K, V]``.

    Returns:
        ``(o, final_state)`` as in :func:`chunk_retention`.

    Raises:
        ValueError: on a bad argument, naming it.
    """
    check_qkv(q, k, v)
    return fused_recurrent_simple_gla(
        q,
        k,
        v,
        g_gamma=_log_decay_like(q, k, v, initial_state),
        scale=scale,
        initial_state=initial_state,
        output_final_state=output_final_state,
        reverse=reverse,
        state_v_first=state_v_first,
        cu_seqlens=cu_seqlens,
    )
