"""Registry of token mixers: ``available()``, ``build(name, dim=..., heads=..., ...)``.

Mixer classes are registered directly (their constructor is the factory, so the registry's
option list and defaults cannot drift from the class). Two mixer-specific rules live here:

* a registration may declare ``ignores=("heads",)``: options every model passes to every
  mixer but this one has no use for; they are dropped before the class is called;
* a mixer that takes ``kernel=`` plus flat ``**kernel_options`` gets one combined check:
  an option neither the mixer nor its kernel knows is reported with both option lists.
"""

from __future__ import annotations

import inspect
from typing import Any

from formerlab import attention
from formerlab.registry import Entry, Registry


class MixerRegistry(Registry):
    """A ``Registry`` whose ``build`` knows about ignored options and kernel options."""

    def build(self, name: str, /, *args: Any, **options: Any) -> Any:
        entry = self.entry(name)
        ignored = entry.extra.get("ignores", ())
        options = {k: v for k, v in options.items() if k not in ignored}
        if takes_kernel_options(entry):
            check_kernel_options(entry, options)
        return super().build(name, *args, **options)


def takes_kernel_options(entry: Entry) -> bool:
    """Whether a mixer passes ``**options`` it does not know itself on to its kernel."""
    return entry.accepts_any_option() and "kernel" in entry.options()


def check_kernel_options(entry: Entry, options: dict[str, Any]) -> None:
    """Raise ``ValueError`` for options neither mixer ``entry`` nor its kernel takes."""
    default = inspect.signature(entry.factory).parameters["kernel"].default
    kernel = attention.KERNELS.entry(options.get("kernel", default))
    if kernel.accepts_any_option():
        return
    own = [o for o in entry.options() if o != "dim"]
    unknown = sorted(set(options) - {"dim", *own} - set(kernel.options()))
    if unknown:
        raise ValueError(
            f"unknown option(s) {unknown} for token mixer {entry.name!r} with kernel "
            f"{kernel.name!r}; mixer options: {own}; kernel options: {kernel.options()}"
        )


MIXERS = MixerRegistry("token mixer")
register = MIXERS.register


def available(causal: bool | None = None) -> list[str]:
    """Mixer names; with ``causal=True`` only those that can run causally."""
    return MIXERS.available(causal=True) if causal else MIXERS.available(None)


def is_causal_only(name: str) -> bool:
    """Whether mixer ``name`` runs only causally (registered with ``causal_only=True``:
    the recurrent mixers); call it with ``causal=True`` even in an encoder."""
    return bool(MIXERS.entry(name).extra.get("causal_only", False))


def build(name: str, **options: Any):
    """Build mixer ``name`` (e.g. ``build("attention", dim=128, heads=4, kernel="softmax")``)."""
    return MIXERS.build(name, **options)


def describe() -> list[Entry]:
    """Every registered mixer's entry (name, causal support, complexity, description)."""
    return MIXERS.entries()
