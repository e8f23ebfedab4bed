"""formerlab attention kernels inside Hugging Face transformers models.

``swap_attention(model, kernel="nystrom", layers=None, **kernel_options)`` replaces the
self-attention *computation* of BERT, RoBERTa, GPT-2 and Llama-family (Llama, Mistral,
Qwen2) models by a formerlab kernel; the model's own projections, rotary positions and
grouped-query heads stay. ``restore_attention(model)`` undoes it.

How it plugs in (transformers >= 5, checked against 5.24's source):

* These models look their attention function up per call in ``ALL_ATTENTION_FUNCTIONS``
  under ``config._attn_implementation``. One stateless function, :func:`formerlab_attention`,
  is registered under ``"formerlab"``; it reads the kernel from the attention module it is
  called with (``module.formerlab_attention``), so all per-model state lives on the model.
* Masks are built by ``create_causal_mask`` / ``create_bidirectional_mask``, which return
  *no mask at all* for an implementation missing from the mask interface. So
  :func:`formerlab_mask` is registered in ``AttentionMaskInterface`` too: it hands the 2-d
  padding mask (True = real token) through, which becomes the kernel's ``attention_mask``.
  Packed sequences (B = 1, ``position_ids`` restarting at each boundary, no
  ``attention_mask``: HF builds a block-diagonal mask) become the kernel's ``cu_seqlens``:
  the mask interface hands their offsets on as a 1-d int64 tensor. Masks that are neither
  (sliding windows shorter than a sequence, packing with padding) raise ``ValueError``
  instead of being ignored.
* The swapped model gets its own copy of its config (a config object shared with another
  model is left alone), with ``_attn_implementation = "formerlab"``.
* HF's ``NystromformerModel`` computes attention inside its module: its self-attention
  modules are replaced (:class:`NystromformerSwap`), reusing q/k/v projections and conv skip.

Packed input reaches the kernels as for HF's own varlen attention (``flash_attention_2``):
``position_ids`` that restart at each sequence (B = 1, no ``attention_mask``), or the
``cu_seq_lens_q`` / ``cu_seq_lens_k`` keyword arguments of ``DataCollatorWithFlattening(
return_flash_attn_kwargs=True)`` (with ``position_ids`` restarting at the same offsets).
Each packed sequence then gets exactly what it gets alone (:func:`packed_offsets`).

Encoders (bidirectional attention) take any kernel; decoders (causal attention modules)
take causal kernels only. Attention-probability dropout is not applied by formerlab
kernels.

Decoding with a cache: a swapped decoder decodes with the kernels' own streaming states,
held by :class:`~formerlab.integrations.hf_cache.FormerlabCache` (pass
``cache=FormerlabCache(model)`` to the model's forward). ``generate`` builds one by itself:
``swap_attention`` sets, on the model instance only, the hook through which ``generate``
prepares its default cache (``_prepare_cache_for_generation``), so that it builds a
``FormerlabCache`` instead of a ``DynamicCache``; ``restore_attention`` removes it. Other
caches (HF's ``DynamicCache`` built by a plain ``model(..., use_cache=True)``, static or
quantized ones) cannot continue a formerlab stream: a call with more keys than queries
raises ``ValueError``.
"""

from __future__ import annotations

import copy
import math
import types
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

try:
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import bidirectional_mask_function, causal_mask_function
except ImportError as error:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "formerlab.integrations.hf needs the transformers package: pip install formerlab[hf]"
    ) from error

from formerlab import attention
from formerlab.attention.functional._common import check_cu_seqlens
from formerlab.attention.nystrom import DepthwiseConvSkip
from formerlab.attention.packed import Packing
from formerlab.integrations.hf_cache import PENDING, FormerlabCache, FormerlabLayer

IMPLEMENTATION = "formerlab"

#: model_type -> class names of its self-attention modules (cross-attention excluded)
FAMILIES: dict[str, tuple[str, ...]] = {
    "bert": ("BertSelfAttention",),
    "roberta": ("RobertaSelfAttention",),
    "gpt2": ("GPT2Attention",),
    "llama": ("LlamaAttention",),
    "mistral": ("MistralAttention",),
    "qwen2": ("Qwen2Attention",),
    "nystromformer": ("NystromformerSelfAttention",),
}


# --------------------------------------------------------------------------- per layer


class LayerAttention(nn.Module):
    """The formerlab kernel of one swapped layer (a submodule of HF's attention module).

    ``recorder``: optional callable ``(q, k, v, attention_mask, causal)`` called with the
    per-head inputs of every call (used by the studies to capture q, k, v).
    """

    def __init__(self, kernel: str, options: dict[str, Any], causal: bool) -> None:
        super().__init__()
        self.kernel_name = kernel
        self.options = dict(options)
        self.causal = causal
        self.kernel = attention.build(kernel, **options)
        self.recorder = None

    def forward(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        attention_mask: Tensor | None,
        cu_seqlens: Tensor | Packing | None = None,
    ) -> Tensor:
        """The kernel on per-head q, k, v (B, H, N, D); ``cu_seqlens``: packed sequences
        (B = 1, :mod:`formerlab.attention.packed`), with ``attention_mask`` None."""
        if self.recorder is not None:
            self.recorder(q, k, v, attention_mask, self.causal)
        packed = {} if cu_seqlens is None else {"cu_seqlens": cu_seqlens}
        return self.kernel(q, k, v, attention_mask=attention_mask, causal=self.causal, **packed)

    def extra_repr(self) -> str:
        return f"kernel={self.kernel_name!r}, causal={self.causal}"


# --------------------------------------------------------------------------- masks


def _check_positional(
    mask_function,
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int,
    kv_offset: int,
    device,
) -> tuple[int, ...] | None:
    """None for a plain causal / bidirectional mask; the offsets ``(0, n_1, …, N)`` for
    packed sequences (block-diagonal causal or bidirectional, B = 1); ``ValueError``
    otherwise. Anything but HF's two plain functions is evaluated on the index grid
    (sliding windows, packing), so a pattern is accepted only for what it is there."""
    if mask_function in (causal_mask_function, bidirectional_mask_function):
        return None
    b = torch.arange(batch_size, device=device)[:, None, None]
    qi = torch.arange(q_length, device=device)[None, :, None] + q_offset
    ki = torch.arange(kv_length, device=device)[None, None, :] + kv_offset
    grid = torch.as_tensor(mask_function(b, 0, qi, ki), device=device).expand(
        batch_size, q_length, kv_length
    )
    if bool(grid.all()) or torch.equal(grid, (ki <= qi).expand_as(grid)):
        return None
    offsets = _block_diagonal(grid) if batch_size == 1 and q_offset == kv_offset == 0 else None
    if offsets is not None:
        return offsets
    raise ValueError(
        "formerlab attention supports plain causal or bidirectional masks with padding, and "
        "packed sequences (B = 1) without padding; this call builds another pattern (a sliding "
        "window shorter than the sequence or than a packed sequence, packed sequences in more "
        "than one row, or a custom mask): shorten the input, raise config.sliding_window, or "
        "pack into one row"
    )


def _block_diagonal(grid: Tensor) -> tuple[int, ...] | None:
    """The offsets of the sequences of a (1, N, N) mask grid that is block diagonal with
    causal or full blocks along the diagonal (packed sequences), else None."""
    n = grid.shape[-1]
    if grid.shape[-2] != n or n < 2:
        return None
    # a sequence starts where a query may not see the key just before it
    starts = torch.ones(n, dtype=torch.bool, device=grid.device)
    starts[1:] = ~grid[0].diagonal(-1)
    segment = starts.cumsum(0)
    same = segment[:, None] == segment[None, :]
    causal = same & torch.ones(n, n, dtype=torch.bool, device=grid.device).tril()
    if not (torch.equal(grid[0], causal) or torch.equal(grid[0], same)):
        return None
    return (*starts.nonzero().flatten().tolist(), n)


def formerlab_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function=causal_mask_function,
    attention_mask: Tensor | None = None,
    **kwargs: Any,
) -> Tensor | None:
    """Mask interface of ``"formerlab"``: the 2-d bool padding mask (True = real), None,
    or for packed sequences (HF's block-diagonal pattern, B = 1) their offsets
    ``cu_seqlens`` as a 1-d int64 tensor ``[0, n_1, …, N]``.

    Causality is not encoded here: each attention module knows it (``is_causal``)."""
    device = kwargs.get("device") or (
        attention_mask.device if attention_mask is not None else "cpu"
    )
    offsets = _check_positional(
        mask_function, batch_size, q_length, kv_length, int(q_offset), int(kv_offset), device
    )
    mask = None
    if attention_mask is not None:
        mask = attention_mask.to(torch.bool)
        if mask.shape[-1] != kv_length:
            mask = mask[:, int(kv_offset) : int(kv_offset) + kv_length]
        mask = None if bool(mask.all()) else mask
    if offsets is None:
        return mask
    if mask is not None:
        raise ValueError(_PACKED_WITH_PADDING)
    return torch.tensor(offsets, dtype=torch.int64, device=device)


_PACKED_WITH_PADDING = (
    "packed sequences cannot be combined with a padding attention_mask: packed sequences "
    "hold real tokens only; leave the padding out of the packing and pass "
    "attention_mask=None (or a mask of ones)"
)


def hf_real_tokens(attention_mask: Tensor | None, b: int, n: int, causal: bool) -> Tensor | None:
    """The (B, N) bool key padding mask from what reaches an attention function.

    2-d: from :func:`formerlab_mask`. 4-d (a mask the caller built, or an eager/sdpa mask):
    bool (True = attend) or additive float (0 = attend); it must be padding on top of the
    plain causal / bidirectional pattern, otherwise ``ValueError``.
    """
    if attention_mask is None:
        return None
    if attention_mask.dim() == 2:
        return attention_mask.to(torch.bool)
    if attention_mask.dim() != 4:
        raise ValueError(f"attention_mask of shape {tuple(attention_mask.shape)} is not supported")
    allowed = attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0
    allowed = allowed[:, 0].expand(b, n, n)
    if causal:
        # key j is real iff query j (itself) may see it, or any later query does
        kpm = allowed.any(dim=1)
        expected = (
            kpm[:, None, :] & torch.ones(n, n, dtype=torch.bool, device=allowed.device).tril()
        )
    else:
        kpm = allowed.any(dim=1)
        expected = kpm[:, None, :].expand(b, n, n)
    real_rows = expected.any(-1)  # rows HF fills arbitrarily where a query sees nothing
    if not torch.equal(allowed[real_rows], expected[real_rows]):
        raise ValueError(
            "the 4-d attention_mask is not padding on top of a plain "
            f"{'causal' if causal else 'bidirectional'} pattern; formerlab kernels take a "
            "key padding mask only"
        )
    return None if bool(kpm.all()) else kpm


# --------------------------------------------------------------------------- packing


def _flat_positions(position_ids: Any, batch: int, length: int) -> Tensor | None:
    """``position_ids`` as (B, N) when they are one per token (else None)."""
    if not isinstance(position_ids, Tensor) or position_ids.shape[-1] != length:
        return None
    if position_ids.dim() == 1:
        position_ids = position_ids[None]
    if position_ids.dim() != 2 or position_ids.shape[0] not in (1, batch):
        return None
    return position_ids.expand(batch, length)


def _runs(positions: Tensor) -> tuple[int, ...]:
    """Offsets of the runs of consecutive positions of one row (N,): a new sequence starts
    wherever a position is not its predecessor + 1 (HF's ``find_packed_sequence_indices``)."""
    starts = (positions[1:] - positions[:-1] != 1).nonzero().flatten() + 1
    return (0, *starts.tolist(), positions.shape[0])


def _restart_among_real(mask: Tensor, position_ids: Any, batch: int, length: int) -> bool:
    """Whether the positions of some row's real tokens (2-d ``mask``, True = real) fall back
    somewhere: sequences packed with padding. (Left padding's positions, HF's
    ``cumsum - 1``, and holes in ``arange`` positions only increase over real tokens.)"""
    positions = _flat_positions(position_ids, batch, length)
    if positions is None or mask.dim() != 2 or tuple(mask.shape) != (batch, length):
        return False
    real = mask.to(torch.bool)
    rows = real.nonzero()[:, 0]
    values = positions[real]
    return bool(((values[1:] <= values[:-1]) & (rows[1:] == rows[:-1])).any())


def _check_restarts(positions: Tensor, offsets: tuple[int, ...]) -> None:
    """``ValueError`` unless the (N,) positions count 0, 1, … from every offset (shifted
    by the first position), as each packed sequence's own positions."""
    packing = Packing(offsets, positions.device)
    expected = packing.positions[0] + positions[0]
    if not torch.equal(positions, expected):
        raise ValueError(
            f"position_ids {positions.tolist()} do not restart at the packed sequences' offsets "
            f"{list(offsets)}: each packed sequence needs its own positions 0, 1, … (as "
            "DataCollatorWithFlattening gives them), otherwise it does not get what it gets "
            "alone"
        )


def packed_offsets(
    attention_mask: Tensor | None,
    batch: int,
    length: int,
    cu_seq_lens_q: Tensor | None = None,
    cu_seq_lens_k: Tensor | None = None,
    position_ids: Tensor | None = None,
) -> tuple[int, ...] | None:
    """The offsets ``(0, n_1, …, N)`` of packed sequences in a self-attention call of
    ``batch`` rows and ``length`` tokens, or None when the call is not packed.

    Packing is read where transformers puts it for its varlen attention: a 1-d
    ``attention_mask`` (what :func:`formerlab_mask` makes of HF's block-diagonal mask), the
    ``cu_seq_lens_q`` / ``cu_seq_lens_k`` keyword arguments, and ``position_ids`` that
    restart inside the row (B = 1, no padding mask; HF's ``find_packed_sequence_indices``).
    All that are given must agree, and ``position_ids`` must count 0, 1, … from every
    offset (learned positions such as GPT-2's then restart too).

    Raises:
        ValueError: packing with B > 1, with a padding mask, offsets that are not valid
            ``cu_seqlens``, sources that disagree, or positions that do not restart.
    """
    found: dict[str, tuple[int, ...]] = {}
    padded = attention_mask is not None and attention_mask.dim() != 1
    if attention_mask is not None and attention_mask.dim() == 1:
        found["the packed mask"] = tuple(int(o) for o in attention_mask.tolist())
    for name, value in (("cu_seq_lens_q", cu_seq_lens_q), ("cu_seq_lens_k", cu_seq_lens_k)):
        if value is not None:
            try:
                found[name] = check_cu_seqlens(value, batch, length)
            except ValueError as error:
                raise ValueError(f"{name}: {error}") from None
    if padded and (found or _restart_among_real(attention_mask, position_ids, batch, length)):
        raise ValueError(_PACKED_WITH_PADDING)
    positions = None if padded else _flat_positions(position_ids, batch, length)
    if positions is not None and not found and length > 1:
        restarts = bool((positions[:, 1:] - positions[:, :-1] != 1).any())
        if restarts and batch != 1:
            raise ValueError(
                f"position_ids restart inside rows of a batch of {batch}: packed sequences "
                "take a batch of one row (B = 1), as HF's varlen attention does; pack every "
                "sequence into one row"
            )
        if restarts:
            found["position_ids"] = _runs(positions[0])
    if not found:
        return None
    if len(set(found.values())) > 1:
        described = "; ".join(f"{name}: {list(value)}" for name, value in found.items())
        raise ValueError(f"the packed sequences of this call disagree ({described})")
    offsets = next(iter(found.values()))
    if positions is not None:
        _check_restarts(positions[0], offsets)
    return offsets


def _refuse_packed_stream(attention_mask: Tensor | None, kwargs: dict, length: int) -> None:
    """A FormerlabCache streams rows of a batch, not packed sequences."""
    packed = attention_mask is not None and attention_mask.dim() == 1
    packed |= any(kwargs.get(n) is not None for n in ("cu_seq_lens_q", "cu_seq_lens_k"))
    if attention_mask is None and length > 1:
        positions = _flat_positions(kwargs.get("position_ids"), 1, length)
        packed |= positions is not None and bool((positions[0, 1:] - positions[0, :-1] != 1).any())
    if packed:
        raise ValueError(
            "packed sequences cannot be decoded with a FormerlabCache (it streams one "
            "sequence per row): run packed input with use_cache=False, or prefill the prompts "
            "as a left-padded batch with an attention_mask"
        )


# --------------------------------------------------------------------------- the function


def _scaled_query(query: Tensor, scaling: float | None) -> Tensor:
    """formerlab kernels use 1/√D; fold the model's own scaling into q."""
    if scaling is None:
        return query
    factor = scaling * math.sqrt(query.shape[-1])
    return query if abs(factor - 1.0) < 1e-12 else query * factor


def _expand_kv(key: Tensor, value: Tensor, heads: int) -> tuple[Tensor, Tensor]:
    """Grouped-query attention: kv head i serves q heads i·g … i·g+g-1 (HF's ``repeat_kv``)."""
    if key.shape[1] == heads:
        return key, value
    groups = heads // key.shape[1]
    return key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)


def _check_window(window: int | None, length: int) -> None:
    if window is not None and window < length:
        raise ValueError(
            f"sliding_window={window} is shorter than the sequence ({length} tokens); formerlab "
            "kernels attend to the whole (causal) past"
        )


def formerlab_attention(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    """Attention-interface function of ``"formerlab"``: (B, H, N, D) in, (B, N, H, D) out.

    Called after a :class:`~formerlab.integrations.hf_cache.FormerlabCache` update, it runs
    the kernel's streaming step on the new tokens (:func:`stream_attention`); otherwise the
    kernel's parallel call on the whole sequence, or on packed sequences
    (``cu_seqlens``, see :func:`packed_offsets`) when the call is packed."""
    pending = module.__dict__.pop(PENDING, None)
    if pending is not None:
        layer, updated = pending
        if updated is not key:
            raise ValueError(
                "the keys reaching formerlab attention are not those its FormerlabCache layer "
                "was just updated with; this model's attention modules do not call the cache "
                "as HF's Llama / GPT-2 modules do"
            )
        _refuse_packed_stream(attention_mask, kwargs, query.shape[-2])
        return stream_attention(
            module, layer, query, key, value, attention_mask, scaling, kwargs.get("sliding_window")
        )
    b, h, n, _ = query.shape
    if key.shape[-2] != n:
        raise ValueError(
            f"formerlab attention got {n} queries and {key.shape[-2]} keys: a cache other than "
            "a FormerlabCache cannot continue a formerlab kernel's stream; decode with "
            "generate (it builds a FormerlabCache), pass cache=FormerlabCache(model), or call "
            "the model on whole sequences with use_cache=False"
        )
    offsets = packed_offsets(
        attention_mask,
        b,
        n,
        kwargs.get("cu_seq_lens_q"),
        kwargs.get("cu_seq_lens_k"),
        kwargs.get("position_ids"),
    )
    packing = None if offsets is None else Packing(offsets, query.device)
    _check_window(kwargs.get("sliding_window"), n if packing is None else packing.max_len)
    key, value = _expand_kv(key, value, h)
    causal = bool(getattr(module, "is_causal", False))
    kpm = None if packing is not None else hf_real_tokens(attention_mask, b, n, causal)
    q = _scaled_query(query, scaling)
    layer = getattr(module, "formerlab_attention", None)
    if layer is None:
        # a layer left out of ``layers``: exact softmax (a fresh, stateless kernel)
        packed = {} if packing is None else {"cu_seqlens": packing}
        out = attention.build("softmax")(q, key, value, attention_mask=kpm, causal=causal, **packed)
    else:
        out = layer(q, key, value, kpm, packing)
    return out.transpose(1, 2).contiguous(), None


def stream_attention(
    module: nn.Module,
    layer: FormerlabLayer,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    scaling: float | None,
    sliding_window: int | None = None,
) -> tuple[Tensor, None]:
    """One decoding step of a swapped layer: the kernel's ``step`` on the T new tokens
    (B, H, T, D) from the state in ``layer`` (which keeps the new state); (B, T, H, D) out.

    ``attention_mask``: the 2-d padding mask over every token seen (what
    :func:`formerlab_mask` passes on, True = real) or None; the new tokens' columns become
    the step's mask, so a left-padded row gets exactly what it gets alone."""
    b, h, t, _ = query.shape
    total = layer.get_seq_length()  # the new tokens included (counted by the update)
    _check_window(sliding_window, total)
    key, value = _expand_kv(key, value, h)
    mask = None
    if attention_mask is not None:
        if attention_mask.dim() != 2 or tuple(attention_mask.shape) != (b, total):
            raise ValueError(
                f"decoding with a FormerlabCache takes a 2-d attention_mask (B, tokens so far) "
                f"= ({b}, {total}); got shape {tuple(attention_mask.shape)}"
            )
        mask = attention_mask[:, -t:].to(torch.bool)
        mask = None if bool(mask.all()) else mask
    out = layer.step(_scaled_query(query, scaling), key, value, mask)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(IMPLEMENTATION, formerlab_attention)
AttentionMaskInterface.register(IMPLEMENTATION, formerlab_mask)


# --------------------------------------------------------------------------- Nystromformer


class NystromformerSwap(nn.Module):
    """Replacement of HF's ``NystromformerSelfAttention``: the same q/k/v projections, a
    formerlab kernel, and the model's depthwise conv skip on V (its weights, padding-aware).
    """

    def __init__(self, original: nn.Module, layer: LayerAttention) -> None:
        super().__init__()
        self.query, self.key, self.value = original.query, original.key, original.value
        self.heads = original.num_attention_heads
        self.head_dim = original.attention_head_size
        self.formerlab_attention = layer
        self.conv = None
        if getattr(original, "conv_kernel_size", None) is not None:
            self.conv = DepthwiseConvSkip(original.conv_kernel_size, heads=self.heads)
            with torch.no_grad():
                self.conv.weight.copy_(original.conv.weight[:, 0, :, 0])
            self.conv.to(original.conv.weight.device)
        object.__setattr__(self, "_original", original)  # not a submodule: kept for restore

    def forward(
        self,
        hidden_states: Tensor,
        attention_mask: Tensor | None = None,
        output_attentions: bool = False,
    ):
        b, n, _ = hidden_states.shape
        q, k, v = (
            proj(hidden_states).view(b, n, self.heads, self.head_dim).transpose(1, 2)
            for proj in (self.query, self.key, self.value)
        )
        kpm = hf_real_tokens(attention_mask, b, n, causal=False)
        out = self.formerlab_attention(q, k, v, kpm)
        if self.conv is not None:
            conv = self.conv(v, kpm)
            out = out + (conv if kpm is None else conv * kpm[:, None, :, None].to(conv.dtype))
        out = out.transpose(1, 2).reshape(b, n, self.heads * self.head_dim)
        return (out, None) if output_attentions else (out,)

    def restore(self) -> nn.Module:
        """The original module, with this module's (possibly trained) conv weights."""
        original = self._original
        if self.conv is not None:
            with torch.no_grad():
                original.conv.weight.copy_(self.conv.weight.detach()[:, None, :, None])
        return original


def nystromformer_options(config) -> dict[str, Any]:
    """formerlab ``nystrom`` options matching an HF Nystromformer config: its landmark count
    and the paper's 6 pinv iterations (the conv skip is carried by :class:`NystromformerSwap`).
    formerlab's defaults stay: per-matrix pinv init, landmarks over real tokens only."""
    return {"num_landmarks": int(config.num_landmarks), "pinv_iters": 6}


# --------------------------------------------------------------------------- swap / restore


@dataclass
class SwapRecord:
    """What :func:`restore_attention` needs to undo a swap."""

    config: Any
    config_holders: list[nn.Module]
    swapped: list[nn.Module] = field(default_factory=list)
    replaced: list[tuple[nn.Module, str, NystromformerSwap]] = field(default_factory=list)
    kernel: str = ""
    options: dict[str, Any] = field(default_factory=dict)
    layers: list[int] = field(default_factory=list)
    causal: bool = False
    generation_hook: bool = False
    #: every self-attention module of the model, in layer order (swapped or not)
    attention: list[nn.Module] = field(default_factory=list)


def attention_modules(model: nn.Module) -> list[tuple[nn.Module, str, nn.Module]]:
    """``(parent, attribute, module)`` of every self-attention module, in layer order."""
    model_type = _model_type(model)
    names = FAMILIES[model_type]
    found = []
    for parent in model.modules():
        for attr, child in parent.named_children():
            if type(child).__name__ in names and not getattr(child, "is_cross_attention", False):
                found.append((parent, attr, child))
    if not found:
        raise ValueError(f"found no self-attention modules ({names}) in this {model_type} model")
    return found


def _model_type(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise ValueError(
            f"swap_attention supports transformers models of types {sorted(FAMILIES)}; got "
            f"{type(model).__name__} (model_type={model_type!r})"
        )
    return model_type


def is_swapped(model: nn.Module) -> bool:
    return getattr(model, "_formerlab_swap", None) is not None


def _check_layers(layers, count: int) -> list[int]:
    if layers is None:
        return list(range(count))
    chosen = list(layers)
    bad = [i for i in chosen if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < count]
    if bad or not chosen:
        raise ValueError(
            f"layers={layers!r} is not allowed; expected a non-empty list of layer indices in "
            f"0..{count - 1}"
        )
    return sorted(set(chosen))


def _check_kernel(kernel: str, options: dict[str, Any], causal: bool, what: str) -> None:
    entry = attention.KERNELS.entry(kernel)  # unknown name: ValueError listing the valid ones
    if causal and not entry.causal:
        raise ValueError(
            f"kernel={kernel!r} cannot run causally, which this {what} (a decoder) needs; "
            f"causal kernels: {attention.available(causal=True)}"
        )
    attention.KERNELS.check_options(kernel, options)
    attention.build(kernel, **options)  # option values are checked here, before any swap


def swap_attention(
    model: nn.Module,
    kernel: str | None = "nystrom",
    layers: list[int] | None = None,
    **kernel_options: Any,
) -> nn.Module:
    """Run ``kernel`` (a name of ``formerlab.attention.available()``) in the self-attention
    of every layer (or ``layers``) of ``model``; returns the same model, swapped in place.

    Encoders take any kernel (bidirectional, padding as ``attention_mask``); decoders
    only causal ones (``ValueError`` otherwise, naming them). A model that is already
    swapped is restored first. For HF's ``NystromformerModel``, ``kernel="nystrom"`` (or
    None) defaults to the model's landmark count and 6 pinv iterations, and its conv skip
    is kept; ``kernel_options`` override.
    """
    model_type = _model_type(model)
    if is_swapped(model):
        restore_attention(model)
    found = attention_modules(model)
    crossed = [
        type(m).__name__
        for m in model.modules()
        if getattr(m, "is_cross_attention", False) or "CrossAttention" in type(m).__name__
    ]
    if crossed:
        raise ValueError(
            f"{type(model).__name__} has cross-attention ({crossed[0]}); swap_attention supports "
            "self-attention-only encoders and decoders"
        )
    causal = any(bool(getattr(m, "is_causal", False)) for _, _, m in found)
    if kernel is None:
        kernel = "nystrom"
    options = dict(kernel_options)
    if model_type == "nystromformer" and kernel == "nystrom":
        options = {**nystromformer_options(model.config), **options}
    _check_kernel(kernel, options, causal, f"{type(model).__name__}")
    chosen = _check_layers(layers, len(found))
    device = next(model.parameters()).device

    record = SwapRecord(
        model.config, [], kernel=kernel, options=options, layers=chosen, causal=causal
    )
    if model_type == "nystromformer":
        for i in chosen:
            parent, attr, module = found[i]
            swap = NystromformerSwap(module, LayerAttention(kernel, options, False).to(device))
            setattr(parent, attr, swap)
            record.replaced.append((parent, attr, swap))
    else:
        own = copy.deepcopy(model.config)
        own._attn_implementation = IMPLEMENTATION
        for module in model.modules():
            if getattr(module, "config", None) is record.config:
                module.config = own
                record.config_holders.append(module)
        for i in chosen:
            module = found[i][2]
            layer_causal = bool(getattr(module, "is_causal", False))
            module.formerlab_attention = LayerAttention(kernel, options, layer_causal).to(device)
            record.swapped.append(module)
        if causal and hasattr(model, "_prepare_cache_for_generation"):
            # generate's default cache: an instance attribute, so the class and other
            # models are untouched (a bound method, so copy.deepcopy rebinds it)
            model._prepare_cache_for_generation = types.MethodType(_prepare_formerlab_cache, model)
            record.generation_hook = True
    record.attention = [module for _, _, module in found]
    model._formerlab_swap = record
    return model


def _prepare_formerlab_cache(
    self: nn.Module, generation_config: Any, model_kwargs: dict, *args: Any, **kwargs: Any
) -> None:
    """``generate``'s cache preparation for a swapped decoder: a :class:`FormerlabCache`
    where HF would build its default ``DynamicCache``; a cache the caller passes, or
    ``use_cache=False``, is left to HF's own preparation."""
    original = type(self)._prepare_cache_for_generation
    given = any(model_kwargs.get(name) is not None for name in ("cache", "past_key_values"))
    if given or generation_config.use_cache is False or not is_swapped(self):
        return original(self, generation_config, model_kwargs, *args, **kwargs)
    implementation = generation_config.cache_implementation
    if implementation not in (None, "dynamic"):
        raise ValueError(
            f"cache_implementation={implementation!r} is not supported with formerlab "
            "attention: generate decodes with the kernels' streaming states (a FormerlabCache); "
            "leave cache_implementation unset, or pass use_cache=False"
        )
    model_kwargs["cache"] = FormerlabCache(self)
    return None


def restore_attention(model: nn.Module) -> nn.Module:
    """Undo :func:`swap_attention`: the original attention modules, config and implementation
    come back (weights trained meanwhile are kept, they are the same tensors)."""
    record: SwapRecord | None = getattr(model, "_formerlab_swap", None)
    if record is None:
        raise ValueError(f"{type(model).__name__} has no swapped attention to restore")
    for module in record.swapped:
        del module.formerlab_attention
    for parent, attr, swap in record.replaced:
        setattr(parent, attr, swap.restore())
    for module in record.config_holders:
        module.config = record.config
    if record.generation_hook:
        model.__dict__.pop("_prepare_cache_for_generation", None)
    del model._formerlab_swap
    return model


def swapped_layers(model: nn.Module) -> list[LayerAttention]:
    """The :class:`LayerAttention` of every swapped layer of ``model``, in layer order."""
    return [m for m in model.modules() if isinstance(m, LayerAttention)]


__all__ = [
    "FAMILIES",
    "IMPLEMENTATION",
    "FormerlabCache",
    "LayerAttention",
    "NystromformerSwap",
    "attention_modules",
    "formerlab_attention",
    "formerlab_mask",
    "is_swapped",
    "hf_real_tokens",
    "nystromformer_options",
    "packed_offsets",
    "restore_attention",
    "stream_attention",
    "swap_attention",
    "swapped_layers",
]
