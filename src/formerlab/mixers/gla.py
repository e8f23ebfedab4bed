"""Gated linear attention (GLA) as a token mixer.

Yang et al., 2024, "Gated Linear Attention Transformers with Hardware-Efficient Training"
(ICML, arXiv:2312.06635), Section 4.1. Each head keeps a ``[d_k, d_v]`` state with a
data-dependent decay per key channel,

    S_t = diag(α_t) S_{t-1} + k_t v_tᵀ,      o_t = S_tᵀ q_t / sqrt(d_k),

    α_t = σ(x_t W_α1 W_α2 + b_α)^(1/τ),      τ = 16,

a low-rank (rank 16) sigmoid gate whose ``1/τ`` power keeps the decays close to 1, computed
as the log decay ``g_t = logsigmoid(x_t W_α1 W_α2 + b_α) / τ``. The output is normalised
per head (RMSNorm here, as in fla's layer; the paper's LayerNorm) and gated,

    GLA(x) = (swish(x W_r) ⊙ RMSNorm_h(o)) W_O.

The recurrence is :func:`~formerlab.attention.functional.chunk_gla` (parallel) and
:func:`~formerlab.attention.functional.fused_recurrent_gla` (short streaming steps).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from formerlab.attention.functional import chunk_gla, fused_recurrent_gla
from formerlab.errors import check_positive_float, check_positive_int
from formerlab.linalg.numerics import autocast_off, compute_dtype
from formerlab.mixers.base import zero_padded
from formerlab.mixers.recurrent import (
    RecurrentMixer,
    RecurrentState,
    check_expand,
    rms_norm,
    silu_gate,
)
from formerlab.mixers.registry import register
from formerlab.mixers.short_conv import optional_short_conv


class GLA(RecurrentMixer):
    """Gated linear attention (Yang et al., 2024): a low-rank log-sigmoid decay per key
    channel, per-head RMSNorm and a swish output gate. Causal-only; streams with a
    ``[d_k, d_v]`` state per head.

    Parameters: ``W_Q, W_K`` (``dim × dim·expand_k``), ``W_V, W_r`` (``dim × dim·expand_v``),
    the gate ``W_α1`` (``dim × gate_rank``) and ``W_α2`` (``gate_rank × dim·expand_k``, with
    the bias ``b_α``), the RMSNorm weight (``d_v``, shared by the heads) and ``W_O``
    (``dim·expand_v × dim``); no other biases.

    Args:
        dim: model width.
        heads: number of heads.
        expand_k: query/key width as a multiple of ``dim`` (GLA: 0.5).
        expand_v: value width as a multiple of ``dim`` (GLA: 1).
        gate_rank: rank of the decay gate's projection (GLA: 16).
        gate_norm: the normaliser ``τ`` of the log decay, ``g = logsigmoid(·) / τ``
            (GLA: 16).
        conv: taps of a short causal convolution over q, k, v (SiLU) after their
            projections; 0 (GLA) for none. An option of fla's GLA layer
            (``use_short_conv``); the state then also keeps the last ``conv - 1`` inputs.
    """

    name = "gla"

    def __init__(
        self,
        dim: int,
        heads: int = 4,
        expand_k: float = 0.5,
        expand_v: float = 1.0,
        gate_rank: int = 16,
        gate_norm: float = 16.0,
        conv: int = 0,
    ) -> None:
        super().__init__(check_positive_int("dim", dim))
        self.heads = check_positive_int("heads", heads)
        self.key_dim, self.head_k = check_expand("expand_k", expand_k, dim, heads)
        self.value_dim, self.head_v = check_expand("expand_v", expand_v, dim, heads)
        self.gate_rank = check_positive_int("gate_rank", gate_rank)
        self.gate_norm = check_positive_float("gate_norm", gate_norm)
        self.q = nn.Linear(dim, self.key_dim, bias=False)
        self.k = nn.Linear(dim, self.key_dim, bias=False)
        self.v = nn.Linear(dim, self.value_dim, bias=False)
        self.decay_down = nn.Linear(dim, gate_rank, bias=False)
        self.decay_up = nn.Linear(gate_rank, self.key_dim, bias=True)
        self.gate = nn.Linear(dim, self.value_dim, bias=False)
        self.norm_weight = nn.Parameter(torch.ones(self.head_v))
        self.out = nn.Linear(self.value_dim, dim, bias=False)
        self.conv = optional_short_conv(conv, 2 * self.key_dim + self.value_dim)

    def memory_shape(self) -> tuple[int, ...]:
        return (self.heads, self.head_k, self.head_v)

    def run(
        self, x: Tensor, real: Tensor | None, state: RecurrentState | None
    ) -> tuple[Tensor, RecurrentState | None]:
        b, t, _ = x.shape
        work = compute_dtype(x.dtype)
        heads_k = (b, t, self.heads, self.head_k)
        q, k, v = (p(x).to(work) for p in (self.q, self.k, self.v))
        logits = self.decay_up(self.decay_down(x)).to(work).view(heads_k)
        gate = self.gate(x).to(work)
        with autocast_off(x.device):
            (q, k, v), window = self.convolve((q, k, v), real, state)
            q, k = q.reshape(heads_k), k.reshape(heads_k)
            v = v.reshape(b, t, self.heads, self.head_v)
            # a padded token: no key/value, log decay 0 (the state passes unchanged)
            g = zero_padded(F.logsigmoid(logits) / self.gate_norm, real)
            k, v = zero_padded(k, real), zero_padded(v, real)
            initial = None if state is None else state.memory
            if self.use_recurrent_op(x, state):
                o, memory = fused_recurrent_gla(
                    q, k, v, gk=g, initial_state=initial, output_final_state=True
                )
            else:
                o, memory = chunk_gla(
                    q, k, v, g, initial_state=initial, output_final_state=state is not None
                )
            o = silu_gate(rms_norm(o, self.norm_weight).reshape(b, t, self.value_dim), gate)
        out = zero_padded(self.out(o.to(x.dtype)), real)
        return out, None if state is None else RecurrentState(memory, window)

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, heads={self.heads}, key_dim={self.key_dim}, "
            f"value_dim={self.value_dim}, gate_rank={self.gate_rank}, gate_norm={self.gate_norm:g}"
            + (f", conv={self.conv.size}" if self.conv is not None else "")
        )


register(
    "gla",
    causal=True,
    complexity="O(N·C·(d_k + d_v) + N·d_k·d_v) per head, chunks of C; state d_k·d_v per head",
    description="gated linear attention: low-rank log-sigmoid decay per key channel, "
    "RMSNorm, swish gate",
    causal_only=True,
)(GLA)
