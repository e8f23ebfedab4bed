"""Decoder-only language model: embeddings -> causal MetaFormer blocks -> tied head.

Generation streams: ``DecoderLM.step(ids, state)`` runs the next tokens through every
layer's mixer state (a KV cache for softmax, a constant-size state for linear/performer,
a window buffer for pooling), so each new token costs one position, not a recompute of
the whole context. ``generate(..., use_cache=False)`` keeps the recompute path.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from formerlab import attention, mixers
from formerlab.errors import (
    check_positive_float,
    check_positive_int,
    refuse_key_padding_mask,
)
from formerlab.linalg.numerics import compute_dtype
from formerlab.models.embedding import SequenceModel, check_ids

_WARNED: set[str] = set()


@dataclass
class DecoderState:
    """A ``DecoderLM`` stream: one state per layer (the body's) and the number of tokens
    consumed so far (the position of the next token)."""

    layers: Any
    position: int = 0

    @property
    def nbytes(self) -> int:
        """Bytes held by every tensor of the state (allocated capacity)."""
        return tensor_bytes(self.layers)


def tensor_bytes(obj: Any) -> int:
    """Bytes of the tensors inside ``obj`` (dataclasses, lists, tuples, dicts, tensors)."""
    if isinstance(obj, Tensor):
        return obj.nbytes
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return sum(tensor_bytes(getattr(obj, f.name)) for f in dataclasses.fields(obj))
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(item) for item in obj)
    if isinstance(obj, dict):
        return sum(tensor_bytes(item) for item in obj.values())
    return 0


def check_causal_mixers(model: SequenceModel) -> None:
    """Raise at construction if a mixer of ``model`` cannot run causally, naming its
    kernel and the causal alternatives."""
    for mixer in model.mixers():
        if mixer.supports_causal:
            continue
        kernel = getattr(mixer, "kernel", None)
        what = f"token mixer {mixer.name!r}"
        if kernel is not None:
            what += f" with attention kernel {getattr(kernel, 'name', type(kernel).__name__)!r}"
        raise ValueError(
            f"a DecoderLM needs causal attention, but {what} does not support causal=True; "
            f"causal kernels: {attention.available(causal=True)}; causal mixers: "
            f"{mixers.available(causal=True)}"
        )


def sample_next(
    logits: Tensor, temperature: float, top_k: int | None, generator: torch.Generator | None
) -> Tensor:
    """One token per row of ``logits`` (B, V): softmax(logits / temperature) over the
    ``top_k`` likeliest (all if None); returns (B, 1) ids on ``logits``' device.

    The draw happens where ``generator`` lives (a CPU generator with a GPU model: the
    probabilities move, B × V numbers), so a CPU generator samples the same tokens whatever
    the model's device, up to the rounding of the probabilities.
    """
    logits = logits.to(compute_dtype(logits.dtype)) / temperature
    if top_k is not None:
        kth = logits.topk(min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1)
    if generator is not None:
        probs = probs.to(generator.device)
    return torch.multinomial(probs, 1, generator=generator).to(logits.device)


def warn_once(key: str, message: str) -> None:
    """Warn the first time ``key`` is seen in this process."""
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


class DecoderLM(SequenceModel):
    """Causal LM over ``vocab_size`` tokens with any causal-capable token mixer.

    ``DecoderLM(vocab_size, dim=128, depth=4, heads=4, max_len=256, mixer="attention",
    mixer_options=None, mlp_ratio=4.0, dropout=0.0, body=None, positions="learned")``;
    ``forward(ids, attention_mask=None) -> logits (B, N, vocab_size)``.
    The output head shares the token-embedding matrix (tied weights). A mixer or kernel
    that cannot run causally is refused here, at construction.
    """

    def __init__(
        self, vocab_size: int, dim: int = 128, depth: int = 4, heads: int = 4,
        max_len: int = 256, **options,
    ) -> None:
        super().__init__(vocab_size, dim, depth, heads, max_len, **options)
        check_causal_mixers(self)
        self.head = nn.Linear(dim, vocab_size, bias=False)
        self.head.weight = self.embed.tokens.weight

    def forward(
        self, ids: Tensor, attention_mask: Tensor | None = None, *, key_padding_mask: Any = None
    ) -> Tensor:
        refuse_key_padding_mask(key_padding_mask)
        return self.head(self.hidden(ids, attention_mask, causal=True))

    @property
    def supports_streaming(self) -> bool:
        """Whether ``init_state`` / ``step`` work (every layer's mixer streams)."""
        return bool(getattr(self.body, "supports_streaming", False))

    def init_state(
        self, batch: int, *, dtype: torch.dtype | None = None, device: Any = None
    ) -> DecoderState:
        """An empty stream for ``batch`` sequences (dtype / device default to the model's)."""
        if not self.supports_streaming:
            raise ValueError(
                f"this DecoderLM's body ({type(self.body).__name__}) cannot stream; use "
                "generate(..., use_cache=False) or a body whose mixers all stream"
            )
        weight = self.embed.tokens.weight
        dtype = weight.dtype if dtype is None else dtype
        device = weight.device if device is None else device
        return DecoderState(self.body.init_state(batch, dtype=dtype, device=device), 0)

    def step(self, ids: Tensor, state: DecoderState) -> tuple[Tensor, DecoderState]:
        """Logits (B, T, vocab_size) for the next T tokens ``ids`` of the stream; equal to
        the last T rows of ``forward`` on the whole sequence so far."""
        if not isinstance(state, DecoderState):
            raise ValueError(f"state must be a DecoderState (from init_state); got {type(state).__name__}")
        check_ids(ids, self.embed.vocab_size)
        if ids.shape[1] < 1:
            raise ValueError(f"step needs at least one token; got ids of shape {tuple(ids.shape)}")
        x = self.embed(ids, start=state.position)
        x, layers = self.body.step(x, state.layers)
        return self.head(x), DecoderState(layers, state.position + ids.shape[1])

    def context(self, ids: Tensor) -> Tensor:
        """What the model can condition on: the last ``max_len`` tokens with learned
        positions (a sliding window), everything with ``rope`` / ``none``."""
        return ids[:, -self.max_len :] if self.positions == "learned" else ids

    @torch.no_grad()
    def generate(
        self,
        ids: Tensor,
        tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
        *,
        use_cache: bool = True,
    ) -> Tensor:
        """Sample ``tokens`` new tokens after ``ids`` (B, N >= 1); returns (B, N + tokens).

        ``use_cache`` streams through ``step`` (each token costs one position); False
        recomputes the whole context per token. Both give the same tokens up to float
        rounding (``top_k=1`` is greedy). See ``stream`` for the details.
        """
        new = list(self.stream(ids, tokens, temperature, top_k, generator, use_cache=use_cache))
        return torch.cat([ids, *new], dim=1)

    @torch.no_grad()
    def stream(
        self,
        ids: Tensor,
        tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
        *,
        use_cache: bool = True,
    ) -> Iterator[Tensor]:
        """Yield the ``tokens`` sampled tokens one at a time, each (B, 1), as produced.

        With learned positions the model sees at most ``max_len`` tokens: past that the
        window slides, and the cache is rebuilt from the window for every token (learned
        absolute positions shift with the window, so nothing can be reused). With
        ``rope`` / ``none`` the cache runs on past ``max_len``. A body that cannot stream
        (a DEQ body: its fixed point is solved jointly over all positions) falls back to
        recomputing, with a one-time warning.
        """
        self._check_generate(ids, tokens, temperature, top_k)
        if use_cache and not self.supports_streaming:
            warn_once(
                type(self.body).__name__,
                f"{type(self.body).__name__} cannot stream its state; generate() recomputes "
                "the whole context for every token (use_cache=False)",
            )
            use_cache = False
        state = None
        for _ in range(tokens):
            if not use_cache:
                logits = self(self.context(ids))
            elif state is None or (
                self.positions == "learned" and state.position + 1 > self.max_len
            ):
                context = self.context(ids)
                state = self.init_state(ids.shape[0])
                logits, state = self.step(context, state)
            else:
                logits, state = self.step(ids[:, -1:], state)
            nxt = sample_next(logits[:, -1], temperature, top_k, generator)
            ids = torch.cat([ids, nxt], dim=1)
            yield nxt

    def _check_generate(self, ids: Tensor, tokens: int, temperature: float, top_k: Any) -> None:
        check_ids(ids, self.embed.vocab_size)
        if ids.shape[0] < 1 or ids.shape[1] < 1:
            raise ValueError(
                f"ids must hold at least one prompt token per sequence (B, N >= 1); got shape "
                f"{tuple(ids.shape)}"
            )
        check_positive_int("tokens", tokens, minimum=0)
        check_positive_float("temperature", temperature)
        if top_k is not None:
            check_positive_int("top_k", top_k)
