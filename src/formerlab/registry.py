"""A small name -> factory registry shared by kernels, mixers and solvers.

Each entry records the factory plus the facts a user needs to choose between entries
(causal support, cost, a one-line description). Building validates option names against
the factory's signature so a typo fails with the list of valid options, not deep inside.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Entry:
    """One registered factory and what it supports."""

    name: str
    factory: Callable[..., Any]
    description: str = ""
    causal: bool = False
    complexity: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def options(self) -> list[str]:
        """Keyword options the factory accepts (empty if it takes **kwargs only)."""
        params = inspect.signature(self.factory).parameters.values()
        return [
            p.name
            for p in params
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name != "self"
        ]

    def accepts_any_option(self) -> bool:
        params = inspect.signature(self.factory).parameters.values()
        return any(p.kind is p.VAR_KEYWORD for p in params)


class Registry:
    """Maps names to factories; ``kind`` names what is registered (used in error messages)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Entry] = {}

    def register(
        self,
        name: str,
        *,
        description: str = "",
        causal: bool = False,
        complexity: str = "",
        **extra: Any,
    ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Decorator: register ``factory`` under ``name``. Re-registering a name is an error."""

        def decorate(factory: Callable[..., Any]) -> Callable[..., Any]:
            if name in self._entries and self._entries[name].factory is not factory:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            doc = description or (inspect.getdoc(factory) or "").split("\n")[0]
            self._entries[name] = Entry(name, factory, doc, causal, complexity, dict(extra))
            return factory

        return decorate

    def available(self, causal: bool | None = None) -> list[str]:
        """Registered names, sorted; ``causal=True`` keeps only causal-capable entries."""
        return sorted(
            n for n, e in self._entries.items() if causal is None or e.causal == causal
        )

    def entry(self, name: str) -> Entry:
        """The entry for ``name``; unknown names raise with the list of valid ones."""
        try:
            return self._entries[name]
        except KeyError:
            raise ValueError(
                f"unknown {self.kind} {name!r}; available: {self.available()}"
            ) from None

    def entries(self) -> list[Entry]:
        return [self._entries[n] for n in self.available()]

    def check_options(self, name: str, options: dict[str, Any]) -> None:
        """Raise if ``options`` holds a keyword the factory of ``name`` does not take."""
        entry = self.entry(name)
        if entry.accepts_any_option():
            return
        valid = entry.options()
        unknown = sorted(set(options) - set(valid))
        if unknown:
            raise ValueError(
                f"unknown option(s) {unknown} for {self.kind} {name!r}; valid options: {valid}"
            )

    def build(self, name: str, /, *args: Any, **options: Any) -> Any:
        """Build ``name`` with ``options``; unknown names or options raise ``ValueError``."""
        self.check_options(name, options)
        return self.entry(name).factory(*args, **options)

    def __contains__(self, name: object) -> bool:
        return name in self._entries
