"""DeltaNet and Gated DeltaNet: linear attention with the delta-rule write.

DeltaNet (Schlag et al., 2021, "Linear Transformers Are Secretly Fast Weight
Programmers", arXiv:2102.11174; the layer of Yang et al., 2024, "Parallelizing Linear
Transformers with the Delta Rule over Sequence Length", NeurIPS, arXiv:2406.06484) keeps
a ``[d_k, d_v]`` state per head and overwrites what it stores for the key ``k_t``:

    S_t = (I - β_t k_t k_tᵀ) S_{t-1} + β_t k_t v_tᵀ,      o_t = S_tᵀ q_t / sqrt(d_k).

Gated DeltaNet (Yang et al., 2025, "Gated Delta Networks: Improving Mamba2 with Delta
Rule", ICLR, arXiv:2412.06464) decays the state first, ``S_t = α_t (I - β_t k_t k_tᵀ)
S_{t-1} + β_t k_t v_tᵀ``, with Mamba-2's parameterisation of the decay,

    log α_t = -exp(A_log) · softplus(x_t W_α + dt_bias).

Both layers (Sec. 3 of Yang et al., 2024; Sec. 3.3 and Fig. 1 of Yang et al., 2025) take
``q, k, v`` from linear projections followed by a short causal depthwise convolution
(:class:`~formerlab.mixers.short_conv.ShortConv`) with SiLU; ``q`` and ``k`` are then
L2-normalised (the op's ``use_qk_l2norm_in_kernel``), and ``β_t = sigmoid(x_t W_β)`` per
head. The output is normalised per head (RMSNorm); Gated DeltaNet also gates it,
``(RMSNorm_h(o) ⊙ swish(x W_G)) W_O``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from formerlab.attention.functional import (
    chunk_delta_rule,
    chunk_gated_delta_rule,
    fused_recurrent_delta_rule,
    fused_recurrent_gated_delta_rule,
)
from formerlab.errors import check_positive_int
from formerlab.linalg.numerics import autocast_off, compute_dtype
from formerlab.mixers.base import zero_padded
from formerlab.mixers.recurrent import (
    RecurrentMixer,
    RecurrentState,
    check_chunk_size,
    check_expand,
    init_a_log,
    init_dt_bias,
    rms_norm,
    silu_gate,
)
from formerlab.mixers.registry import register
from formerlab.mixers.short_conv import ShortConv


class _DeltaRuleMixer(RecurrentMixer):
    """What DeltaNet and Gated DeltaNet share: projections, convolution, beta, output."""

    def __init__(
        self, dim: int, heads: int, expand_k: float, expand_v: float, conv: int, chunk_size: int
    ) -> None:
        super().__init__(check_positive_int("dim", dim))
        self.heads = check_positive_int("heads", heads)
        self.key_dim, self.head_k = check_expand("expand_k", expand_k, dim, heads)
        self.value_dim, self.head_v = check_expand("expand_v", expand_v, dim, heads)
        self.chunk_size = check_chunk_size(chunk_size)
        channels = 2 * self.key_dim + self.value_dim
        self.conv = ShortConv(channels, check_positive_int("conv", conv), bias=False)
        self.qkv = nn.Linear(dim, channels, bias=False)
        self.beta = nn.Linear(dim, heads, bias=False)
        self.norm_weight = nn.Parameter(torch.ones(self.head_v))
        self.out = nn.Linear(self.value_dim, dim, bias=False)

    def memory_shape(self) -> tuple[int, ...]:
        return (self.heads, self.head_k, self.head_v)

    def run(
        self, x: Tensor, real: Tensor | None, state: RecurrentState | None
    ) -> tuple[Tensor, RecurrentState | None]:
        b, t, _ = x.shape
        work = compute_dtype(x.dtype)
        qkv, beta_logits = self.qkv(x).to(work), self.beta(x).to(work)
        extra = self.project_extra(x, work)
        with autocast_off(x.device):
            # padded tokens enter the convolution as zeros and write nothing (beta = 0)
            qkv, window = self.conv(zero_padded(qkv, real), None if state is None else state.window)
            q, k, v = qkv.split([self.key_dim, self.key_dim, self.value_dim], dim=-1)
            q, k = (p.reshape(b, t, self.heads, self.head_k) for p in (q, k))
            k, v = zero_padded(k, real), zero_padded(v.reshape(b, t, self.heads, self.head_v), real)
            beta = zero_padded(torch.sigmoid(beta_logits), real)
            o, memory = self.recur(q, k, v, beta, extra, real, state)
            o = self.output(o, extra).reshape(b, t, self.value_dim)
        out = zero_padded(self.out(o.to(x.dtype)), real)
        return out, None if state is None else RecurrentState(memory, window)

    def project_extra(self, x: Tensor, work: torch.dtype) -> dict[str, Tensor]:
        """Projections beyond q, k, v and beta (Gated DeltaNet's decay and output gate)."""
        return {}

    def recur(self, q, k, v, beta, extra, real, state) -> tuple[Tensor, Tensor | None]:
        raise NotImplementedError

    def output(self, o: Tensor, extra: dict[str, Tensor]) -> Tensor:
        """Per-head RMSNorm of the recurrence's output ``[B, T, H, d_v]``."""
        return rms_norm(o, self.norm_weight)

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, heads={self.heads}, key_dim={self.key_dim}, "
            f"value_dim={self.value_dim}, conv={self.conv.size}"
        )


class DeltaNet(_DeltaRuleMixer):
    """DeltaNet (Schlag et al., 2021; the layer of Yang et al., 2024): the delta-rule
    write ``S_t = (I - β_t k_t k_tᵀ) S_{t-1} + β_t k_t v_tᵀ`` with a short convolution
    and SiLU on ``q, k, v``, L2-normalised ``q, k``, ``β = sigmoid(x W_β)`` per head and a
    per-head RMSNorm on the output. Causal-only; streams with a ``[d_k, d_v]`` state per
    head plus the convolution's last ``conv - 1`` inputs.

    Parameters: ``W_Q, W_K`` (``dim × dim·expand_k``), ``W_V`` (``dim × dim·expand_v``),
    ``W_β`` (``dim × heads``), the convolution (``conv`` taps per channel of q, k and v,
    no bias), the RMSNorm weight (``d_v``, shared by the heads) and ``W_O``
    (``dim·expand_v × dim``); no biases.

    Args:
        dim: model width.
        heads: number of heads.
        expand_k: query/key width as a multiple of ``dim`` (DeltaNet: 1).
        expand_v: value width as a multiple of ``dim`` (DeltaNet: 1).
        conv: taps of the short causal convolution (4 in the papers).
        chunk_size: chunk length of the chunked-parallel op (a power of two); changes
            only speed and rounding.
    """

    name = "deltanet"

    def __init__(
        self,
        dim: int,
        heads: int = 4,
        expand_k: float = 1.0,
        expand_v: float = 1.0,
        conv: int = 4,
        chunk_size: int = 64,
    ) -> None:
        super().__init__(dim, heads, expand_k, expand_v, conv, chunk_size)

    def recur(self, q, k, v, beta, extra, real, state):
        initial = None if state is None else state.memory
        if self.use_recurrent_op(q, state):
            return fused_recurrent_delta_rule(
                q,
                k,
                v,
                beta,
                initial_state=initial,
                output_final_state=True,
                use_qk_l2norm_in_kernel=True,
            )
        return chunk_delta_rule(
            q,
            k,
            v,
            beta,
            initial_state=initial,
            output_final_state=state is not None,
            use_qk_l2norm_in_kernel=True,
            chunk_size=self.chunk_size,
        )


class GatedDeltaNet(_DeltaRuleMixer):
    """Gated DeltaNet (Yang et al., 2025): the delta rule with a decay,
    ``S_t = α_t (I - β_t k_t k_tᵀ) S_{t-1} + β_t k_t v_tᵀ``, ``log α_t = -exp(A_log) ·
    softplus(x_t W_α + dt_bias)`` (the paper's Mamba-2-style gate; ``A`` initialised
    uniform in [1, 16], ``softplus(dt_bias)`` log-uniform in [0.001, 0.1]), a short
    convolution and SiLU on ``q, k, v``, L2-normalised ``q, k``, ``β = sigmoid(x W_β)``
    per head, and the output ``(RMSNorm_h(o) ⊙ swish(x W_G)) W_O``. Causal-only; streams
    with a ``[d_k, d_v]`` state per head plus the convolution's last ``conv - 1`` inputs.

    Parameters: those of ``deltanet`` plus ``W_α`` (``dim × heads``), ``A_log`` and
    ``dt_bias`` (``heads`` each) and the output gate ``W_G`` (``dim × dim·expand_v``).

    Args:
        dim: model width.
        heads: number of heads.
        expand_k: query/key width as a multiple of ``dim``.
        expand_v: value width as a multiple of ``dim`` (Gated DeltaNet: 2).
        conv: taps of the short causal convolution (4 in the paper).
        chunk_size: chunk length of the chunked-parallel op (a power of two); changes
            only speed and rounding.
    """

    name = "gated_deltanet"

    def __init__(
        self,
        dim: int,
        heads: int = 4,
        expand_k: float = 1.0,
        expand_v: float = 2.0,
        conv: int = 4,
        chunk_size: int = 64,
    ) -> None:
        super().__init__(dim, heads, expand_k, expand_v, conv, chunk_size)
        self.alpha = nn.Linear(dim, self.heads, bias=False)
        self.A_log = nn.Parameter(init_a_log(self.heads))
        self.dt_bias = nn.Parameter(init_dt_bias(self.heads))
        self.gate = nn.Linear(dim, self.value_dim, bias=False)

    def project_extra(self, x: Tensor, work: torch.dtype) -> dict[str, Tensor]:
        return {"alpha": self.alpha(x).to(work), "gate": self.gate(x).to(work)}

    def recur(self, q, k, v, beta, extra, real, state):
        work = q.dtype
        # log α = -exp(A_log)·softplus(x W_α + dt_bias); a padded token decays by α = 1
        raw = extra["alpha"] + self.dt_bias.to(work)
        g = zero_padded(-self.A_log.to(work).exp() * F.softplus(raw), real)
        initial = None if state is None else state.memory
        if self.use_recurrent_op(q, state):
            return fused_recurrent_gated_delta_rule(
                q,
                k,
                v,
                g=g,
                beta=beta,
                initial_state=initial,
                output_final_state=True,
                use_qk_l2norm_in_kernel=True,
            )
        return chunk_gated_delta_rule(
            q,
            k,
            v,
            g,
            beta,
            initial_state=initial,
            output_final_state=state is not None,
            use_qk_l2norm_in_kernel=True,
            chunk_size=self.chunk_size,
        )

    def output(self, o: Tensor, extra: dict[str, Tensor]) -> Tensor:
        """Per-head RMSNorm, then the swish output gate."""
        gate = extra["gate"].view(*o.shape)
        return silu_gate(rms_norm(o, self.norm_weight), gate)


register(
    "deltanet",
    causal=True,
    complexity="O(N·C·(C + d_k + d_v) + N·d_k·d_v) per head, chunks of C; state d_k·d_v "
    "per head + conv window",
    description="DeltaNet: delta-rule linear attention with short conv, L2-normed q/k, RMSNorm",
    causal_only=True,
)(DeltaNet)

register(
    "gated_deltanet",
    causal=True,
    complexity="O(N·C·(C + d_k + d_v) + N·d_k·d_v) per head, chunks of C; state d_k·d_v "
    "per head + conv window",
    description="Gated DeltaNet: the delta rule with a Mamba-2-style decay, output gate, RMSNorm",
    causal_only=True,
)(GatedDeltaNet)
