"""Registry of tasks: ``available()``, ``build(name, **options)``."""

from __future__ import annotations

from typing import Any

from formerlab.registry import Entry, Registry

TASKS = Registry("task")
register = TASKS.register


def available() -> list[str]:
    return TASKS.available()


def build(name: str, **options: Any):
    """Build task ``name``; unknown names or options raise ``ValueError`` listing valid ones."""
    return TASKS.build(name, **options)


def describe() -> list[Entry]:
    return TASKS.entries()
