"""Parameter counts of every registered token mixer at one width / head count.

Used by ``formerlab params CONFIG`` to print, for instance, that metric-tensor attention
keeps about half the parameters of standard multi-head attention. Entries may register
``variants=({...}, ...)`` (option sets worth listing separately, e.g. each metric); each
variant is one row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from formerlab.mixers.registry import MIXERS


def count_parameters(module: nn.Module) -> int:
    """Number of trainable scalars (shared tensors counted once)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


@dataclass
class ParamRow:
    """One mixer variant: its options, its parameter count and the ratio to ``attention``."""

    mixer: str
    options: dict[str, Any]
    params: int | None
    ratio: float | None = None
    error: str | None = None

    def label(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.options.items())


def takes_kernel(name: str) -> bool:
    """Whether mixer ``name`` accepts ``kernel=`` (and so flat kernel options)."""
    entry = MIXERS.entry(name)
    return entry.accepts_any_option() or "kernel" in entry.options()


def parameter_table(
    dim: int,
    heads: int,
    kernel: str = "softmax",
    kernel_options: dict[str, Any] | None = None,
    mixer_options: dict[str, dict[str, Any]] | None = None,
    baseline: str = "attention",
) -> list[ParamRow]:
    """One row per registered mixer (and per registered variant) at ``dim`` / ``heads``.

    Mixers that take a kernel get ``kernel`` and ``kernel_options``; ``mixer_options``
    maps a mixer name to extra options for it (e.g. the configured mixer's own). A mixer
    that cannot be built this way gets a row with ``error`` instead of a count. ``ratio``
    is params / params of ``baseline`` with its defaults.
    """
    rows = []
    for entry in MIXERS.entries():
        extra = dict((mixer_options or {}).get(entry.name, {}))
        variants = entry.extra.get("variants") or ({},)
        if extra:  # the configured options first, then the registered variants
            variants = ({},) + tuple(v for v in variants if v)
        seen: list[dict[str, Any]] = []
        for variant in variants:
            options = {**extra, **variant}
            if options in seen:
                continue
            seen.append(options)
            build = dict(options)
            if takes_kernel(entry.name):
                build = {"kernel": kernel, **(kernel_options or {}), **build}
            try:
                count = count_parameters(MIXERS.build(entry.name, dim=dim, heads=heads, **build))
                rows.append(ParamRow(entry.name, options, count))
            except (ValueError, TypeError) as error:
                rows.append(ParamRow(entry.name, options, None, error=str(error)))
    base = next((r for r in rows if r.mixer == baseline and r.params), None)
    for row in rows:
        if base is not None and row.params is not None:
            row.ratio = row.params / base.params
    return rows
