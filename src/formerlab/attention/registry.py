"""Registry of attention kernels: ``available()``, ``build(name, **options)``, ``register``."""

from __future__ import annotations

from typing import Any

from formerlab.registry import Entry, Registry

KERNELS = Registry("attention kernel")
register = KERNELS.register


def available(causal: bool | None = None) -> list[str]:
    """Kernel names; with ``causal=True`` only those that support causal masking."""
    return KERNELS.available(causal=True) if causal else KERNELS.available(None)


def build(name: str, **options: Any):
    """Build kernel ``name``; unknown names or options raise ``ValueError`` listing valid ones."""
    return KERNELS.build(name, **options)


def describe() -> list[Entry]:
    """Every registered kernel's entry (name, causal support, complexity, description)."""
    return KERNELS.entries()
