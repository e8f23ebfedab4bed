"""Token tagger: bidirectional MetaFormer blocks -> one class per position.

For non-autoregressive sequence tasks (e.g. "write the sorted sequence into these blank
slots"), which any attention mechanism can solve, causal or not.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from formerlab.models.block import BlockStack
from formerlab.models.embedding import TokenEmbedding


class TokenTagger(nn.Module):
    """``forward(ids, key_padding_mask=None) -> logits (B, N, num_classes)``."""

    def __init__(
        self,
        vocab_size: int,
        num_classes: int,
        dim: int = 128,
        depth: int = 2,
        heads: int = 4,
        max_len: int = 512,
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
        self.head = nn.Linear(dim, num_classes)

    def forward(self, ids: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
        x = self.body(self.embed(ids), key_padding_mask=key_padding_mask, causal=False)
        return self.head(x)
