"""Encoder classifier: embeddings -> bidirectional MetaFormer blocks -> mean pool -> linear."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from formerlab.errors import refuse_key_padding_mask
from formerlab.models.embedding import SequenceModel


def masked_mean(x: Tensor, attention_mask: Tensor | None) -> Tensor:
    """Mean over the real tokens of (B, N, C) -> (B, C)."""
    if attention_mask is None:
        return x.mean(dim=1)
    weights = attention_mask.to(x.dtype).unsqueeze(-1)
    return (x * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)


class EncoderClassifier(SequenceModel):
    """Sequence classifier; ``forward(ids, attention_mask=None) -> logits (B, classes)``.

    Options after ``num_classes`` are those of ``DecoderLM`` (dim, depth, heads, max_len,
    mixer, mixer_options, mlp_ratio, dropout, body).
    """

    def __init__(
        self, vocab_size: int, num_classes: int, dim: int = 128, depth: int = 2,
        heads: int = 4, max_len: int = 512, **options,
    ) -> None:
        super().__init__(vocab_size, dim, depth, heads, max_len, **options)
        self.head = nn.Linear(dim, num_classes)

    def forward(
        self, ids: Tensor, attention_mask: Tensor | None = None, *, key_padding_mask: Any = None
    ) -> Tensor:
        refuse_key_padding_mask(key_padding_mask)
        x = self.hidden(ids, attention_mask, causal=False)
        return self.head(masked_mean(x, attention_mask))
