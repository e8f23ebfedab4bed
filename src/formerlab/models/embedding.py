"""Token + learned positional embeddings, and the embed -> blocks trunk every model shares."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from formerlab.models.block import BlockStack


class TokenEmbedding(nn.Module):
    """Token embedding plus a learned absolute position embedding of ``max_len`` slots."""

    def __init__(self, vocab_size: int, dim: int, max_len: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.max_len = max_len
        self.tokens = nn.Embedding(vocab_size, dim)
        self.positions = nn.Embedding(max_len, dim)
        self.drop = nn.Dropout(dropout)
        nn.init.normal_(self.tokens.weight, std=0.02)
        nn.init.normal_(self.positions.weight, std=0.02)

    def forward(self, ids: Tensor) -> Tensor:
        if ids.dim() != 2 or ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"ids must be an integer (B, N) tensor; got {ids.dtype} {tuple(ids.shape)}")
        n = ids.shape[1]
        if n > self.max_len:
            raise ValueError(f"sequence length {n} exceeds the model's max_len={self.max_len}")
        pos = torch.arange(n, device=ids.device)
        return self.drop(self.tokens(ids) + self.positions(pos))


class SequenceModel(nn.Module):
    """Embeddings followed by a body of MetaFormer blocks; subclasses add the head.

    ``body`` replaces the default ``BlockStack`` (e.g. a ``DEQStack``); it is called as
    ``body(x, key_padding_mask=..., causal=...)`` and returns (B, N, dim).
    """

    def __init__(
        self,
        vocab_size: int,
        dim: int,
        depth: int,
        heads: int,
        max_len: int,
        mixer: str = "attention",
        mixer_options: dict[str, Any] | None = None,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        body: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.max_len = max_len
        self.embed = TokenEmbedding(vocab_size, dim, max_len, dropout)
        self.body = body or BlockStack(dim, depth, heads, mixer, mixer_options, mlp_ratio, dropout)

    def hidden(self, ids: Tensor, key_padding_mask: Tensor | None, causal: bool) -> Tensor:
        """(B, N) ids -> (B, N, dim) final hidden states."""
        return self.body(self.embed(ids), key_padding_mask=key_padding_mask, causal=causal)
