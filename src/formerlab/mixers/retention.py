"""Multi-scale retention, the token mixer of RetNet.

Sun et al., 2023, "Retentive Network: A Successor to Transformer for Large Language
Models" (arXiv:2307.08621), Sections 2.1-2.2. Each head ``h`` keeps a ``[d_k, d_v]``
state that decays by the fixed ``γ_h = 1 - 2^(-5-h)`` per token,

    S_t = γ_h S_{t-1} + k_t v_tᵀ,      o_t = S_tᵀ q_t / sqrt(d_k),

with ``q = x W_Q`` and ``k = x W_K`` rotated by their positions (RetNet's ``e^{inθ}``,
here the rotary embedding of :mod:`formerlab.attention.rope`) and ``v = x W_V``. The heads
are normalised separately (GroupNorm with one group per head) and gated,

    MSR(x) = (swish(x W_G) ⊙ GroupNorm_h(o)) W_O.

The recurrence is :func:`~formerlab.attention.functional.chunk_simple_gla` with the log
decays of :func:`~formerlab.attention.functional.retention_log_decay` (the op behind
``chunk_retention``), whose per-token form lets a padded token keep the state unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from formerlab.attention.functional import (
    chunk_simple_gla,
    fused_recurrent_simple_gla,
    retention_log_decay,
)
from formerlab.attention.rope import apply_rope
from formerlab.errors import check_positive_int
from formerlab.linalg.numerics import autocast_off, compute_dtype
from formerlab.mixers.base import zero_padded
from formerlab.mixers.recurrent import (
    NORM_EPS,
    RecurrentMixer,
    RecurrentState,
    check_chunk_size,
    check_expand,
    silu_gate,
)
from formerlab.mixers.registry import register
from formerlab.mixers.short_conv import optional_short_conv
from formerlab.mixers.streaming import advance_positions, check_rope, row_positions


class Retention(RecurrentMixer):
    """Multi-scale retention (RetNet; Sun et al., 2023): a fixed decay per head, rotary
    positions, per-head GroupNorm and a swish output gate. Causal-only; streams with a
    ``[d_k, d_v]`` state per head.

    Parameters: ``W_Q, W_K`` (``dim × dim·expand_k``), ``W_V, W_G`` (``dim × dim·expand_v``),
    ``W_O`` (``dim·expand_v × dim``), none with a bias, and the GroupNorm's weight and bias
    (``dim·expand_v`` each).

    Args:
        dim: model width.
        heads: number of heads; head ``h`` decays by ``1 - 2^(-5-h)`` per token.
        expand_k: query/key width as a multiple of ``dim`` (RetNet: 1).
        expand_v: value width as a multiple of ``dim`` (RetNet: 2).
        rope: rotate queries and keys by their positions (RetNet's relative position
            factor ``e^{i(n-m)θ}``); positions count from each row's first real token.
        chunk_size: chunk length of the chunked-parallel op (a power of two); changes
            only speed and rounding.
        conv: taps of a short causal convolution over q, k, v (SiLU) after their
            projections; 0 (RetNet) for none. An option of fla's retention layer
            (``use_short_conv``); the state then also keeps the last ``conv - 1`` inputs.
    """

    name = "retention"

    def __init__(
        self,
        dim: int,
        heads: int = 4,
        expand_k: float = 1.0,
        expand_v: float = 2.0,
        rope: bool = True,
        chunk_size: int = 64,
        conv: int = 0,
    ) -> None:
        super().__init__(check_positive_int("dim", dim))
        self.heads = check_positive_int("heads", heads)
        self.key_dim, self.head_k = check_expand("expand_k", expand_k, dim, heads)
        self.value_dim, self.head_v = check_expand("expand_v", expand_v, dim, heads)
        self.rope = check_rope(rope, self.head_k)
        self.chunk_size = check_chunk_size(chunk_size)
        self.q = nn.Linear(dim, self.key_dim, bias=False)
        self.k = nn.Linear(dim, self.key_dim, bias=False)
        self.v = nn.Linear(dim, self.value_dim, bias=False)
        self.gate = nn.Linear(dim, self.value_dim, bias=False)
        self.norm = nn.GroupNorm(heads, self.value_dim, eps=NORM_EPS)
        self.out = nn.Linear(self.value_dim, dim, bias=False)
        self.conv = optional_short_conv(conv, 2 * self.key_dim + self.value_dim)

    def memory_shape(self) -> tuple[int, ...]:
        return (self.heads, self.head_k, self.head_v)

    def run(
        self, x: Tensor, real: Tensor | None, state: RecurrentState | None
    ) -> tuple[Tensor, RecurrentState | None]:
        b, t, _ = x.shape
        work = compute_dtype(x.dtype)
        q, k, v = (p(x).to(work) for p in (self.q, self.k, self.v))
        gate = self.gate(x).to(work)
        with autocast_off(x.device):
            (q, k, v), window = self.convolve((q, k, v), real, state)
            q, k = (p.view(b, t, self.heads, self.head_k) for p in (q, k))
            v = v.view(b, t, self.heads, self.head_v)
            positions, lead = self._positions(real, state, b, t, x.device)
            if self.rope:
                q, k = (apply_rope(p.transpose(1, 2), positions).transpose(1, 2) for p in (q, k))
            o, memory = self._retain(q, zero_padded(k, real), zero_padded(v, real), real, state)
            o = self._group_norm(o.reshape(b * t, self.value_dim), work)
            o = silu_gate(o.view(b, t, self.value_dim), gate)
        out = zero_padded(self.out(o.to(x.dtype)), real)
        if state is None:
            return out, None
        return out, RecurrentState(memory, window, state.position + t, lead)

    def _positions(self, real, state, b, t, device):
        """Rotary positions of the new tokens (counted from each row's first real token
        when there is padding) and the stream's ``lead`` after them."""
        if state is None:
            return (0 if real is None else row_positions(real)), None
        lead, positions = advance_positions(state.lead, state.position, real, b, t, device)
        return (state.position if positions is None else positions), lead

    def _retain(self, q, k, v, real, state):
        """The retention recurrence; padded tokens get log decay 0 (the identity)."""
        gamma = retention_log_decay(self.heads, q.dtype, q.device)
        g = None if real is None else zero_padded(gamma.expand(*q.shape[:3]), real)
        decay = {"g": g} if real is not None else {"g_gamma": gamma}
        initial = None if state is None else state.memory
        if self.use_recurrent_op(q, state):
            return fused_recurrent_simple_gla(
                q, k, v, **decay, initial_state=initial, output_final_state=True
            )
        return chunk_simple_gla(
            q,
            k,
            v,
            **decay,
            initial_state=initial,
            output_final_state=state is not None,
            chunk_size=self.chunk_size,
        )

    def _group_norm(self, o: Tensor, work: torch.dtype) -> Tensor:
        """GroupNorm with one group per head, in the compute dtype."""
        weight, bias = self.norm.weight.to(work), self.norm.bias.to(work)
        return F.group_norm(o, self.heads, weight, bias, NORM_EPS)

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, heads={self.heads}, key_dim={self.key_dim}, "
            f"value_dim={self.value_dim}, rope={self.rope}"
            + (f", conv={self.conv.size}" if self.conv is not None else "")
        )


register(
    "retention",
    causal=True,
    complexity="O(N·C·(d_k + d_v) + N·d_k·d_v) per head, chunks of C; state d_k·d_v per head",
    description="RetNet multi-scale retention: fixed decay per head, GroupNorm, swish gate",
    causal_only=True,
)(Retention)
