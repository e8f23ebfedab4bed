"""Decoder-only language model: embeddings -> causal MetaFormer blocks -> tied head.

Generation streams: ``DecoderLM.step(ids, state)`` runs the next tokens through every
layer's mixer state (a KV cache for softmax, a constant-size state for linear/performer,
a window buffer for pooling), so each new token costs one position, not a recompute of
the whole context. ``generate(..., use_cache=False)`` keeps the recompute path.

Batches of prompts of different lengths: ``generate(ids, tokens, attention_mask=mask)``
with the prompts left-padded (``mask`` bool (B, N), True = real token) gives every row
what the prompt alone gives: positions count from each row's first real token and
padding adds nothing to any layer's state (``step(ids, state, attention_mask=...)``).

Packed sequences (``cu_seqlens``, B = 1; :mod:`formerlab.attention.packed`):
``forward(ids (1, N), cu_seqlens=cu)`` gives (1, N, vocab_size), each sequence's logits as
it gets alone (positions restart at each boundary); ``logits, state = prefill(ids, cu)``
starts S streams from packed prompts, and ``step(next_ids (S, T), state)`` continues them.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from formerlab import attention, mixers
from formerlab.attention.packed import Packing
from formerlab.errors import (
    check_positive_float,
    check_positive_int,
    refuse_key_padding_mask,
)
from formerlab.linalg.numerics import compute_dtype
from formerlab.mixers.streaming import advance_positions
from formerlab.models.embedding import SequenceModel, check_ids, check_mask

#: one generator for the batch, one per row (each row then samples as it would alone), or None
Generators = torch.Generator | Sequence[torch.Generator] | None

_WARNED: set[str] = set()


@dataclass
class DecoderState:
    """A ``DecoderLM`` stream: one state per layer (the body's) and the number of tokens
    consumed so far (the position of the next token). ``lead`` (B,), once a step has had
    an ``attention_mask``: each row's first real position (``position`` while a row has
    none), from which its learned positions count; None: every row started at 0."""

    layers: Any
    position: int = 0
    lead: Tensor | None = None

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
    logits: Tensor, temperature: float, top_k: int | None, generator: Generators
) -> Tensor:
    """One token per row of ``logits`` (B, V): softmax(logits / temperature) over the
    ``top_k`` likeliest (all if None); returns (B, 1) ids on ``logits``' device.

    The draw happens where ``generator`` lives (a CPU generator with a GPU model: the
    probabilities move, B × V numbers), so a CPU generator samples the same tokens whatever
    the model's device, up to the rounding of the probabilities. A sequence of B
    generators draws row b with the b-th (one draw each, as a batch of one would), so a
    row's tokens do not depend on the other rows.
    """
    logits = logits.to(compute_dtype(logits.dtype)) / temperature
    if top_k is not None:
        kth = logits.topk(min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1)
    if generator is None or isinstance(generator, torch.Generator):
        if generator is not None:
            probs = probs.to(generator.device)
        return torch.multinomial(probs, 1, generator=generator).to(logits.device)
    rows = [
        torch.multinomial(probs[b : b + 1].to(g.device), 1, generator=g).to(logits.device)
        for b, g in enumerate(generator)
    ]
    return torch.cat(rows, dim=0)


def warn_once(key: str, message: str) -> None:
    """Warn the first time ``key`` is seen in this process."""
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


class DecoderLM(SequenceModel):
    """Causal LM over ``vocab_size`` tokens with any causal-capable token mixer.

    ``DecoderLM(vocab_size, dim=128, depth=4, heads=4, max_len=256, mixer="attention",
    mixer_options=None, mlp_ratio=4.0, dropout=0.0, body=None, positions="learned")``;
    ``forward(ids, attention_mask=None, *, cu_seqlens=None) -> logits (B, N, vocab_size)``
    (packed sequences: ids (1, N) and ``cu_seqlens``, see the module doc).
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
        self, ids: Tensor, attention_mask: Tensor | None = None, *, key_padding_mask: Any = None,
        cu_seqlens: Tensor | Packing | None = None,
    ) -> Tensor:
        refuse_key_padding_mask(key_padding_mask)
        return self.head(self.hidden(ids, attention_mask, causal=True, cu_seqlens=cu_seqlens))

    def prefill(
        self, ids: Tensor, cu_seqlens: Tensor | Packing
    ) -> tuple[Tensor, DecoderState]:
        """Start S streams from packed prompts ids (1, N): returns ``(logits, state)``,
        ``logits`` (1, N, vocab_size) equal to ``forward(ids, cu_seqlens=cu_seqlens)`` and
        ``state`` a stream of S rows that :meth:`step` continues with ids (S, T), each row
        exactly as its prompt streamed alone.

        The prompts are left-padded to one width and stepped with their mask (every row
        then ends in the last column; positions count from each row's first real token).
        """
        packing = self.packing(ids, cu_seqlens)
        state = self.init_state(packing.count)
        padded = packing.pad(ids, 1, left=True)
        logits, state = self.step(padded, state, attention_mask=packing.mask(left=True))
        return packing.unpad(logits, 1, left=True), state

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

    def step(
        self, ids: Tensor, state: DecoderState, attention_mask: Tensor | None = None
    ) -> tuple[Tensor, DecoderState]:
        """Logits (B, T, vocab_size) for the next T tokens ``ids`` of the stream; equal to
        the last T rows of ``forward`` on the whole sequence so far.

        ``attention_mask`` (B, T), True = real token, for these T tokens (None: all
        real): equal to ``forward`` with the masks of all steps side by side. Padded
        tokens add nothing to any layer's state and positions count from each row's first
        real token, so a left-padded prompt then its continuation give that row what the
        prompt alone gives. ``state`` is left unchanged (a value).
        """
        if not isinstance(state, DecoderState):
            raise ValueError(f"state must be a DecoderState (from init_state); got {type(state).__name__}")
        check_ids(ids, self.embed.vocab_size)
        if ids.shape[1] < 1:
            raise ValueError(f"step needs at least one token; got ids of shape {tuple(ids.shape)}")
        if attention_mask is not None:
            check_mask(attention_mask, ids)
        b, t = ids.shape
        lead, positions = advance_positions(
            state.lead, state.position, attention_mask, b, t, ids.device
        )
        x = self.embed(ids, start=state.position, positions=positions)
        x, layers = self.body.step(x, state.layers, attention_mask=attention_mask)
        return self.head(x), DecoderState(layers, state.position + t, lead)

    def context(self, ids: Tensor) -> Tensor:
        """What the model can condition on: the last ``max_len`` tokens with learned
        positions (a sliding window), everything with ``rope`` / ``none``. (Also applied
        to a (B, N) attention mask, column for column.)"""
        return ids[:, -self.max_len :] if self.positions == "learned" else ids

    @torch.no_grad()
    def generate(
        self,
        ids: Tensor,
        tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: Generators = None,
        *,
        use_cache: bool = True,
        attention_mask: Tensor | None = None,
    ) -> Tensor:
        """Sample ``tokens`` new tokens after ``ids`` (B, N >= 1); returns (B, N + tokens).

        ``use_cache`` streams through ``step`` (each token costs one position); False
        recomputes the whole context per token. Both give the same tokens up to float
        rounding (``top_k=1`` is greedy). ``attention_mask`` (B, N), True = real token:
        prompts of different lengths, left-padded (any token ids in the padding); each row
        gets the tokens its prompt alone gets (with a generator per row when sampling).
        See ``stream`` for the details.
        """
        new = list(self.stream(ids, tokens, temperature, top_k, generator,
                               use_cache=use_cache, attention_mask=attention_mask))
        return torch.cat([ids, *new], dim=1)

    @torch.no_grad()
    def stream(
        self,
        ids: Tensor,
        tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: Generators = None,
        *,
        use_cache: bool = True,
        attention_mask: Tensor | None = None,
    ) -> Iterator[Tensor]:
        """Yield the ``tokens`` sampled tokens one at a time, each (B, 1), as produced.

        With learned positions the model sees at most ``max_len`` tokens: past that the
        window slides, and the cache is rebuilt from the window for every token (learned
        absolute positions shift with the window, so nothing can be reused). With
        ``rope`` / ``none`` the cache runs on past ``max_len``. A body that cannot stream
        (a DEQ body: its fixed point is solved jointly over all positions) falls back to
        recomputing, with a one-time warning.

        A batch of prompts of different lengths: ``attention_mask`` (B, N), True = real
        token, with left padding only (each row's padding before its first real token;
        anything else raises ``ValueError``). Every row then gets what its prompt alone
        gets: greedy tokens (``top_k=1``) exactly, logits up to float rounding. Sampling
        draws row b with ``generator[b]`` when ``generator`` is a sequence of B generators,
        so a row seeded like a prompt alone samples the same tokens (up to the rounding of
        the probabilities); one generator draws for the rows in turn, so a row's sample
        then depends on the rows before it.
        """
        self._check_generate(ids, tokens, temperature, top_k, generator)
        mask = check_left_padding(attention_mask, ids)
        if use_cache and not self.supports_streaming:
            warn_once(
                type(self.body).__name__,
                f"{type(self.body).__name__} cannot stream its state; generate() recomputes "
                "the whole context for every token (use_cache=False)",
            )
            use_cache = False
        state = None
        for _ in range(tokens):
            context = self.context(ids)
            window = None if mask is None else self.context(mask)
            if window is not None and bool(window.all()):
                window = None  # no padding left in view: the unpadded path
            if not use_cache:
                logits = self(context, attention_mask=window)
            elif state is None or (
                self.positions == "learned" and state.position + 1 > self.max_len
            ):
                state = self.init_state(ids.shape[0])
                logits, state = self.step(context, state, attention_mask=window)
            else:  # the new token is real in every row
                logits, state = self.step(ids[:, -1:], state)
            nxt = sample_next(logits[:, -1], temperature, top_k, generator)
            ids = torch.cat([ids, nxt], dim=1)
            if mask is not None:
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            yield nxt

    def _check_generate(
        self, ids: Tensor, tokens: int, temperature: float, top_k: Any, generator: Any = None
    ) -> None:
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
        check_generators(generator, ids.shape[0])


def check_generators(generator: Any, batch: int) -> None:
    """Raise ``ValueError`` unless ``generator`` is None, a ``torch.Generator`` or a
    sequence of ``batch`` of them (one per row)."""
    if generator is None or isinstance(generator, torch.Generator):
        return
    gens = list(generator) if isinstance(generator, (list, tuple)) else None
    if gens is None or len(gens) != batch or not all(isinstance(g, torch.Generator) for g in gens):
        got = f"{len(gens)} items" if gens is not None else type(generator).__name__
        raise ValueError(
            f"generator must be a torch.Generator, None, or a list of one torch.Generator per "
            f"row ({batch}); got {got}"
        )


def check_left_padding(attention_mask: Any, ids: Tensor) -> Tensor | None:
    """The prompts' mask for generation, or None when there is none.

    ``attention_mask`` must be bool (B, N) like ``ids``, with every row's padding before
    its first real token (left padding: new tokens are appended after each row's last
    real token, which must be the last column) and at least one real token per row.
    """
    if attention_mask is None:
        return None
    check_mask(attention_mask, ids)
    empty = (~attention_mask.any(dim=1)).nonzero().flatten().tolist()
    if empty:
        raise ValueError(
            f"attention_mask rows {empty} have no real token; every prompt needs at least one"
        )
    # left padding: once a row is real it stays real (no False after a True)
    gaps = (attention_mask[:, :-1] & ~attention_mask[:, 1:]).any(dim=1)
    bad = gaps.nonzero().flatten().tolist()
    if bad:
        raise ValueError(
            f"attention_mask rows {bad} have padding after a real token; generation expects "
            "left padding (each row's padding before its first real token, its prompt "
            "ending in the last column)"
        )
    return attention_mask
