"""Registry of token mixers: ``available()``, ``build(name, dim=..., heads=..., ...)``."""

from __future__ import annotations

from typing import Any

from formerlab.registry import Entry, Registry

MIXERS = Registry("token mixer")
register = MIXERS.register


def available(causal: bool | None = None) -> list[str]:
    """Mixer names; with ``causal=True`` only those that can run causally."""
    return MIXERS.available(causal=True) if causal else MIXERS.available(None)


def build(name: str, **options: Any):
    """Build mixer ``name`` (e.g. ``build("attention", dim=128, heads=4, kernel="softmax")``)."""
    return MIXERS.build(name, **options)


def describe() -> list[Entry]:
    return MIXERS.entries()
