"""Decoder-only language model: embeddings -> causal MetaFormer blocks -> tied head."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from formerlab.models.embedding import SequenceModel


class DecoderLM(SequenceModel):
    """Causal LM over ``vocab_size`` tokens with any causal-capable token mixer.

    ``DecoderLM(vocab_size, dim=128, depth=4, heads=4, max_len=256, mixer="attention",
    mixer_options=None, mlp_ratio=4.0, dropout=0.0, body=None)``;
    ``forward(ids, key_padding_mask=None) -> logits (B, N, vocab_size)``.
    The output head shares the token-embedding matrix (tied weights).
    """

    def __init__(
        self, vocab_size: int, dim: int = 128, depth: int = 4, heads: int = 4,
        max_len: int = 256, **options,
    ) -> None:
        super().__init__(vocab_size, dim, depth, heads, max_len, **options)
        self.head = nn.Linear(dim, vocab_size, bias=False)
        self.head.weight = self.embed.tokens.weight

    def forward(self, ids: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
        return self.head(self.hidden(ids, key_padding_mask, causal=True))

    @torch.no_grad()
    def generate(
        self,
        ids: Tensor,
        tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Sample ``tokens`` new tokens after ``ids`` (B, N); returns (B, N + tokens)."""
        if temperature <= 0:
            raise ValueError(f"temperature={temperature} is not allowed; expected > 0")
        for _ in range(tokens):
            context = ids[:, -self.max_len :]
            logits = self(context)[:, -1].float() / temperature
            if top_k is not None:
                kth = logits.topk(min(top_k, logits.shape[-1])).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            nxt = torch.multinomial(logits.softmax(-1), 1, generator=generator)
            ids = torch.cat([ids, nxt], dim=1)
        return ids
