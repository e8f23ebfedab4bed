"""The token-mixer contract: x (B, N, C) -> (B, N, C), called as
``mixer(x, key_padding_mask=None, causal=False)``.

The MetaFormer block around a mixer is fixed; the mixer is the plug-in. A mixer that
cannot run causally raises ``ValueError`` on ``causal=True``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def check_mixer_input(x: Tensor, dim: int, key_padding_mask: Tensor | None) -> None:
    """Validate a mixer call; raise ``ValueError`` naming the bad argument."""
    if not isinstance(x, Tensor) or x.dim() != 3 or x.shape[-1] != dim:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"x must be a (B, N, C={dim}) tensor; got {shape}")
    if key_padding_mask is not None and (
        key_padding_mask.dtype != torch.bool or key_padding_mask.shape != x.shape[:2]
    ):
        raise ValueError(
            f"key_padding_mask must be bool (B, N) = {tuple(x.shape[:2])}, True = real "
            f"token; got dtype {key_padding_mask.dtype}, shape {tuple(key_padding_mask.shape)}"
        )


class TokenMixer(nn.Module):
    """Base class for mixers; subclasses implement ``mix`` and set ``supports_causal``."""

    name: str = "mixer"

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim

    @property
    def supports_causal(self) -> bool:
        return False

    def mix(self, x: Tensor, key_padding_mask: Tensor | None, causal: bool) -> Tensor:
        raise NotImplementedError

    def forward(
        self, x: Tensor, key_padding_mask: Tensor | None = None, causal: bool = False
    ) -> Tensor:
        check_mixer_input(x, self.dim, key_padding_mask)
        if causal and not self.supports_causal:
            raise ValueError(
                f"token mixer {self.name!r} ({self.extra_repr()}) does not support causal=True"
            )
        return self.mix(x, key_padding_mask, bool(causal))
