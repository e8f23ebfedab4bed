"""What the recurrent token mixers (``retention``, ``gla``, ``deltanet``,
``gated_deltanet``, ``mamba2``) share: their streaming state, the causal-only contract,
padding, the normalisations of their outputs and the initialisation of their decays.

Each of them is a linear recurrence over a fixed-size state per head (linear attention
with a decay or a delta-rule write, or Mamba-2's selective state space model), run by the
fla-compatible ops of :mod:`formerlab.attention.functional`: the chunked-parallel op for
a whole sequence, the token-by-token op for a short streaming step. A step runs the op on
the new tokens from the state of the previous ones, so stepping equals the parallel call.

They are causal-only: a recurrence reads the past. ``mixer(x, causal=False)`` raises a
``ValueError``; a classifier or tagger runs them with ``model.causal: true``.

Padding (``attention_mask`` bool (B, N), True = real token): a padded token adds nothing
to any state. Its key and value (or input) are zeroed *and* its transition is the identity
(log decay ``g = 0``, delta-rule strength ``beta = 0``, Mamba-2 step ``dt = 0``), and it
enters the short convolution as a zero input. Its output is 0. So a left-padded row gives
exactly what the row alone gives, in the parallel call and in masked streaming steps.

Precision: the linear projections run in the parameters' dtype (under the caller's
autocast, if any); the convolution, gates, recurrence and normalisations run in float32
(float64 for float64 inputs) with autocast off, and states are kept in that dtype. The
output has the dtype of the input (or autocast's, under autocast).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from formerlab.errors import check_positive_float
from formerlab.linalg.numerics import compute_dtype
from formerlab.mixers.base import TokenMixer, zero_padded
from formerlab.mixers.short_conv import ShortConv

#: A streaming step of at most this many tokens runs the token-by-token op (cheaper than
#: the chunked one for a few tokens); longer steps and the parallel call run the chunked op.
RECURRENT_STEP_MAX = 16

#: ``eps`` of the RMS and group normalisations of the mixers' outputs.
NORM_EPS = 1e-5


@dataclass(frozen=True)
class RecurrentState:
    """The streaming state of a recurrent token mixer (a value: steps return a new one).

    Attributes:
        memory: the recurrence's state, in the compute dtype (float32, or float64 for
            float64 inputs): ``[B, H, K, V]`` for the linear-attention mixers,
            ``[B, H, P, N]`` for ``mamba2``.
        window: the short convolution's last ``conv - 1`` inputs ``(B, conv - 1, C)``
            (zeros before the first token and for padded tokens); ``None`` for a mixer
            without a convolution.
        position: the number of tokens consumed so far (rotary positions of ``retention``).
        lead: ``(B,)`` each row's first real position, once a step has had an
            ``attention_mask`` (rotary positions count from it); ``None``: every row
            started at 0.
    """

    memory: Tensor
    window: Tensor | None = None
    position: int = 0
    lead: Tensor | None = None


def check_expand(name: str, value: Any, dim: int, heads: int) -> tuple[int, int]:
    """``(total, per_head)`` width of ``dim · value``, split over ``heads`` heads.

    Raises:
        ValueError: naming ``name`` unless ``value`` is a number > 0 that makes
            ``dim · value`` an integer multiple of ``heads``.
    """
    expand = check_positive_float(name, value)
    total = dim * expand
    if total != int(total) or int(total) % heads or total < heads:
        raise ValueError(
            f"{name}={value!r} is not allowed with dim={dim}, heads={heads}: dim·{name} = "
            f"{total:g} must be a positive integer multiple of heads"
        )
    return int(total), int(total) // heads


def check_chunk_size(chunk_size: Any) -> int:
    """``chunk_size`` if it is a power of two >= 1 (what the chunked ops take)."""
    ok = isinstance(chunk_size, int) and not isinstance(chunk_size, bool)
    if not ok or chunk_size < 1 or chunk_size & (chunk_size - 1):
        raise ValueError(f"chunk_size={chunk_size!r} is not allowed; expected a power of two >= 1")
    return chunk_size


def rms_norm(x: Tensor, weight: Tensor, group: int | None = None) -> Tensor:
    """Root-mean-square normalisation of the last axis of ``x`` in groups of ``group``
    channels (all of them if None), times ``weight`` (Zhang & Sennrich, 2019)."""
    shape = x.shape
    size = group or shape[-1]
    grouped = x.reshape(*shape[:-1], shape[-1] // size, size)
    normed = grouped * torch.rsqrt(grouped.square().mean(-1, keepdim=True) + NORM_EPS)
    return normed.reshape(shape) * weight.to(x.dtype)


def init_a_log(heads: int, low: float = 1.0, high: float = 16.0) -> Tensor:
    """``log A`` with ``A`` uniform in ``[low, high]`` per head (Mamba-2's initialisation;
    the decay rate is ``-exp(A_log)``)."""
    return torch.empty(heads).uniform_(low, high).log()


def init_dt_bias(
    heads: int, dt_min: float = 1e-3, dt_max: float = 0.1, floor: float = 1e-4
) -> Tensor:
    """``dt_bias`` so that ``softplus(dt_bias)`` is log-uniform in ``[dt_min, dt_max]``
    (Mamba's initialisation of the step size: the inverse softplus of the drawn steps)."""
    log_dt = torch.rand(heads) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
    dt = log_dt.exp().clamp_min(floor)
    return dt + torch.log(-torch.expm1(-dt))


class RecurrentMixer(TokenMixer):
    """Base class of the recurrent mixers: causal-only, streaming, masked steps.

    A subclass sets ``conv`` (its :class:`~formerlab.mixers.short_conv.ShortConv` or
    ``None``), implements :meth:`memory_shape` (the per-sequence shape of its recurrent
    state) and :meth:`run`, the one computation behind the parallel call and the step.
    """

    def __init__(self, dim: int) -> None:
        super().__init__(dim)
        self.conv: ShortConv | None = None

    @property
    def supports_causal(self) -> bool:
        return True

    @property
    def supports_streaming(self) -> bool:
        return True

    def memory_shape(self) -> tuple[int, ...]:
        """The shape of one sequence's recurrent state (``[H, K, V]`` or ``[H, P, N]``)."""
        raise NotImplementedError

    def run(
        self, x: Tensor, real: Tensor | None, state: RecurrentState | None
    ) -> tuple[Tensor, RecurrentState | None]:
        """Mix ``x`` (B, T, C) after ``state`` (``None``: a parallel call from the start,
        no state returned); ``real`` bool (B, T) or ``None`` (all real)."""
        raise NotImplementedError

    def mix(self, x: Tensor, attention_mask: Tensor | None, causal: bool) -> Tensor:
        if not causal:
            raise ValueError(
                f"token mixer {self.name!r} ({self.extra_repr()}) is causal-only: it is a "
                "recurrence over past tokens, so causal=False is not allowed; call it with "
                "causal=True (classifier and tagger configs: set model.causal: true)"
            )
        return self.run(x, attention_mask, None)[0]

    def new_state(self, batch: int, dtype: torch.dtype, device: Any) -> RecurrentState:
        work = compute_dtype(dtype)
        memory = torch.zeros(batch, *self.memory_shape(), dtype=work, device=device)
        window = None if self.conv is None else self.conv.empty_window(batch, work, device)
        return RecurrentState(memory, window)

    def step_mix(
        self, x: Tensor, state: RecurrentState, attention_mask: Tensor | None = None
    ) -> tuple[Tensor, RecurrentState]:
        self._check_state(state, x.shape[0])
        return self.run(x, attention_mask, state)

    def _check_state(self, state: Any, batch: int) -> None:
        want = (batch, *self.memory_shape())
        if not isinstance(state, RecurrentState):
            raise ValueError(
                f"state must be a RecurrentState from {self.name!r}.init_state(...); "
                f"got {type(state).__name__}"
            )
        if tuple(state.memory.shape) != want or (self.conv is None) != (state.window is None):
            raise ValueError(
                f"state does not fit token mixer {self.name!r} ({self.extra_repr()}) and a "
                f"batch of {batch}: its memory has shape {tuple(state.memory.shape)}, expected "
                f"{want}; build it with init_state({batch})"
            )

    def convolve(
        self, parts: tuple[Tensor, ...], real: Tensor | None, state: RecurrentState | None
    ) -> tuple[tuple[Tensor, ...], Tensor | None]:
        """``parts`` (B, T, C_i) through the short convolution, if the mixer has one (one
        depthwise convolution over their channels side by side equals one per part), and
        its new window (None without one). Padded tokens enter it as zeros."""
        if self.conv is None:
            return parts, None
        window = None if state is None else state.window
        out, window = self.conv(zero_padded(torch.cat(parts, dim=-1), real), window)
        return out.split([p.shape[-1] for p in parts], dim=-1), window

    @staticmethod
    def use_recurrent_op(x: Tensor, state: RecurrentState | None) -> bool:
        """Whether to run the token-by-token op: a streaming step of a few tokens."""
        return state is not None and x.shape[1] <= RECURRENT_STEP_MAX


def silu_gate(x: Tensor, gate: Tensor) -> Tensor:
    """``x · silu(gate)`` (the swish output gate)."""
    return x * F.silu(gate)
