"""The Mamba-2 block as a token mixer.

Dao & Gu, 2024, "Transformers are SSMs: Generalized Models and Efficient Algorithms
Through Structured State Space Duality" (ICML, arXiv:2405.21060), Section 7 (the Mamba-2
block, Fig. 6). One input projection gives, in parallel, the gate ``z``, the SSM input
``x``, the shared projections ``B, C`` (``ngroups`` groups) and the step sizes ``dt`` (one
per head); ``x, B, C`` go through a short causal depthwise convolution with SiLU. Then
every head ``h`` (of ``head_dim`` channels, with a ``[head_dim, d_state]`` state) runs the
scalar-decay selective SSM

    Δ_t = softplus(dt_t + dt_bias),   S_t = exp(Δ_t A_h) S_{t-1} + Δ_t x_t B_tᵀ,
    y_t = S_t C_t + D_h x_t,          A_h = -exp(A_log_h),

(:func:`~formerlab.attention.functional.ssd`, the chunked SSD algorithm; its recurrence
:func:`~formerlab.attention.functional.ssd_recurrent` for short streaming steps), and the
output is ``W_out · RMSNorm(y ⊙ silu(z))``, the gated RMSNorm normalising each group's
channels separately (mamba_ssm's ``RMSNormGated`` with ``norm_before_gate=False``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from formerlab.attention.functional import ssd, ssd_recurrent
from formerlab.errors import check_positive_int
from formerlab.linalg.numerics import autocast_off, compute_dtype
from formerlab.mixers.base import zero_padded
from formerlab.mixers.recurrent import (
    RecurrentMixer,
    RecurrentState,
    check_expand,
    init_a_log,
    init_dt_bias,
    rms_norm,
)
from formerlab.mixers.registry import register
from formerlab.mixers.short_conv import ShortConv


def inner_width(dim: int, heads: int, expand: Any, head_dim: Any) -> tuple[int, int]:
    """``(d_inner, head_dim)``: ``d_inner = heads · head_dim`` when ``head_dim`` is given,
    else ``expand · dim`` (``expand`` 2 when not given) split over the heads.

    Raises:
        ValueError: naming ``expand`` or ``head_dim`` when a width is not a positive
            integer, or when both are given and disagree.
    """
    if head_dim is None:
        return check_expand("expand", 2 if expand is None else expand, dim, heads)
    head_dim = check_positive_int("head_dim", head_dim)
    if expand is not None and check_expand("expand", expand, dim, heads)[0] != heads * head_dim:
        raise ValueError(
            f"expand={expand!r} and head_dim={head_dim} disagree: dim·expand = {dim * expand:g}"
            f" but heads·head_dim = {heads * head_dim}; give one of them"
        )
    return heads * head_dim, head_dim


class Mamba2(RecurrentMixer):
    """The Mamba-2 block (Dao & Gu, 2024): input projection to ``(z, x, B, C, dt)``, short
    convolution with SiLU on ``x, B, C``, the selective SSM with a scalar decay per head
    (``A_log``, ``dt_bias``, skip ``D``), gated RMSNorm and output projection.
    Causal-only; streams with a ``[head_dim, d_state]`` state per head plus the
    convolution's last ``conv - 1`` inputs.

    Parameters: the input projection (``dim × (2·d_inner + 2·ngroups·d_state + heads)``),
    the convolution (``conv`` taps and a bias per channel of ``x, B, C``), ``A_log``,
    ``dt_bias`` and ``D`` (``heads`` each), the norm weight (``d_inner``) and the output
    projection (``d_inner × dim``); no other biases. ``d_inner = heads · head_dim``.

    Args:
        dim: model width.
        heads: number of SSM heads (Mamba-2 fixes ``head_dim`` = 64 instead; give
            ``head_dim`` to do the same).
        expand: ``d_inner`` as a multiple of ``dim`` (default 2, Mamba-2's), split over
            the heads; leave it unset when ``head_dim`` is given.
        head_dim: channels ``P`` per head; sets ``d_inner = heads · head_dim``.
        d_state: state size ``N`` per channel (Mamba-2: 64 or 128; small models 16).
        ngroups: groups ``G`` of heads sharing ``B`` and ``C`` (must divide ``heads``);
            the gated RMSNorm normalises each group's ``d_inner / G`` channels.
        conv: taps of the short causal convolution (Mamba-2: 4).
        chunk_size: chunk length of the SSD algorithm (>= 1); changes only speed and
            rounding.
    """

    name = "mamba2"

    def __init__(
        self,
        dim: int,
        heads: int = 4,
        expand: float | None = None,
        head_dim: int | None = None,
        d_state: int = 16,
        ngroups: int = 1,
        conv: int = 4,
        chunk_size: int = 64,
    ) -> None:
        super().__init__(check_positive_int("dim", dim))
        self.heads = check_positive_int("heads", heads)
        self.inner, self.head_dim = inner_width(dim, heads, expand, head_dim)
        self.d_state = check_positive_int("d_state", d_state)
        self.ngroups = check_positive_int("ngroups", ngroups)
        if heads % ngroups:
            raise ValueError(
                f"ngroups={ngroups} is not allowed with heads={heads}: expected a divisor of "
                "heads (each group of heads shares B and C)"
            )
        self.chunk_size = check_positive_int("chunk_size", chunk_size)
        self.bc_dim = ngroups * d_state
        conv_dim = self.inner + 2 * self.bc_dim
        self.in_proj = nn.Linear(dim, self.inner + conv_dim + heads, bias=False)
        self.conv = ShortConv(conv_dim, check_positive_int("conv", conv), bias=True)
        self.A_log = nn.Parameter(init_a_log(heads))
        self.dt_bias = nn.Parameter(init_dt_bias(heads))
        self.D = nn.Parameter(torch.ones(heads))
        self.norm_weight = nn.Parameter(torch.ones(self.inner))
        self.out = nn.Linear(self.inner, dim, bias=False)

    def memory_shape(self) -> tuple[int, ...]:
        return (self.heads, self.head_dim, self.d_state)

    def run(
        self, x: Tensor, real: Tensor | None, state: RecurrentState | None
    ) -> tuple[Tensor, RecurrentState | None]:
        b, t, _ = x.shape
        work = compute_dtype(x.dtype)
        conv_dim = self.conv.channels
        z, xbc, dt = self.in_proj(x).to(work).split([self.inner, conv_dim, self.heads], dim=-1)
        with autocast_off(x.device):
            # padded tokens enter the convolution as zeros and take no step (dt = 0)
            xbc, window = self.conv(zero_padded(xbc, real), None if state is None else state.window)
            xs, B, C = xbc.split([self.inner, self.bc_dim, self.bc_dim], dim=-1)
            dt = zero_padded(F.softplus(dt + self.dt_bias.to(work)), real)
            y, memory = self._scan(
                xs.reshape(b, t, self.heads, self.head_dim),
                dt,
                B.reshape(b, t, self.ngroups, self.d_state),
                C.reshape(b, t, self.ngroups, self.d_state),
                state,
            )
            y = rms_norm(
                y.reshape(b, t, self.inner) * F.silu(z),
                self.norm_weight,
                group=self.inner // self.ngroups,
            )
        out = zero_padded(self.out(y.to(x.dtype)), real)
        return out, None if state is None else RecurrentState(memory, window)

    def _scan(self, xs, dt, B, C, state):
        """The selective SSM from ``state`` (zeros if None): ``(y, final state or None)``."""
        work = xs.dtype
        A = -self.A_log.to(work).exp()
        D = self.D.to(work)
        if state is None:
            return ssd(xs, dt, A, B, C, chunk_size=self.chunk_size, D=D), None
        op = ssd_recurrent if self.use_recurrent_op(xs, state) else ssd
        return op(
            xs,
            dt,
            A,
            B,
            C,
            chunk_size=self.chunk_size,
            D=D,
            initial_states=state.memory,
            return_final_states=True,
        )

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, heads={self.heads}, head_dim={self.head_dim}, "
            f"d_state={self.d_state}, ngroups={self.ngroups}, conv={self.conv.size}"
        )


register(
    "mamba2",
    causal=True,
    complexity="O(N·C·(d_state + head_dim) + N·head_dim·d_state) per head, chunks of C; "
    "state head_dim·d_state per head + conv window",
    description="Mamba-2 block: selective SSM (SSD) with conv, gated RMSNorm (Dao & Gu, 2024)",
    causal_only=True,
)(Mamba2)
