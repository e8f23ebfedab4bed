"""Token + learned positional embeddings shared by the decoder and the encoder."""

from __future__ import annotations

import torch
from torch import Tensor, nn


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
