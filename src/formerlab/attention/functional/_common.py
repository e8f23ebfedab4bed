"""Shared argument checks and the packed-sequence driver of the functional ops.

Every op of :mod:`formerlab.attention.functional` validates its inputs with these helpers
before doing any work, so that a bad input raises a ``ValueError`` naming the argument,
the value or shape it got and the layout that was expected. Layouts follow fla
(flash-linear-attention): per-token tensors are ``[B, T, H, ...]`` and recurrent states are
``[N, H, K, V]``, where ``N`` is the batch size ``B`` or, with ``cu_seqlens``, the number
of packed sequences.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

#: Chunk length of the chunked-parallel ops unless the caller gives one.
DEFAULT_CHUNK_SIZE = 64

#: Per-token tensors a packed-sequence core receives (``None`` for an absent one).
PerToken = Sequence[torch.Tensor | None]

#: A single-sequence core: ``core(*per_token, initial_state) -> (o, final_state)``.
Core = Callable[..., tuple[torch.Tensor, torch.Tensor | None]]


def _shape(x: torch.Tensor) -> tuple[int, ...]:
    return tuple(x.shape)


def _check_tensor(name: str, x: object) -> torch.Tensor:
    """Raise unless ``x`` is a floating-point tensor; return it."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    return x


def _check_device(name: str, x: torch.Tensor, device: torch.device | None) -> None:
    if device is not None and x.device != device:
        raise ValueError(f"{name} is on device {x.device}, expected {device} (the device of q)")


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[int, int, int, int, int]:
    """Validate queries, keys and values in fla's layout and return their sizes.

    Args:
        q: queries ``[B, T, H, K]``.
        k: keys ``[B, T, H, K]`` (the shape of ``q``).
        v: values ``[B, T, H, V]`` (the ``B, T, H`` of ``q``).

    Returns:
        ``(B, T, H, K, V)``.

    Raises:
        ValueError: naming the bad argument, its shape (or dtype, device) and the expected
            layout, when a tensor is not floating point, not of rank 4, has an empty
            dimension, disagrees with ``q`` or lives on another device.
    """
    q = _check_tensor("q", q)
    if q.dim() != 4 or 0 in q.shape:
        raise ValueError(
            f"q has shape {_shape(q)}, expected [B, T, H, K]: rank 4 with every size >= 1"
        )
    k = _check_tensor("k", k)
    if _shape(k) != _shape(q):
        raise ValueError(f"k has shape {_shape(k)}, expected [B, T, H, K] = {_shape(q)} (q's)")
    v = _check_tensor("v", v)
    if v.dim() != 4 or _shape(v)[:3] != _shape(q)[:3] or v.shape[3] == 0:
        b, t, h, _ = q.shape
        raise ValueError(
            f"v has shape {_shape(v)}, expected [B, T, H, V] = ({b}, {t}, {h}, V) with V >= 1"
        )
    _check_device("k", k, q.device)
    _check_device("v", v, q.device)
    batch, seq_len, heads, key_dim = q.shape
    return batch, seq_len, heads, key_dim, v.shape[3]


def check_per_token(
    name: str,
    x: torch.Tensor,
    expected_shape: Sequence[int],
    layout: str | None = None,
    device: torch.device | None = None,
) -> torch.Tensor:
    """Validate a floating-point tensor of a known shape (a gate, ``beta``, ``g_gamma``...).

    Args:
        name: the argument's name, used in the error message.
        x: the tensor to check.
        expected_shape: the exact shape it must have, e.g. ``(B, T, H)``.
        layout: how the layout is written in messages, e.g. ``"[B, T, H, K]"``.
        device: the device it must be on (``q.device``); ``None`` skips the check.

    Returns:
        ``x`` unchanged.

    Raises:
        ValueError: naming ``name``, the shape (or dtype, device) it got and the expected one.
    """
    x = _check_tensor(name, x)
    expected = tuple(int(s) for s in expected_shape)
    if _shape(x) != expected:
        where = f"{layout} = {expected}" if layout else f"{expected}"
        raise ValueError(f"{name} has shape {_shape(x)}, expected {where}")
    _check_device(name, x, device)
    return x


def check_cu_seqlens(
    cu_seqlens: torch.Tensor | None, batch: int, seq_len: int
) -> tuple[int, ...] | None:
    """Validate fla's packed-sequence offsets and return them as Python ints.

    ``cu_seqlens = [0, t_1, t_1 + t_2, ..., T]`` marks ``S`` sequences packed along the time
    axis of a batch of one (the FlashAttention convention); nothing crosses a boundary.

    Args:
        cu_seqlens: a 1-D ``int32``/``int64`` tensor of ``S + 1`` offsets, or ``None``.
        batch: the batch size ``B`` of ``q`` (must be 1 with ``cu_seqlens``).
        seq_len: the length ``T`` of ``q``.

    Returns:
        The offsets as a tuple of ints (read once from the device), or ``None``.

    Raises:
        ValueError: naming ``cu_seqlens`` (its dtype, shape or values) and what is expected,
            or the batch size when it is not 1.
    """
    if cu_seqlens is None:
        return None
    if not isinstance(cu_seqlens, torch.Tensor):
        raise ValueError(f"cu_seqlens must be a torch.Tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"cu_seqlens has dtype {cu_seqlens.dtype}, expected torch.int32 or int64")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(
            f"cu_seqlens has shape {_shape(cu_seqlens)}, expected [S + 1] with S >= 1 sequences"
        )
    if batch != 1:
        raise ValueError(
            f"cu_seqlens needs a batch size of 1 (sequences packed along T), got B={batch}; "
            "flatten the batch to [1, B * T, ...] first"
        )
    offsets = tuple(int(o) for o in cu_seqlens.tolist())
    increasing = all(a < b for a, b in zip(offsets[:-1], offsets[1:]))
    if offsets[0] != 0 or offsets[-1] != seq_len or not increasing:
        raise ValueError(
            f"cu_seqlens={list(offsets)} is not allowed; expected strictly increasing offsets "
            f"from 0 to T={seq_len}"
        )
    return offsets


def check_initial_state(
    state: torch.Tensor | None,
    n_states: int,
    heads: int,
    key_dim: int,
    value_dim: int,
    packed: bool = False,
    layout: str = "[N, H, K, V]",
    device: torch.device | None = None,
) -> torch.Tensor | None:
    """Validate a recurrent state of shape ``[N, H, K, V]``.

    Args:
        state: the state, or ``None`` (a zero state).
        n_states: ``N``: the batch size ``B``, or the number of sequences ``S`` when packed.
        heads, key_dim, value_dim: ``H``, ``K`` and ``V``.
        packed: whether ``N`` counts ``cu_seqlens`` sequences (changes only the message).
        layout: how the layout is written in messages (``"[N, H, V, K]"`` for a
            transposed state; pass ``key_dim`` and ``value_dim`` swapped then).
        device: the device it must be on; ``None`` skips the check.

    Returns:
        ``state`` unchanged.

    Raises:
        ValueError: naming ``initial_state``, its shape and the expected one.
    """
    if state is None:
        return None
    state = _check_tensor("initial_state", state)
    expected = (n_states, heads, key_dim, value_dim)
    if _shape(state) != expected:
        what = f"S={n_states} sequences in cu_seqlens" if packed else f"batch size B={n_states}"
        raise ValueError(
            f"initial_state has shape {_shape(state)}, expected {layout} = {expected} "
            f"(N = the {what})"
        )
    _check_device("initial_state", state, device)
    return state


def resolve_scale(scale: float | None, key_dim: int) -> float:
    """Return the score scale: ``key_dim ** -0.5`` for ``None``, else ``scale`` checked.

    Raises:
        ValueError: naming ``scale`` when it is not a finite real number > 0.
    """
    if scale is None:
        return float(key_dim) ** -0.5
    ok = isinstance(scale, (int, float)) and not isinstance(scale, bool)
    if not ok or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale={scale!r} is not allowed; expected a finite number > 0 or None")
    return float(scale)


def check_chunk_size(chunk_size: int) -> int:
    """Return ``chunk_size`` if it is a positive power of two (fla's rule), else raise.

    Raises:
        ValueError: naming ``chunk_size`` and its value.
    """
    ok = isinstance(chunk_size, int) and not isinstance(chunk_size, bool)
    if not ok or chunk_size < 1 or chunk_size & (chunk_size - 1):
        raise ValueError(f"chunk_size={chunk_size!r} is not allowed; expected a power of two >= 1")
    return chunk_size


def work_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """The dtype the recurrences run in: float64 if any input is float64, else float32.

    Half-precision inputs (bf16, fp16) are computed in float32; the ops cast their output
    back to the dtype of ``v``. ``None`` entries are ignored.
    """
    if any(t is not None and t.dtype == torch.float64 for t in tensors):
        return torch.float64
    return torch.float32


def cast(dtype: torch.dtype, *tensors: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """Cast each tensor to ``dtype`` (autograd flows through the cast); keep ``None``."""
    return tuple(None if t is None else t.to(dtype) for t in tensors)


def transpose_state(state: torch.Tensor | None) -> torch.Tensor | None:
    """Swap the last two axes (``[N, H, V, K]`` <-> ``[N, H, K, V]``); keep ``None``."""
    return None if state is None else state.transpose(-1, -2)


def run_per_sequence(
    core: Core,
    per_token: PerToken,
    initial_state: torch.Tensor | None,
    offsets: Sequence[int] | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run a single-sequence core on the whole batch, or on each packed sequence.

    Args:
        core: ``core(*per_token, initial_state) -> (o, final_state)``, with every per-token
            tensor ``[B, T, ...]``, ``initial_state`` ``[B, H, K, V]`` or ``None``, ``o``
            ``[B, T, H, V]`` and ``final_state`` ``[B, H, K, V]`` (or ``None``).
        per_token: tensors with time on axis 1 (``None`` entries are passed through).
        initial_state: ``[N, H, K, V]`` or ``None``: ``N = B`` without offsets, else one
            state per packed sequence.
        offsets: the checked ``cu_seqlens`` (see :func:`check_cu_seqlens`), or ``None`` to
            run ``core`` once on the whole batch.

    Returns:
        ``(o, final_state)``: outputs concatenated back along ``T``; final states stacked
        ``[S, H, K, V]`` (``None`` if the core returned none).
    """
    if offsets is None:
        return core(*per_token, initial_state)
    lengths = [b - a for a, b in zip(offsets[:-1], offsets[1:])]
    # split / unbind (not slicing in a loop) so that backward assembles each gradient once
    pieces = [
        [None] * len(lengths) if x is None else list(torch.split(x, lengths, dim=1))
        for x in per_token
    ]
    states = [None] * len(lengths) if initial_state is None else list(initial_state.unbind(0))
    outputs, finals = [], []
    for i, state in enumerate(states):
        o, final = core(*(p[i] for p in pieces), None if state is None else state.unsqueeze(0))
        outputs.append(o)
        finals.append(final)
    final_state = None if any(f is None for f in finals) else torch.cat(finals, dim=0)
    return torch.cat(outputs, dim=1), final_state


class _ContiguousGrad(torch.autograd.Function):
    """The identity, whose gradient is handed back contiguous (see ``contiguous_grad``)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        return grad.contiguous()


def contiguous_grad(x: torch.Tensor) -> torch.Tensor:
    """``x`` unchanged, its gradient made contiguous: a transposed gradient is a layout the
    ops upstream of ``x`` may not have been traced with under ``torch.compile``."""
    return _ContiguousGrad.apply(x) if x.requires_grad else x
