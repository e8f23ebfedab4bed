"""Encoder classifier: embeddings -> bidirectional MetaFormer blocks -> mean pool -> linear."""

from __future__ import annotations

from torch import Tensor, nn

from formerlab.models.embedding import SequenceModel


def masked_mean(x: Tensor, key_padding_mask: Tensor | None) -> Tensor:
    """Mean over the real tokens of (B, N, C) -> (B, C)."""
    if key_padding_mask is None:
        return x.mean(dim=1)
    weights = key_padding_mask.to(x.dtype).unsqueeze(-1)
    return (x * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)


class EncoderClassifier(SequenceModel):
    """Sequence classifier; ``forward(ids, key_padding_mask=None) -> logits (B, classes)``.

    Options after ``num_classes`` are those of ``DecoderLM`` (dim, depth, heads, max_len,
    mixer, mixer_options, mlp_ratio, dropout, body).
    """

    def __init__(
        self, vocab_size: int, num_classes: int, dim: int = 128, depth: int = 2,
        heads: int = 4, max_len: int = 512, **options,
    ) -> None:
        super().__init__(vocab_size, dim, depth, heads, max_len, **options)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, ids: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
        x = self.hidden(ids, key_padding_mask, causal=False)
        return self.head(masked_mean(x, key_padding_mask))
