"""The short causal depthwise convolution of DeltaNet, Gated DeltaNet and Mamba-2.

Each channel ``c`` is convolved over time with its own kernel of ``size`` taps, looking
only at the past:

    out_t[c] = act(bias[c] + Σ_{j=0}^{size-1} weight[c, j] · x_{t-size+1+j}[c]),

with inputs before the first token counted as 0 and ``act`` SiLU or the identity. Being
depthwise, one convolution over the concatenated channels of q, k and v equals three
separate ones (as in the layers of Yang et al., 2024, "Parallelizing Linear Transformers
with the Delta Rule over Sequence Length", and Dao & Gu, 2024, "Transformers are SSMs").

Streaming: the output at ``t`` reads the inputs ``t - size + 1 … t`` only, so the stream's
state is a window of the last ``size - 1`` inputs; a step convolves the window followed by
the new inputs. Padded tokens are given to the convolution as zeros by the mixers (so a
left-padded row sees exactly the zeros a row alone sees before its first token).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from formerlab.errors import check_positive_int
from formerlab.mixers.base import zero_padded


class ShortConv(nn.Module):
    """Causal depthwise 1-D convolution over time with a short kernel.

    Args:
        channels: number of channels ``C`` (each has its own kernel).
        size: kernel length (taps), >= 1; the streaming window keeps ``size - 1`` inputs.
        bias: add a learned bias per channel (Mamba-2's convolution has one; the delta-rule
            layers' do not).
        activation: apply SiLU to the output (all three designs do).
    """

    def __init__(
        self, channels: int, size: int = 4, bias: bool = False, activation: bool = True
    ) -> None:
        super().__init__()
        self.channels = check_positive_int("channels", channels)
        self.size = check_positive_int("conv", size)
        self.activation = bool(activation)
        self.weight = nn.Parameter(torch.empty(channels, size))
        self.bias = nn.Parameter(torch.empty(channels)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``nn.Conv1d``'s default: uniform in ``±1/sqrt(fan_in)``, ``fan_in = size``."""
        bound = 1.0 / math.sqrt(self.size)
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)

    def empty_window(self, batch: int, dtype: torch.dtype, device) -> Tensor:
        """The window of a stream with no past: ``size - 1`` zero inputs ``(B, size-1, C)``."""
        return torch.zeros(batch, self.size - 1, self.channels, dtype=dtype, device=device)

    def forward(self, x: Tensor, window: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Convolve ``x`` (B, T, C) causally after ``window``; return ``(out, new_window)``.

        Args:
            x: the new inputs ``(B, T, C)``; the computation runs in ``x``'s dtype (the
                weights are cast to it).
            window: the ``size - 1`` inputs before ``x`` ``(B, size - 1, C)``; ``None``
                means zeros (the start of a sequence).

        Returns:
            ``out`` ``(B, T, C)`` and the last ``size - 1`` inputs of ``window`` followed by
            ``x`` (a new tensor: the given window is never changed).
        """
        if window is None:
            window = self.empty_window(x.shape[0], x.dtype, x.device)
        seen = torch.cat([window.to(x.dtype), x], dim=1)  # (B, size - 1 + T, C)
        weight = self.weight.to(x.dtype).unsqueeze(1)  # (C, 1, size): depthwise
        bias = None if self.bias is None else self.bias.to(x.dtype)
        out = F.conv1d(seen.transpose(1, 2), weight, bias, groups=self.channels).transpose(1, 2)
        if self.activation:
            out = F.silu(out)
        return out, seen[:, seen.shape[1] - (self.size - 1) :]

    def extra_repr(self) -> str:
        act = ", SiLU" if self.activation else ""
        return f"channels={self.channels}, size={self.size}, bias={self.bias is not None}{act}"


def optional_short_conv(conv: Any, channels: int) -> ShortConv | None:
    """A :class:`ShortConv` of ``conv`` taps over ``channels`` channels, or None for
    ``conv=0`` (an option of mixers whose published design leaves the convolution out)."""
    if isinstance(conv, bool) or not isinstance(conv, int) or conv < 0 or conv == 1:
        raise ValueError(
            f"conv={conv!r} is not allowed; expected 0 (no convolution) or the number of "
            "taps of the short causal convolution, an integer >= 2 (4 is usual)"
        )
    return ShortConv(channels, conv) if conv else None


def convolve_padded(
    conv: ShortConv | None, x: Tensor, attention_mask: Tensor | None, window: Tensor | None
) -> tuple[Tensor, Tensor | None]:
    """``x`` (B, T, C) through ``conv`` after ``window`` (None: zeros), padded tokens
    (``attention_mask`` False) entering as zeros; ``(x, None)`` without a convolution."""
    if conv is None:
        return x, None
    return conv(zero_padded(x, attention_mask), window)


def checked_window(state: Any, conv: ShortConv | None, owner: str) -> Tensor | None:
    """The convolution window a streaming state carries (its ``window``), refused with a
    ``ValueError`` when it does not fit ``conv`` (a state built for another mixer)."""
    window = getattr(state, "window", None)
    want = None if conv is None else conv.size - 1
    have = None if window is None else window.shape[1]
    if want != have:
        raise ValueError(
            f"state does not fit {owner}: its convolution window holds {have} inputs, "
            f"expected {want}; build it with this mixer's init_state(...)"
        )
    return window
