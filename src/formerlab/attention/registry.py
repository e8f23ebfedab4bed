"""Registry of attention kernels: ``available()``, ``build(name, **options)``, ``register``."""

from __future__ import annotations

from typing import Any

from formerlab.registry import Entry, Registry

KERNELS = Registry("attention kernel")
register = KERNELS.register


def available(causal: bool | None = None, packed: bool = False) -> list[str]:
    """Kernel names; with ``causal=True`` only those that support causal masking.

    ``packed=True``: only those that take ``cu_seqlens`` (packed sequences,
    :mod:`formerlab.attention.packed`) in a call with ``causal=True`` (``causal=True``),
    with ``causal=False`` (``causal=False``), or in either (``causal=None``).
    """
    names = KERNELS.available(causal=True) if causal else KERNELS.available(None)
    if not packed:
        return names
    wanted = {True: {"causal"}, False: {"bidirectional"}}.get(causal, {"causal", "bidirectional"})
    return [n for n in names if wanted & set(packed_modes(KERNELS.entry(n)))]


def packed_modes(entry: Entry) -> tuple[str, ...]:
    """``"causal"`` / ``"bidirectional"``: the calls in which kernel ``entry`` takes packed
    sequences (none by default)."""
    return tuple(entry.extra.get("packed_modes", getattr(entry.factory, "packed_modes", ())))


def build(name: str, **options: Any):
    """Build kernel ``name``; unknown names or options raise ``ValueError`` listing valid ones."""
    return KERNELS.build(name, **options)


def describe() -> list[Entry]:
    """Every registered kernel's entry (name, causal support, complexity, description)."""
    return KERNELS.entries()
