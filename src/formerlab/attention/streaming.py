"""Shared pieces of the kernels' streaming states (``init_state`` / ``step``).

A causal kernel that streams keeps what the past contributes to every future output in a
plain dataclass of tensors, stored in the compute dtype (float32 for low-precision
inputs, float64 for float64). This module holds what the states of several kernels
share: checking a step's inputs against its state, appending to sequence buffers that
several states may share (amortised O(1) per token, never a ``torch.cat`` per token), and
measuring a state's memory (for tests and benchmarks).

States are values: ``step`` never changes the state it is given, so one state can be
stepped twice (branching, beam search, a cached prompt reused). Buffers that grow with the
sequence are append-only and shared between a state and its successors: a state that
holds ``used`` positions may write position ``used`` in place only if nobody has written
there yet (its :class:`Tail` says how far the shared buffer is filled); otherwise it
copies its own prefix first (copy-on-write, :func:`claim`). The common single-path case
never copies more than the geometric growth does.

Padding (batches of sequences of different lengths). ``step(q, k, v, state,
attention_mask=None)`` takes ``attention_mask``, bool (B, T), True = real token, for the
T new tokens. A masked step equals the parallel causal call with the same mask over the
whole stream (the masks of all steps side by side): a padded token adds nothing to its
row's state (no key and value, no feature sum, no landmark) and its output is zero. With
left padding each row therefore gets exactly what it gets alone, stepped from its first
real token, so prompts of different lengths share one batch: ``causal_nystrom`` counts
its segments from each row's first real token (a per-row segment phase in its state), as
its parallel call does; rotary or learned positions counted from each row's first real
token are the caller's part (:mod:`formerlab.mixers.streaming`). Without a mask every
token is real. States that never saw a mask stay as they were (no mask buffers).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from formerlab.errors import check_positive_int
from formerlab.linalg.numerics import compute_dtype

# capacities are multiples of this many positions
GROW_CHUNK = 64


def state_dims(
    batch: int, heads: int, head_dim: int, value_dim: int | None, dtype: torch.dtype
) -> tuple[int, int, int, int, torch.dtype]:
    """Validated ``(batch, heads, head_dim, value_dim, compute dtype)`` of ``init_state``."""
    check_positive_int("batch", batch)
    check_positive_int("heads", heads)
    check_positive_int("head_dim", head_dim)
    value_dim = head_dim if value_dim is None else check_positive_int("value_dim", value_dim)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype={dtype!r} is not allowed; expected a floating torch.dtype")
    return batch, heads, head_dim, value_dim, compute_dtype(dtype)


def check_step(
    kernel: str,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    state: Any,
    state_type: type,
    dims: Callable[[Any], tuple[int, int, int, int]],
    attention_mask: Any = None,
) -> None:
    """Raise ``ValueError`` unless q, k, v (B, H, T, D) fit ``state`` (of ``state_type``)
    and ``attention_mask`` is None or bool (B, T).

    ``dims(state)`` = the (B, H, D, E) the state was built for.
    """
    if not isinstance(state, state_type):
        raise ValueError(
            f"state must be a {state_type.__name__} from {kernel!r}.init_state(...); "
            f"got {type(state).__name__}"
        )
    for arg, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor) or t.dim() != 4 or not t.is_floating_point():
            shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"{arg} must be a floating 4-d tensor (B, H, T, D); got {shape}")
    b, h, d, e = dims(state)
    t = q.shape[2]
    want = {"q": (b, h, t, d), "k": (b, h, t, d), "v": (b, h, t, e)}
    for arg, x in (("q", q), ("k", k), ("v", v)):
        if tuple(x.shape) != want[arg]:
            raise ValueError(
                f"{arg} has shape {tuple(x.shape)}; this {kernel!r} state takes "
                f"(B, H, T, {'E' if arg == 'v' else 'D'}) = {want[arg]} with T >= 1"
            )
    if t < 1:
        raise ValueError(f"step needs T >= 1 new tokens; got T={t}")
    if q.dtype != k.dtype or q.dtype != v.dtype:
        raise ValueError(f"q, k, v must share one dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    check_step_mask(attention_mask, b, t)


def check_step_mask(attention_mask: Any, batch: int, tokens: int) -> None:
    """Raise ``ValueError`` unless ``attention_mask`` is None or a bool (B, T) tensor."""
    if attention_mask is None:
        return
    ok = isinstance(attention_mask, Tensor) and attention_mask.dtype == torch.bool
    if not ok or tuple(attention_mask.shape) != (batch, tokens):
        got = (
            f"dtype {attention_mask.dtype}, shape {tuple(attention_mask.shape)}"
            if isinstance(attention_mask, Tensor)
            else type(attention_mask).__name__
        )
        raise ValueError(
            f"attention_mask of a step must be bool (B, T) = ({batch}, {tokens}), True = real "
            f"token; got {got}"
        )


def reserve(buffer: Tensor, used: int, needed: int, dim: int = 2) -> Tensor:
    """``buffer`` with room for ``needed`` positions along ``dim`` (first ``used`` kept).

    Capacity grows geometrically (at least doubling, in multiples of ``GROW_CHUNK``), so
    appending N tokens one at a time copies O(N) entries in total.
    """
    capacity = buffer.shape[dim]
    if needed <= capacity:
        return buffer
    new_cap = max(needed, 2 * capacity)
    new_cap = -(-new_cap // GROW_CHUNK) * GROW_CHUNK
    shape = list(buffer.shape)
    shape[dim] = new_cap
    grown = buffer.new_zeros(shape)
    grown.narrow(dim, 0, used).copy_(buffer.narrow(dim, 0, used))
    return grown


class Tail:
    """How many positions of a set of shared append-only buffers have been written.

    One ``Tail`` is shared by every state that uses the same buffers; a state holding
    ``used`` positions owns the end of the buffers exactly when ``tail.filled == used``.
    Buffers whose rows fill at different times (``causal_nystrom``'s landmarks under left
    padding) record a tuple of per-row counts instead (the ``mark`` of :func:`claim`).
    States keep it as a ``tail_field()`` (left out of their ``==`` and ``repr``).
    """

    __slots__ = ("filled",)

    def __init__(self, filled: Any = 0) -> None:
        self.filled = filled

    def __repr__(self) -> str:
        return f"Tail(filled={self.filled})"


def tail_field() -> Any:
    """A dataclass field holding a fresh :class:`Tail` (bookkeeping: no compare, no repr)."""
    return dataclasses.field(default_factory=Tail, compare=False, repr=False)


def claim(
    buffers: tuple[Tensor, ...],
    tail: Tail,
    used: int,
    needed: int,
    dim: int = 2,
    *,
    mark: Any = None,
    new_mark: Any = None,
) -> tuple[tuple[Tensor, ...], Tail]:
    """Buffers into which a state holding ``used`` positions may write positions
    ``used … needed − 1`` without changing what any other state sees; and their tail.

    In place (growing geometrically, :func:`reserve`) when the state owns the end of the
    buffers; otherwise — another state sharing them has written past ``used`` — a copy of
    the first ``used`` positions (copy-on-write). The returned tail is marked filled to
    ``needed``: write those positions before anyone else claims these buffers.

    ``mark`` / ``new_mark`` (default ``used`` / ``needed``): what the tail records, for
    buffers whose rows fill at different times (a tuple of per-row counts; ``used`` is
    then their maximum). A state then owns the buffers only while nobody has written any
    row past its own count, and may write any row's positions below ``needed``.
    """
    if needed < used:
        raise ValueError(f"needed={needed} is below used={used}")
    mark = used if mark is None else mark
    new_mark = needed if new_mark is None else new_mark
    if tail.filled != mark:  # shared past `used`: the other branch's tokens are there
        fresh = tuple(_copy_prefix(b, used, needed, dim) for b in buffers)
        tail = Tail(mark)
    else:
        fresh = tuple(reserve(b, used, needed, dim) for b in buffers)
        if any(f is not b for f, b in zip(fresh, buffers)):
            tail = Tail(mark)  # new storage: the old buffers stay with their old owners
    tail.filled = new_mark
    return fresh, tail


def _copy_prefix(buffer: Tensor, used: int, needed: int, dim: int) -> Tensor:
    """New storage of ``buffer``'s shape (grown as :func:`reserve` grows it, if ``needed``
    exceeds its capacity) holding its first ``used`` positions."""
    if needed > buffer.shape[dim]:
        return reserve(buffer, used, needed, dim)  # growing always allocates
    fresh = buffer.new_zeros(buffer.shape)
    fresh.narrow(dim, 0, used).copy_(buffer.narrow(dim, 0, used))
    return fresh


def state_nbytes(state: Any) -> int:
    """Bytes held by the tensors of a state dataclass (allocated capacity, not only used)."""
    return sum(
        f.nbytes
        for f in (getattr(state, fld.name) for fld in dataclasses.fields(state))
        if isinstance(f, Tensor)
    )
