"""Token (+ position) embeddings, and the embed -> blocks trunk every model shares.

Positions (``positions=``): ``"learned"`` adds a learned absolute embedding of ``max_len``
slots (sequences are capped at ``max_len``); ``"rope"`` adds nothing here and rotates q and
k inside every attention mixer instead (rotary embeddings, Su et al. 2021); ``"none"``
gives no position information beyond causality (and a pooling window). With ``rope`` and
``none`` nothing is tied to ``max_len``, so a decoder can run past it.

With an ``attention_mask`` positions count from each row's first real token (learned
and rotary alike, :func:`formerlab.mixers.streaming.row_positions`): a left-padded row
is embedded as the row alone, so prompts of different lengths share a batch.

Packed sequences (``cu_seqlens``, B = 1; :mod:`formerlab.attention.packed`): positions
restart at 0 at each boundary (learned: each token's position in its own sequence;
rotary: the mixers restart them), and every layer keeps the sequences apart.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from formerlab import mixers
from formerlab.attention.packed import Packing, as_packing, refuse_mask_with_packing
from formerlab.errors import check_choice
from formerlab.mixers.streaming import row_positions
from formerlab.models.block import BlockStack

POSITIONS = ("learned", "rope", "none")


def check_ids(ids: Any, vocab_size: int) -> Tensor:
    """``ids`` if it is an integer (B, N) tensor of token ids in [0, vocab_size)."""
    if not isinstance(ids, Tensor) or ids.dim() != 2 or ids.dtype not in (torch.int64, torch.int32):
        shape = tuple(ids.shape) if isinstance(ids, Tensor) else type(ids).__name__
        dtype = ids.dtype if isinstance(ids, Tensor) else ""
        raise ValueError(f"ids must be an integer (B, N) tensor; got {dtype} {shape}")
    # the range needs the values (a graph break under torch.compile): eager calls only;
    # a compiled model with a bad id fails in the embedding lookup itself
    if ids.numel() and not torch.compiler.is_compiling():
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= vocab_size:
            bad = low if low < 0 else high
            raise ValueError(
                f"token id {bad} is out of range: the vocabulary has vocab_size={vocab_size} "
                f"tokens, ids must be in [0, {vocab_size - 1}]"
            )
    return ids


def position_options(mixer: str, options: dict[str, Any], positions: str) -> dict[str, Any]:
    """Mixer options for ``positions``: ``rope=True`` for mixers that take it."""
    check_choice("positions", positions, POSITIONS)
    entry = mixers.MIXERS.entry(mixer)
    if positions == "rope" and (entry.accepts_any_option() or "rope" in entry.options()):
        return {**options, "rope": True}
    return dict(options)


class TokenEmbedding(nn.Module):
    """Token embedding, plus a learned absolute position embedding of ``max_len`` slots
    when ``positions="learned"``; ``forward(ids, start=0, positions=None)`` numbers the
    tokens from ``start`` (a streaming offset), or by ``positions`` (B, N) when given
    (counted from each row's first real token; padding before it, at negative
    positions, takes slot 0: its embedding is never attended to)."""

    def __init__(
        self, vocab_size: int, dim: int, max_len: int, dropout: float = 0.0,
        positions: str = "learned",
    ) -> None:
        super().__init__()
        self.max_len = max_len
        self.vocab_size = vocab_size
        self.position_mode = check_choice("positions", positions, POSITIONS)
        self.tokens = nn.Embedding(vocab_size, dim)
        self.positions = nn.Embedding(max_len, dim) if positions == "learned" else None
        self.drop = nn.Dropout(dropout)
        nn.init.normal_(self.tokens.weight, std=0.02)
        if self.positions is not None:
            nn.init.normal_(self.positions.weight, std=0.02)

    def forward(self, ids: Tensor, start: int = 0, positions: Tensor | None = None) -> Tensor:
        check_ids(ids, self.vocab_size)
        x = self.tokens(ids)
        if self.positions is None:
            return self.drop(x)
        if positions is None:
            end = start + ids.shape[1]
            positions = torch.arange(start, end, device=ids.device)
        else:  # the largest position needs its value (a graph break): eager calls only
            end = 0 if torch.compiler.is_compiling() else int(positions.max()) + 1
        if end > self.max_len:
            raise ValueError(
                f"sequence length {end} exceeds the model's max_len={self.max_len} (learned "
                "positions); use positions='rope' or 'none' to run past it"
            )
        return self.drop(x + self.positions(positions.clamp_min(0)))


class SequenceModel(nn.Module):
    """Embeddings followed by a body of MetaFormer blocks; subclasses add the head.

    ``body`` replaces the default ``BlockStack`` (e.g. a ``DEQStack``); it is called as
    ``body(x, attention_mask=..., causal=...)`` and returns (B, N, dim). With
    ``positions="rope"`` a given body must have been built with ``rope=True`` mixers
    (``position_options``).
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
        positions: str = "learned",
    ) -> None:
        super().__init__()
        self.max_len = max_len
        self.embed = TokenEmbedding(vocab_size, dim, max_len, dropout, positions)
        options = position_options(mixer, dict(mixer_options or {}), positions)
        self.body = body or BlockStack(dim, depth, heads, mixer, options, mlp_ratio, dropout)
        if positions == "rope" and not any(getattr(m, "rope", False) for m in self.mixers()):
            raise ValueError(
                f"positions='rope' rotates q and k inside attention, but mixer {mixer!r} has "
                "no rotary option (or the body was built without rope=True); use "
                "positions='learned' or 'none'"
            )

    @property
    def positions(self) -> str:
        """``"learned"``, ``"rope"`` or ``"none"``."""
        return self.embed.position_mode

    def mixers(self) -> list[nn.Module]:
        """Every token mixer of the body, in order."""
        return [m for m in self.body.modules() if isinstance(m, mixers.TokenMixer)]

    def hidden(
        self, ids: Tensor, attention_mask: Tensor | None, causal: bool,
        cu_seqlens: Tensor | Packing | None = None,
    ) -> Tensor:
        """(B, N) ids -> (B, N, dim) final hidden states (with ``attention_mask``, positions
        count from each row's first real token; with ``cu_seqlens``, see
        :meth:`packed_hidden`)."""
        if cu_seqlens is not None:
            refuse_mask_with_packing(attention_mask, cu_seqlens)
            return self.packed_hidden(ids, self.packing(ids, cu_seqlens), causal)
        positions = None
        if attention_mask is not None and self.positions == "learned":
            check_mask(attention_mask, ids)
            positions = row_positions(attention_mask)
        x = self.embed(ids, positions=positions)
        return self.body(x, attention_mask=attention_mask, causal=causal)


    def packing(self, ids: Tensor, cu_seqlens: Tensor | Packing) -> Packing:
        """The validated packing of ids (1, N) (``ValueError`` naming ``cu_seqlens``)."""
        check_ids(ids, self.embed.vocab_size)
        return as_packing(cu_seqlens, ids.shape[0], ids.shape[1], ids.device)

    def packed_hidden(self, ids: Tensor, packing: Packing, causal: bool) -> Tensor:
        """Packed ids (1, N) -> (1, N, dim): each sequence's hidden states as it gets
        alone, positions restarting at each boundary. A ``BlockStack`` body runs packed (its
        mixers pad, per position work stays on N tokens); any other body runs on the
        right-padded batch with its mask (as exact as its masked call)."""
        positions = packing.positions if self.positions == "learned" else None
        x = self.embed(ids, positions=positions)
        if isinstance(self.body, BlockStack):
            return self.body(x, causal=causal, cu_seqlens=packing)
        out = self.body(packing.pad(x, 1), attention_mask=packing.mask(), causal=causal)
        return packing.unpad(out, 1)


def check_mask(attention_mask: Any, ids: Tensor) -> Tensor:
    """``attention_mask`` if it is a bool tensor of the shape (B, N) of ``ids``."""
    ok = isinstance(attention_mask, Tensor) and attention_mask.dtype == torch.bool
    if not ok or attention_mask.shape != ids.shape:
        got = (
            f"dtype {attention_mask.dtype}, shape {tuple(attention_mask.shape)}"
            if isinstance(attention_mask, Tensor)
            else type(attention_mask).__name__
        )
        raise ValueError(
            f"attention_mask must be bool (B, N) = {tuple(ids.shape)} like ids, True = real "
            f"token; got {got}"
        )
    return attention_mask
