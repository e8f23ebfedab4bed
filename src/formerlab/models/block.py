"""The MetaFormer block (Yu et al., 2022): the block is fixed, the token mixer is the plug-in.

pre-norm: x + mixer(norm(x)), then x + mlp(norm(x)).

Packed sequences (``cu_seqlens``, B = 1): everything but the mixer is per position, so
a block hands ``cu_seqlens`` to its mixer (:mod:`formerlab.attention.packed`); a stack
validates it once and hands the same :class:`~formerlab.attention.packed.Packing` to every
layer.

Streaming: everything but the mixer is per position, so a block's state is its mixer's
state and ``step`` threads it through (with the new tokens' ``attention_mask``, if any);
a stack's state is one mixer state per layer.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from formerlab import mixers
from formerlab.attention.packed import Packing, as_packing
from formerlab.errors import refuse_key_padding_mask


class MLP(nn.Module):
    """Two-layer GELU feed-forward network."""

    def __init__(self, dim: int, ratio: float = 4.0, dropout: float = 0.0) -> None:
        super().__init__()
        hidden = int(dim * ratio)
        self.net = nn.Sequential(
            nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim), nn.Dropout(dropout)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class MetaFormerBlock(nn.Module):
    """norm -> mixer -> residual -> norm -> MLP -> residual."""

    def __init__(
        self, dim: int, mixer: nn.Module, mlp_ratio: float = 4.0, dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.mixer = mixer
        self.mlp = MLP(dim, mlp_ratio, dropout)
        self.drop = nn.Dropout(dropout)

    def forward(
        self, x: Tensor, attention_mask: Tensor | None = None, causal: bool = False,
        *, key_padding_mask: Any = None, cu_seqlens: Tensor | Packing | None = None,
    ) -> Tensor:
        refuse_key_padding_mask(key_padding_mask)
        packed = {} if cu_seqlens is None else {"cu_seqlens": cu_seqlens}
        mixed = self.mixer(self.norm1(x), attention_mask=attention_mask, causal=causal, **packed)
        x = x + self.drop(mixed)
        return x + self.mlp(self.norm2(x))

    @property
    def supports_streaming(self) -> bool:
        return self.mixer.supports_streaming

    def init_state(
        self, batch: int, *, dtype: torch.dtype = torch.float32, device: Any = None
    ) -> Any:
        """The mixer's empty stream state (the rest of the block is per position)."""
        return self.mixer.init_state(batch, dtype=dtype, device=device)

    def step(
        self, x: Tensor, state: Any, attention_mask: Tensor | None = None
    ) -> tuple[Tensor, Any]:
        """The next tokens x (B, T, C) through the block, causally; ``(out, state)``.
        ``attention_mask`` (B, T), True = real: the mixer's masked step."""
        mixed, state = self.mixer.step(self.norm1(x), state, attention_mask=attention_mask)
        x = x + self.drop(mixed)
        return x + self.mlp(self.norm2(x)), state


class BlockStack(nn.Module):
    """``depth`` MetaFormer blocks with the same kind of mixer, then a final norm."""

    def __init__(
        self,
        dim: int,
        depth: int,
        heads: int = 4,
        mixer: str = "attention",
        mixer_options: dict[str, Any] | None = None,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        options = dict(mixer_options or {})
        self.blocks = nn.ModuleList(
            MetaFormerBlock(
                dim, mixers.build(mixer, dim=dim, heads=heads, **options), mlp_ratio, dropout
            )
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)

    def forward(
        self, x: Tensor, attention_mask: Tensor | None = None, causal: bool = False,
        *, key_padding_mask: Any = None, cu_seqlens: Tensor | Packing | None = None,
    ) -> Tensor:
        refuse_key_padding_mask(key_padding_mask)
        packed = {}
        if cu_seqlens is not None:  # validated once, for every layer
            packed["cu_seqlens"] = as_packing(cu_seqlens, x.shape[0], x.shape[1], x.device)
        for block in self.blocks:
            x = block(x, attention_mask=attention_mask, causal=causal, **packed)
        return self.norm(x)

    @property
    def supports_streaming(self) -> bool:
        return all(block.supports_streaming for block in self.blocks)

    def init_state(
        self, batch: int, *, dtype: torch.dtype = torch.float32, device: Any = None
    ) -> list[Any]:
        """One empty mixer state per layer."""
        return [block.init_state(batch, dtype=dtype, device=device) for block in self.blocks]

    def step(
        self, x: Tensor, state: list[Any], attention_mask: Tensor | None = None
    ) -> tuple[Tensor, list[Any]]:
        """The next tokens through every layer; returns (final-norm output, new states).
        ``attention_mask`` (B, T), True = real: every layer's masked step."""
        if not isinstance(state, list) or len(state) != len(self.blocks):
            got = len(state) if isinstance(state, list) else type(state).__name__
            raise ValueError(
                f"state must be a list of {len(self.blocks)} layer states (from init_state); "
                f"got {got}"
            )
        new = []
        for block, layer in zip(self.blocks, state):
            x, layer = block.step(x, layer, attention_mask=attention_mask)
            new.append(layer)
        return self.norm(x), new
