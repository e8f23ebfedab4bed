"""Registry of solvers: ``available()``, ``build(name, **options)``, ``register``.

Entries record whether the method solves general root problems (``root=True``) or
fixed-point problems only.
"""

from __future__ import annotations

from typing import Any

from formerlab.registry import Entry, Registry

SOLVERS = Registry("solver")
register = SOLVERS.register


def available(root: bool | None = None) -> list[str]:
    """Solver names; with ``root=True`` only those that solve general root problems."""
    names = SOLVERS.available()
    if root is None:
        return names
    return [n for n in names if bool(SOLVERS.entry(n).extra.get("root")) == root]


def build(name: str, **options: Any):
    """Build solver ``name`` (e.g. ``build("anderson", memory=5)``); unknown names or
    options raise ``ValueError`` listing the valid ones."""
    return SOLVERS.build(name, **options)


def describe() -> list[Entry]:
    """Every registered solver's entry (name, cost, description, ``extra['root']``)."""
    return SOLVERS.entries()
