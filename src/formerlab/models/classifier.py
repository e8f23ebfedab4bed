"""Encoder classifier: embeddings -> bidirectional MetaFormer blocks -> mean pool -> linear."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from formerlab.attention.packed import Packing, refuse_mask_with_packing
from formerlab.errors import refuse_key_padding_mask
from formerlab.models.embedding import SequenceModel


def masked_mean(x: Tensor, attention_mask: Tensor | None) -> Tensor:
    """Mean over the real tokens of (B, N, C) -> (B, C)."""
    if attention_mask is None:
        return x.mean(dim=1)
    weights = attention_mask.to(x.dtype).unsqueeze(-1)
    return (x * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)


def classifier_head(dim: int, num_classes: int, head: str, mlp_ratio: float) -> nn.Module:
    """``"linear"``: one linear layer; ``"mlp"``: Linear(dim, mlp_ratio * dim), ReLU, Linear
    (the classification head of the Long Range Arena models, Tay et al., 2021)."""
    if head == "linear":
        return nn.Linear(dim, num_classes)
    if head == "mlp":
        hidden = max(1, int(mlp_ratio * dim))
        return nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))
    raise ValueError(f"head={head!r} is not allowed; expected 'linear' or 'mlp'")


class EncoderClassifier(SequenceModel):
    """Sequence classifier; ``forward(ids, attention_mask=None) -> logits (B, classes)``.

    Options after ``num_classes`` are those of ``DecoderLM`` (dim, depth, heads, max_len,
    mixer, mixer_options, mlp_ratio, dropout, body), plus ``head`` (``"linear"`` or
    ``"mlp"``, see ``classifier_head``) and ``causal``: run the blocks causally, so that a
    causal-only mixer can classify (the mean pool then reads every prefix state).

    Packed sequences: ``forward(ids (1, N), cu_seqlens=cu)`` returns (S, classes), one row
    per sequence, each as the sequence alone gets it (its own mean pool; positions restart
    at each boundary; :mod:`formerlab.attention.packed`).
    """

    def __init__(
        self, vocab_size: int, num_classes: int, dim: int = 128, depth: int = 2,
        heads: int = 4, max_len: int = 512, head: str = "linear", causal: bool = False,
        **options,
    ) -> None:
        super().__init__(vocab_size, dim, depth, heads, max_len, **options)
        self.causal = causal
        self.head = classifier_head(dim, num_classes, head, options.get("mlp_ratio", 4.0))

    def forward(
        self, ids: Tensor, attention_mask: Tensor | None = None, *, key_padding_mask: Any = None,
        cu_seqlens: Tensor | Packing | None = None,
    ) -> Tensor:
        refuse_key_padding_mask(key_padding_mask)
        if cu_seqlens is not None:
            refuse_mask_with_packing(attention_mask, cu_seqlens)
            packing = self.packing(ids, cu_seqlens)
            x = self.packed_hidden(ids, packing, causal=self.causal)
            return self.head(packing.segment_mean(x))
        x = self.hidden(ids, attention_mask, causal=self.causal)
        return self.head(masked_mean(x, attention_mask))
