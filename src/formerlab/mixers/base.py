"""The token-mixer contract: x (B, N, C) -> (B, N, C), called as
``mixer(x, attention_mask=None, causal=False)``.

The MetaFormer block around a mixer is fixed; the mixer is the plug-in. A mixer that
cannot run causally raises ``ValueError`` on ``causal=True``.

Streaming (decoding without recomputing the past): a causal mixer with
``supports_streaming`` gives ``state = mixer.init_state(batch, dtype=..., device=...)`` and
``out, state = mixer.step(x, state)`` for x (B, T, C) holding the next T >= 1 tokens;
the outputs equal the matching rows of ``mixer(whole_sequence, causal=True)``.

Padding in a stream: ``mixer.step(x, state, attention_mask=mask)`` with ``mask`` bool
(B, T), True = real, for the T new tokens, equals the matching rows of
``mixer(whole_sequence, attention_mask=whole_mask, causal=True)`` (``whole_mask``: the
masks of all steps side by side; a step without one counts as all real). Padded tokens
add nothing to the state (a kernel's KV cache masks them, feature sums and landmarks
leave them out, a pooling window does not count them) and positions count from each
row's first real token, so a left-padded row streams exactly as the row alone: prompts
of different lengths decode in one batch. The mask is checked on every step; a state is
still a value (``step`` never changes the state it is given).

Packed sequences (``cu_seqlens``, B = 1, the offsets of FlashAttention's varlen functions
and fla; :mod:`formerlab.attention.packed`): ``mixer(x, causal=..., cu_seqlens=cu)`` on x
(1, N, C) gives each sequence the output it gets alone, rotary positions restarting at
each boundary. It runs the masked call on the right-padded batch (:meth:`mix_packed`, a
hook a mixer with a native varlen form may override), so every causal mixer takes it with
``causal=True`` (prefix consistency: right padding changes no real output); with
``causal=False`` those whose padding is exact do (:meth:`TokenMixer.packs`).
``out, state = mixer.prefill(x, cu_seqlens)`` starts S streams from packed prompts, then
``mixer.step`` continues them together (B = S), each exactly as the sequence streamed
alone.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from formerlab.attention.packed import Packing, as_packing, refuse_mask_with_packing
from formerlab.errors import refuse_key_padding_mask


def check_mixer_input(x: Tensor, dim: int, attention_mask: Tensor | None) -> None:
    """Validate a mixer call; raise ``ValueError`` naming the bad argument."""
    if not isinstance(x, Tensor) or x.dim() != 3 or x.shape[-1] != dim:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"x must be a (B, N, C={dim}) tensor; got {shape}")
    if attention_mask is not None and (
        attention_mask.dtype != torch.bool or attention_mask.shape != x.shape[:2]
    ):
        raise ValueError(
            f"attention_mask must be bool (B, N) = {tuple(x.shape[:2])}, True = real "
            f"token; got dtype {attention_mask.dtype}, shape {tuple(attention_mask.shape)}"
        )


def check_batch(batch: Any) -> int:
    """``batch`` if it is an int >= 1."""
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch={batch!r} is not allowed; expected an integer >= 1")
    return batch


def zero_padded(t: Tensor, real: Tensor | None) -> Tensor:
    """``t`` (B, T, ...) with the positions where ``real`` (bool (B, T)) is False set to 0
    (``where``, not a product: junk in a padded slot cannot turn into NaN)."""
    if real is None:
        return t
    return torch.where(real.view(*real.shape, *([1] * (t.dim() - 2))), t, 0.0)


class TokenMixer(nn.Module):
    """Base class for mixers; subclasses implement ``mix`` and set ``supports_causal``."""

    name: str = "mixer"
    #: whether a ``causal=False`` call takes ``cu_seqlens`` (see :meth:`packs`)
    packs_bidirectional: bool = False

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim

    @property
    def supports_causal(self) -> bool:
        return False

    @property
    def supports_streaming(self) -> bool:
        """Whether ``init_state`` / ``step`` work (incremental causal decoding)."""
        return False

    def mix(self, x: Tensor, attention_mask: Tensor | None, causal: bool) -> Tensor:
        raise NotImplementedError

    def init_state(
        self, batch: int, *, dtype: torch.dtype = torch.float32, device: Any = None
    ) -> Any:
        """The state of an empty causal stream of ``batch`` sequences, on ``device``: by
        default the mixer's parameters' (torch's default device for one without any)."""
        self._check_streaming()
        if device is None:
            device = next((p.device for p in self.parameters()), None)
        return self.new_state(check_batch(batch), dtype, device)

    def step(
        self, x: Tensor, state: Any, attention_mask: Tensor | None = None
    ) -> tuple[Tensor, Any]:
        """Mix the next tokens x (B, T, C) causally against the stream in ``state``;
        returns ``(out (B, T, C), new_state)``. ``attention_mask`` (B, T), True = real
        token: as the parallel call with the same mask (see the module doc)."""
        self._check_streaming()
        check_mixer_input(x, self.dim, attention_mask)
        if x.shape[1] < 1:
            raise ValueError(f"step needs at least one new token; got x of shape {tuple(x.shape)}")
        if attention_mask is None:
            return self.step_mix(x, state)
        return self.step_mix(x, state, attention_mask)

    def new_state(self, batch: int, dtype: torch.dtype, device: Any) -> Any:
        raise NotImplementedError

    def step_mix(
        self, x: Tensor, state: Any, attention_mask: Tensor | None = None
    ) -> tuple[Tensor, Any]:
        raise NotImplementedError

    def _check_streaming(self) -> None:
        if not self.supports_streaming:
            raise ValueError(
                f"token mixer {self.name!r} ({self.extra_repr()}) does not support streaming "
                "(init_state/step); it needs a causal mechanism with a streaming state"
            )

    def forward(
        self, x: Tensor, attention_mask: Tensor | None = None, causal: bool = False,
        *, key_padding_mask: Any = None, cu_seqlens: Tensor | Packing | None = None,
    ) -> Tensor:
        refuse_key_padding_mask(key_padding_mask)
        check_mixer_input(x, self.dim, attention_mask)
        if causal and not self.supports_causal:
            raise ValueError(
                f"token mixer {self.name!r} ({self.extra_repr()}) does not support causal=True"
            )
        if cu_seqlens is not None:
            packing = self._packing(x, attention_mask, bool(causal), cu_seqlens)
            return self.mix_packed(x, packing, bool(causal))
        return self.mix(x, attention_mask, bool(causal))

    # --- packed sequences (cu_seqlens) -------------------------------------------------

    def packs(self, causal: bool) -> bool:
        """Whether a call with this ``causal`` flag takes ``cu_seqlens``: every causal
        mixer with ``causal=True`` (prefix consistent, so right padding is exact); with
        ``causal=False`` those that set ``packs_bidirectional`` (or override this)."""
        return self.supports_causal if causal else self.packs_bidirectional

    def mix_packed(self, x: Tensor, packing: Packing, causal: bool) -> Tensor:
        """The call on packed x (1, N, C): the right-padded (S, L, C) batch mixed with its
        mask, unpadded. A mixer with a native varlen form may override this hook."""
        out = self.mix(packing.pad(x, 1), packing.mask(), causal)
        return packing.unpad(out, 1)

    def prefill(self, x: Tensor, cu_seqlens: Tensor | Packing) -> tuple[Tensor, Any]:
        """Start S streams from packed prompts x (1, N, C): returns ``(out, state)``, ``out``
        (1, N, C) equal to ``self(x, causal=True, cu_seqlens=cu_seqlens)`` and ``state`` a
        stream of S rows that :meth:`step` continues with B = S, each row exactly as its
        sequence streamed alone (positions included).

        The prompts are left-padded to one width and stepped with their mask, so every row
        ends in the last column: a masked step adds nothing for padding and counts each
        row's positions from its first real token (see the module doc).
        """
        self._check_streaming()
        check_mixer_input(x, self.dim, None)
        packing = as_packing(cu_seqlens, x.shape[0], x.shape[1], x.device)
        state = self.init_state(packing.count, dtype=x.dtype, device=x.device)
        out, state = self.step(
            packing.pad(x, 1, left=True), state, attention_mask=packing.mask(left=True)
        )
        return packing.unpad(out, 1, left=True), state

    def _packing(
        self, x: Tensor, attention_mask: Tensor | None, causal: bool, cu_seqlens: Any
    ) -> Packing:
        """The validated packing of a call (``ValueError`` where this mixer cannot)."""
        if not self.packs(causal):
            raise ValueError(
                f"token mixer {self.name!r} ({self.extra_repr()}) cannot take cu_seqlens with "
                f"causal={causal}; {packed_mixers_text()}"
            )
        refuse_mask_with_packing(attention_mask, cu_seqlens)
        return as_packing(cu_seqlens, x.shape[0], x.shape[1], x.device)


def packed_mixers_text() -> str:
    """Which mixers take ``cu_seqlens``, for error messages."""
    from formerlab import attention
    from formerlab.mixers.params import takes_kernel
    from formerlab.mixers.registry import MIXERS, available

    causal = available(causal=True)
    kernel_mixers = [n for n in available() if takes_kernel(n)]
    plain = [
        n for n in available()
        if not takes_kernel(n) and getattr(MIXERS.entry(n).factory, "packs_bidirectional", False)
    ]
    return (
        f"with causal=True every causal mixer takes it: {causal}; with causal=False: {plain}, "
        f"and {kernel_mixers} with one of the kernels "
        f"{attention.available(causal=False, packed=True)}"
    )
