"""The attention-kernel contract shared by every mechanism.

A kernel is called on per-head tensors ``q, k, v`` of shape (B, H, N, D) as
``kernel(q, k, v, attention_mask=None, causal=False, need_weights=False)``:

* ``attention_mask``: bool (B, N), True = real token. Outputs at padded query
  positions are zero, and padded keys get no weight.
* ``causal``: position i sees keys j <= i only. A kernel that cannot do this raises
  ``ValueError`` naming the causal kernels instead of ignoring the flag.
* ``need_weights``: also return the (B, H, N, N) attention matrix (exact or the
  mechanism's approximation) as ``(out, weights)``.

* ``cu_seqlens``: packed sequences (B = 1, FlashAttention's / fla's offsets; see
  :mod:`formerlab.attention.packed`): each sequence gets the output it gets alone, in the
  calls named by the kernel's ``packed_modes``; other kernels raise ``ValueError`` naming
  those that can.

``causal`` and ``need_weights`` must be real bools (``causal="no"`` raises). Constructor
options are checked by ``check_kernel_options`` (one rule per option name).

Output dtype equals the input dtype. ``last_info`` holds the diagnostics of the last
call for mechanisms that iterate (None otherwise).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from formerlab.attention.packed import Packing, as_packing, refuse_mask_with_packing
from formerlab.errors import check_positive_float, check_positive_int, refuse_key_padding_mask
from formerlab.linalg.numerics import compute_dtype

__all__ = [
    "OPTION_RULES",
    "AttentionKernel",
    "allowed_keys",
    "check_attention_inputs",
    "check_kernel_options",
    "compute_dtype",
    "zero_padded_queries",
]

#: How every numeric constructor option of a kernel is checked: ("int", minimum), ("int",
#: None) for any integer, or ("float", 0) for a finite number > 0. One table, so ``scale``
#: (or ``num_landmarks``) means the same thing and fails the same way in every kernel.
OPTION_RULES: dict[str, tuple[str, int | None]] = {
    "scale": ("float", 0),
    "num_landmarks": ("int", 1),
    "segment_size": ("int", 1),
    "chunk_size": ("int", 1),
    "num_features": ("int", 1),
    "redraw_interval": ("int", 0),
    "seed": ("int", None),
    "select_rows": ("int", 1),
    "pinv_iters": ("int", 0),
    "pinv_max_iter": ("int", 1),
    "pinv_order": ("int", 2),
    "pinv_tol": ("float", 0),
    "pinv_reg_param": ("float", 0),
    "conv_kernel": ("int", 1),
    "conv_heads": ("int", 1),
}


def check_kernel_options(kernel: str, nullable: Iterable[str] = (), **options: Any) -> None:
    """Validate numeric constructor options of kernel ``kernel`` by the rules of
    ``OPTION_RULES``; options named in ``nullable`` may also be None ("not set").

    Raises ``ValueError`` naming the kernel, the option, the value and what is allowed,
    before the kernel is built (so ``scale="x"`` never reaches SDPA as a ``TypeError``).
    """
    nullable = set(nullable)
    for arg, value in options.items():
        if arg not in OPTION_RULES:
            raise KeyError(f"no validation rule for kernel option {arg!r}; add it to OPTION_RULES")
        if value is None and arg in nullable:
            continue
        kind, minimum = OPTION_RULES[arg]
        try:
            if kind == "int" and minimum is None:
                if isinstance(value, bool) or not isinstance(value, int):
                    raise ValueError(f"{arg}={value!r} is not allowed; expected an integer")
            elif kind == "int":
                check_positive_int(arg, value, minimum=minimum)
            else:
                check_positive_float(arg, value)
        except ValueError as error:
            hint = " or None" if arg in nullable else ""
            raise ValueError(f"attention kernel {kernel!r}: {error}{hint}") from None


def check_attention_inputs(
    q: Tensor, k: Tensor, v: Tensor, attention_mask: Tensor | None
) -> None:
    """Validate shapes and dtypes of a kernel call; raise ``ValueError`` naming the culprit."""
    for arg, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor) or t.dim() != 4:
            shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"{arg} must be a 4-d tensor (B, H, N, D); got {shape}")
        if not t.is_floating_point():
            raise ValueError(f"{arg} must be floating point; got dtype {t.dtype}")
    if q.shape[:3] != k.shape[:3] or k.shape[:3] != v.shape[:3]:
        raise ValueError(
            "q, k, v must agree in (B, H, N); got "
            f"q={tuple(q.shape)}, k={tuple(k.shape)}, v={tuple(v.shape)}"
        )
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"q and k must have the same feature size D; got {q.shape[-1]} and {k.shape[-1]}"
        )
    if q.dtype != k.dtype or q.dtype != v.dtype:
        raise ValueError(f"q, k, v must share one dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if attention_mask is not None:
        b, _, n, _ = q.shape
        if attention_mask.dtype != torch.bool or tuple(attention_mask.shape) != (b, n):
            raise ValueError(
                "attention_mask must be a bool tensor of shape (B, N) = "
                f"({b}, {n}) with True = real token; got dtype {attention_mask.dtype}, "
                f"shape {tuple(attention_mask.shape)}"
            )


def allowed_keys(
    attention_mask: Tensor | None, causal: bool, n: int, device: torch.device
) -> Tensor | None:
    """Bool mask (B or 1, 1, N, N) of which key each query may see, or None if all.

    Queries that would see no key at all (padded queries, or left padding under a causal
    mask) are given every key instead: their output is zeroed afterwards, and this keeps
    softmax free of NaN in the forward *and* backward pass.
    """
    mask = None
    if causal:
        mask = torch.ones(n, n, dtype=torch.bool, device=device).tril()[None, None]
    if attention_mask is not None:
        keys = attention_mask[:, None, None, :]
        mask = keys if mask is None else mask & keys
    if mask is None:
        return None
    empty = ~mask.any(dim=-1, keepdim=True)
    return mask | empty


def zero_padded_queries(out: Tensor, attention_mask: Tensor | None) -> Tensor:
    """Zero the outputs at padded query positions (the contract for every kernel)."""
    if attention_mask is None:
        return out
    return out * attention_mask[:, None, :, None].to(out.dtype)


class AttentionKernel(nn.Module):
    """Base class: validates a call, dispatches to ``attend``, enforces the contract.

    Subclasses set ``supports_causal`` and implement ``attend(q, k, v, attention_mask,
    causal, need_weights) -> (out, weights or None)``.
    """

    name: str = "kernel"
    supports_causal: bool = False
    #: the calls that take ``cu_seqlens``: ``"causal"`` (``causal=True``) and/or
    #: ``"bidirectional"`` (``causal=False``); only where padding with a mask leaves every
    #: real output as the sequence alone gives it (tested over the registry)
    packed_modes: tuple[str, ...] = ()

    def __init__(self) -> None:
        super().__init__()
        self.last_info: Any = None

    def attend(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        attention_mask: Tensor | None,
        causal: bool,
        need_weights: bool,
    ) -> tuple[Tensor, Tensor | None]:
        raise NotImplementedError

    def forward(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        attention_mask: Tensor | None = None,
        causal: bool = False,
        need_weights: bool = False,
        *,
        key_padding_mask: Any = None,
        cu_seqlens: Tensor | Packing | None = None,
    ) -> Tensor | tuple[Tensor, Tensor]:
        refuse_key_padding_mask(key_padding_mask)
        check_attention_inputs(q, k, v, attention_mask)
        for arg, flag in (("causal", causal), ("need_weights", need_weights)):
            if not isinstance(flag, bool):  # "no" would be truthy: never guess
                raise ValueError(f"{arg}={flag!r} is not allowed; expected True or False")
        if causal and not self.supports_causal:
            from formerlab.attention.registry import available

            raise ValueError(
                f"attention kernel {self.name!r} does not support causal=True; "
                f"use one of the causal kernels: {available(causal=True)}"
            )
        if cu_seqlens is not None:
            packing = self._packing(q, attention_mask, causal, cu_seqlens)
            return self.attend_packed(q, k, v, packing, causal, need_weights)
        return self._attend_masked(q, k, v, attention_mask, causal, need_weights)

    def _attend_masked(
        self, q: Tensor, k: Tensor, v: Tensor, attention_mask: Tensor | None, causal: bool,
        need_weights: bool,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """``attend`` with the contract enforced: padded queries give 0, q's dtype."""
        out, weights = self.attend(q, k, v, attention_mask, causal, need_weights)
        out = zero_padded_queries(out, attention_mask).to(q.dtype)
        if need_weights:
            if weights is None:
                raise ValueError(f"attention kernel {self.name!r} cannot return weights")
            return out, weights
        return out

    def extra_repr(self) -> str:
        return f"name={self.name!r}, causal={self.supports_causal}"

    # --- packed sequences (cu_seqlens) -------------------------------------------------

    def packs(self, causal: bool) -> bool:
        """Whether a call with this ``causal`` flag takes ``cu_seqlens``."""
        return ("causal" if causal else "bidirectional") in self.packed_modes

    def _packing(
        self, q: Tensor, attention_mask: Tensor | None, causal: bool, cu_seqlens: Any
    ) -> Packing:
        """The validated packing of a call (``ValueError`` where this kernel cannot)."""
        if not self.packs(causal):
            from formerlab.attention.registry import available

            raise ValueError(
                f"attention kernel {self.name!r} cannot take cu_seqlens with causal={causal}; "
                f"kernels that can: {available(causal=causal, packed=True)}"
            )
        refuse_mask_with_packing(attention_mask, cu_seqlens)
        return as_packing(cu_seqlens, q.shape[0], q.shape[2], q.device)

    def attend_packed(
        self, q: Tensor, k: Tensor, v: Tensor, packing: Packing, causal: bool,
        need_weights: bool,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """The call on packed q, k, v (1, H, N, D): by default the right-padded (S, H, L, D)
        batch with its mask, unpadded (exact where ``packed_modes`` says so). With
        ``need_weights`` the (1, H, N, N) weights are block diagonal, one block per
        sequence. A kernel with a native varlen form may override this."""
        padded = [packing.pad(t, 2) for t in (q, k, v)]
        result = self._attend_masked(*padded, packing.mask(), causal, need_weights)
        if not need_weights:
            return packing.unpad(result, 2)
        out, weights = result
        blocks = weights.new_zeros(1, weights.shape[1], packing.total, packing.total)
        for s, (a, b) in enumerate(zip(packing.offsets[:-1], packing.offsets[1:])):
            blocks[0, :, a:b, a:b] = weights[s, :, : b - a, : b - a]
        return packing.unpad(out, 2), blocks

    def prefill(
        self, q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor | Packing
    ) -> tuple[Tensor, Any]:
        """Stream S packed prompts q, k, v (1, H, N, ·) at once: returns ``(out, state)``,
        ``out`` (1, H, N, E) the packed causal call, ``state`` a stream of S rows that
        ``step`` continues with B = S (T new tokens for every sequence), each row exactly
        as the sequence streamed alone.

        The prompts are left-padded to one width and stepped with their mask, so every row
        ends in the last column (a masked step adds nothing for padding; see
        :mod:`formerlab.attention.streaming`).
        """
        check_attention_inputs(q, k, v, None)
        if not (self.supports_streaming and self.supports_causal):
            raise ValueError(
                f"attention kernel {self.name!r} cannot prefill a stream (no init_state/step); "
                f"streaming kernels: {_streaming_kernels()}"
            )
        packing = as_packing(cu_seqlens, q.shape[0], q.shape[2], q.device)
        state = self.init_state(
            packing.count, q.shape[1], q.shape[-1], dtype=q.dtype, device=q.device,
            value_dim=v.shape[-1],
        )
        padded = [packing.pad(t, 2, left=True) for t in (q, k, v)]
        out, state = self.step(*padded, state, attention_mask=packing.mask(left=True))
        return packing.unpad(out, 2, left=True), state

    # --- attention from the projection's input -------------------------------------

    def fuses_projection(self, x: Tensor, weight: Tensor, heads: int) -> bool:
        """Whether :meth:`attend_projected` takes this unpadded, non-causal call of input
        x (B, N, C) with qkv projection ``weight`` (3·H·D, C); False by default."""
        return False

    def attend_projected(
        self, x: Tensor, weight: Tensor, bias: Tensor | None, heads: int
    ) -> Tensor:
        """The call on q, k, v = split(x·weightᵀ + bias), computed from x and the
        projection without forming them (only where :meth:`fuses_projection` says so);
        returns out (B, H, N, D). The default raises."""
        raise NotImplementedError(f"attention kernel {self.name!r} does not fuse the projection")

    # --- streaming (incremental causal decoding) ----------------------------------

    # True where ``init_state``/``step`` are implemented (see formerlab.attention.streaming)
    supports_streaming: bool = False

    def init_state(
        self,
        batch: int,
        heads: int,
        head_dim: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        value_dim: int | None = None,
    ) -> Any:
        """An empty streaming state for ``step`` (inputs of ``dtype`` on ``device``).

        Kernels that stream return a dataclass of tensors; the default raises.
        """
        raise NotImplementedError(
            f"attention kernel {self.name!r} has no streaming state (init_state/step); "
            "recompute the causal call on the whole sequence instead"
        )

    def step(self, q: Tensor, k: Tensor, v: Tensor, state: Any) -> tuple[Tensor, Any]:
        """Attend T >= 1 new tokens (B, H, T, D) to everything seen so far.

        Returns ``(out, state)`` with ``out`` (B, H, T, E) in q's dtype, equal to the rows
        of the parallel ``causal=True`` call on the whole sequence; the default raises.
        """
        raise NotImplementedError(
            f"attention kernel {self.name!r} cannot step (no streaming state); "
            "recompute the causal call on the whole sequence instead"
        )


def _streaming_kernels() -> list[str]:
    """Names of the registered causal kernels whose class streams."""
    from formerlab.attention.registry import KERNELS

    return [
        name for name in KERNELS.available(causal=True)
        if getattr(KERNELS.entry(name).factory, "supports_streaming", False)
    ]
