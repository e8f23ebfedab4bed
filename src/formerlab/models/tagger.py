"""Token tagger: bidirectional MetaFormer blocks -> one class per position.

For non-autoregressive sequence tasks (e.g. "write the sorted sequence into these blank
slots"), which any attention mechanism can solve, causal or not.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from formerlab.attention.packed import Packing
from formerlab.errors import refuse_key_padding_mask
from formerlab.models.embedding import SequenceModel


class TokenTagger(SequenceModel):
    """``forward(ids, attention_mask=None) -> logits (B, N, num_classes)``; options as
    ``EncoderClassifier`` (``causal``: each position predicted from its prefix only).
    Packed sequences: ``forward(ids (1, N), cu_seqlens=cu)`` -> (1, N, num_classes), each
    sequence tagged as alone (:mod:`formerlab.attention.packed`)."""

    def __init__(
        self, vocab_size: int, num_classes: int, dim: int = 128, depth: int = 2,
        heads: int = 4, max_len: int = 512, causal: bool = False, **options,
    ) -> None:
        super().__init__(vocab_size, dim, depth, heads, max_len, **options)
        self.causal = causal
        self.head = nn.Linear(dim, num_classes)

    def forward(
        self, ids: Tensor, attention_mask: Tensor | None = None, *, key_padding_mask: Any = None,
        cu_seqlens: Tensor | Packing | None = None,
    ) -> Tensor:
        refuse_key_padding_mask(key_padding_mask)
        return self.head(self.hidden(ids, attention_mask, self.causal, cu_seqlens))
