"""A transformers ``Cache`` of formerlab streaming states: ``generate`` with swapped attention.

A model swapped by :func:`formerlab.integrations.hf.swap_attention` decodes with
:class:`FormerlabCache`: per attention layer, the formerlab kernel's own streaming state
(``state = kernel.init_state(...)``, ``out, state = kernel.step(q, k, v, state,
attention_mask)``, see :mod:`formerlab.attention.streaming`) instead of HF's key/value
tensors. A key/value cache for ``softmax``, a constant-size state for ``linear`` and
``performer``, the open segment and the landmarks for ``causal_nystrom``.

How a decoding step flows (transformers >= 5, checked against 5.25's source). HF's
attention module calls ``cache.update(key, value, layer_idx)`` on the new tokens, then the
attention function. :meth:`FormerlabLayer.update` only counts the new tokens and hands
itself to that attention module (the layer knows its module); the attention function
:func:`formerlab.integrations.hf.formerlab_attention` takes it and runs the kernel's
masked ``step`` on the new tokens (the first call, the prefill, on the whole prompt),
which stores the new state here. ``get_seq_length`` / ``get_mask_sizes`` count every
token seen (padding included), as HF's ``DynamicCache`` does, so positions and masks are
built as usual.

Beam search and batch edits (``reorder_cache``, ``batch_select_indices``,
``batch_repeat_interleave``) map every state's rows through an index
(:func:`select_state_rows`): states are values, a step never changes the state it is
given, so selecting rows is all a reorder needs. Cropping (assisted decoding) is not
possible: a constant-size state cannot forget its last tokens.
"""

from __future__ import annotations

import dataclasses
import weakref
from typing import Any

import torch
from torch import Tensor, nn

try:
    from transformers.cache_utils import Cache, CacheLayerMixin
except ImportError as error:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "formerlab.integrations.hf_cache needs the transformers package: pip install formerlab[hf]"
    ) from error

from formerlab import attention
from formerlab.attention.causal_nystrom import NystromState, row_phases
from formerlab.attention.linear import LinearState
from formerlab.attention.softmax import KVCache
from formerlab.attention.streaming import Tail

#: attribute of an HF attention module through which ``(cache layer, updated keys)``
#: reach the attention function, between ``cache.update`` and the attention call
PENDING = "_formerlab_pending_layer"


# --------------------------------------------------------------------------- states


def _rows(x: Tensor | None, index: Tensor) -> Tensor | None:
    return None if x is None else x.index_select(0, index.to(x.device))


def select_state_rows(state: Any, index: Tensor) -> Any:
    """A new streaming state whose row ``i`` is row ``index[i]`` of ``state``.

    ``index``: 1-d integer tensor of row numbers (repeats allowed: beam search duplicates
    beams; any length: rows may be dropped or repeated). Works on the states of the
    streaming kernels: :class:`~formerlab.attention.softmax.KVCache` (``softmax``),
    :class:`~formerlab.attention.linear.LinearState` (``linear``, ``performer``; the
    performer's random features are shared, not per row) and
    :class:`~formerlab.attention.causal_nystrom.NystromState` (``causal_nystrom``; its
    per-row first real positions follow their rows). ``state`` is left unchanged; the
    result owns new buffers.
    """
    if (
        not isinstance(index, Tensor)
        or index.dim() != 1
        or index.dtype in (torch.bool, torch.float16, torch.bfloat16, torch.float32, torch.float64)
    ):
        got = f"{index.dtype} {tuple(index.shape)}" if isinstance(index, Tensor) else type(index)
        raise ValueError(f"index must be a 1-d integer tensor of row numbers; got {got}")
    index = index.long()
    if isinstance(state, KVCache):
        return KVCache(
            _rows(state.keys, index),
            _rows(state.values, index),
            state.length,
            Tail(state.length),
            _rows(state.real, index),
        )
    if isinstance(state, LinearState):
        return LinearState(
            _rows(state.kv, index), _rows(state.k_sum, index), state.length, state.projection
        )
    if isinstance(state, NystromState):
        return _nystrom_rows(state, index)
    raise ValueError(
        f"select_state_rows does not know the streaming state {type(state).__name__}; "
        "known: KVCache (softmax), LinearState (linear, performer), NystromState "
        "(causal_nystrom)"
    )


def _nystrom_rows(state: NystromState, index: Tensor) -> NystromState:
    """:func:`select_state_rows` of a ``causal_nystrom`` state."""
    rows = index.tolist()
    first = None if state.first is None else tuple(state.first[i] for i in rows)
    # the landmark buffers' tail records the per-row landmark counts (an int when all rows
    # have as many), as the kernel's step expects of a state that owns its buffers
    s, c = state.k_open.shape[2], state.length
    counts = [(c - f) // s for f in row_phases(first, len(rows), s, c)]
    mark = counts[0] if len(set(counts)) == 1 else tuple(counts)
    return dataclasses.replace(
        state,
        q_open=_rows(state.q_open, index),
        k_open=_rows(state.k_open, index),
        v_open=_rows(state.v_open, index),
        land_k=_rows(state.land_k, index),
        land_c=_rows(state.land_c, index),
        land_x=_rows(state.land_x, index),
        open_real=_rows(state.open_real, index),
        first=first,
        open_tail=Tail(state.open_len),
        land_tail=Tail(mark),
    )


def check_streams(kernel: nn.Module) -> None:
    """Raise ``ValueError`` unless ``kernel`` can decode step by step (``init_state`` /
    ``step``), naming the kernel and what to do instead."""
    name = getattr(kernel, "name", type(kernel).__name__)
    if not getattr(kernel, "supports_streaming", False):
        raise ValueError(
            f"attention kernel {name!r} has no streaming state, so a model with it swapped "
            "in cannot decode with a cache; call generate / the model with use_cache=False "
            "(the whole sequence is recomputed at every step)"
        )
    try:
        kernel.init_state(1, 1, 1)  # options that cannot stream fail here, before decoding
    except ValueError as error:
        raise ValueError(
            f"attention kernel {name!r} cannot decode with a cache ({error}); call generate "
            "/ the model with use_cache=False"
        ) from error


# --------------------------------------------------------------------------- the cache


class FormerlabLayer(CacheLayerMixin):
    """One attention layer's formerlab streaming state, as a transformers cache layer.

    ``kernel``: the layer's formerlab kernel (streaming); ``module``: HF's attention module
    of the layer (held weakly), to which :meth:`update` hands this layer for the attention
    function. ``state`` is None until the first step (its batch size, heads and dtype come
    from the first call); ``length`` counts the tokens seen, padding included.
    """

    is_compileable = False
    is_croppable = False
    is_sliding = False

    def __init__(self, kernel: nn.Module, module: nn.Module) -> None:
        super().__init__()
        self.kernel = kernel
        self._module = weakref.ref(module)
        self.state: Any = None
        self.length = 0

    def __repr__(self) -> str:
        return f"FormerlabLayer(kernel={self.kernel.name!r}, length={self.length})"

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        """Nothing to allocate ahead: the state is built by the first :meth:`step`."""

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs):
        """Count the new tokens and hand this layer to the layer's attention module; the
        keys and values come back unchanged (the attention function steps the state)."""
        module = self._module()
        if module is None:
            raise ValueError("this FormerlabCache belongs to a model that no longer exists")
        if module.__dict__.get(PENDING) is not None:
            raise ValueError(
                "the attention function did not consume the previous update of this layer: "
                "FormerlabCache works only with models swapped by swap_attention"
            )
        module.__dict__[PENDING] = (self, key_states)
        self.length += key_states.shape[-2]
        self.is_initialized = True
        return key_states, value_states

    def step(self, q: Tensor, k: Tensor, v: Tensor, attention_mask: Tensor | None) -> Tensor:
        """The kernel's step on the new tokens q, k, v (B, H, T, D) with their padding
        mask (bool (B, T), True = real, or None); stores the new state, returns the output
        (B, H, T, E)."""
        state = self.state
        if state is None:
            b, h, _, d = q.shape
            state = self.kernel.init_state(
                b, h, d, dtype=q.dtype, device=q.device, value_dim=v.shape[-1]
            )
        out, self.state = self.kernel.step(q, k, v, state, attention_mask=attention_mask)
        return out

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """``(kv_length, kv_offset)`` of the next call's mask: every token seen plus the
        new ones, from position 0 (as HF's dynamic layers)."""
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        """The number of tokens seen so far (padding included)."""
        return self.length

    def get_max_length(self) -> int:
        """-1: no maximum."""
        return -1

    def _select(self, index: Tensor) -> None:
        if self.state is not None:
            self.state = select_state_rows(self.state, index)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Row i becomes row ``beam_idx[i]`` (beam search)."""
        self._select(beam_idx)

    def batch_select_indices(self, indices: Tensor) -> None:
        """Keep the rows ``indices`` (integers, or a bool mask over the rows)."""
        indices = torch.as_tensor(indices)
        if indices.dtype == torch.bool:
            indices = indices.nonzero().squeeze(-1)
        self._select(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Repeat every row ``repeats`` times in place (row i becomes rows i·r … i·r+r-1)."""
        if self.state is not None:
            batch = _state_batch(self.state)
            self._select(torch.arange(batch).repeat_interleave(repeats))

    def crop(self, tokens_to_remove: int) -> None:
        """Not possible: a streaming state cannot forget tokens."""
        raise ValueError(
            "a FormerlabCache cannot be cropped (a constant-size streaming state cannot forget "
            "its last tokens); assisted / speculative decoding is not supported"
        )

    def reset(self) -> None:
        """Forget everything: the next step starts a new state."""
        self.state = None
        self.length = 0
        self.is_initialized = False

    def offload(self) -> None:
        """Offloading is not supported: the state stays where it is."""

    def prefetch(self) -> None:
        """Offloading is not supported: nothing to fetch."""


def _state_batch(state: Any) -> int:
    if isinstance(state, KVCache):
        return state.keys.shape[0]
    if isinstance(state, LinearState):
        return state.kv.shape[0]
    if isinstance(state, NystromState):
        return state.k_open.shape[0]
    select_state_rows(state, torch.zeros(0, dtype=torch.long))  # raises: unknown state
    raise AssertionError("unreachable")


class FormerlabCache(Cache):
    """The ``Cache`` of a model swapped by :func:`~formerlab.integrations.hf.swap_attention`:
    one :class:`FormerlabLayer` per self-attention layer, holding that layer's formerlab
    streaming state (layers left out of ``layers=`` stream exact ``softmax``).

    ``generate`` builds one by itself for a swapped decoder; build one to decode by hand::

        cache = FormerlabCache(model)
        out = model(input_ids=prompt, attention_mask=mask, cache=cache, use_cache=True)
        out = model(input_ids=next_ids, attention_mask=longer_mask, cache=cache,
                    use_cache=True)

    Raises ``ValueError`` for a model that is not swapped, an encoder, or a kernel that
    cannot stream (``use_cache=False`` is the way then).
    """

    def __init__(self, model: nn.Module) -> None:
        record = getattr(model, "_formerlab_swap", None)  # set by swap_attention
        if record is None:
            raise ValueError(
                f"FormerlabCache needs a model swapped by swap_attention; "
                f"{type(model).__name__} is not"
            )
        if not record.causal:
            raise ValueError(
                f"{type(model).__name__} attends bidirectionally (an encoder): it has no "
                "cache to decode with"
            )
        found = record.attention
        layers: list[FormerlabLayer] = []
        for position, module in enumerate(found):
            layer_idx = getattr(module, "layer_idx", position)
            if layer_idx != position:
                raise ValueError(
                    f"attention module {position} has layer_idx={layer_idx}; FormerlabCache "
                    "expects the layers numbered 0, 1, … in order"
                )
            swapped = getattr(module, "formerlab_attention", None)
            kernel = swapped.kernel if swapped is not None else attention.build("softmax")
            check_streams(kernel)
            layers.append(FormerlabLayer(kernel, module))
        super().__init__(layers=layers)

    def __repr__(self) -> str:
        return f"FormerlabCache(layers={self.layers})"


__all__ = [
    "FormerlabCache",
    "FormerlabLayer",
    "PENDING",
    "check_streams",
    "select_state_rows",
]
