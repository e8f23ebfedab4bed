"""The MetaFormer block (Yu et al., 2022): the block is fixed, the token mixer is the plug-in.

pre-norm: x + mixer(norm(x)), then x + mlp(norm(x)).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from formerlab import mixers


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
        self, x: Tensor, key_padding_mask: Tensor | None = None, causal: bool = False
    ) -> Tensor:
        x = x + self.drop(self.mixer(self.norm1(x), key_padding_mask=key_padding_mask, causal=causal))
        return x + self.mlp(self.norm2(x))


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
        self, x: Tensor, key_padding_mask: Tensor | None = None, causal: bool = False
    ) -> Tensor:
        for block in self.blocks:
            x = block(x, key_padding_mask=key_padding_mask, causal=causal)
        return self.norm(x)
