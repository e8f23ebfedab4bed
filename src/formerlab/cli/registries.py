"""``formerlab attention|mixers|solvers|tasks list`` and ``... describe NAME``: thin views of
the registries' ``describe()``."""

from __future__ import annotations

import inspect
from types import ModuleType

import typer

from formerlab.cli.common import Format, console, fail, format_option, write_table

attention_app = typer.Typer(help="Attention kernels.", no_args_is_help=True)
mixers_app = typer.Typer(help="Token mixers.", no_args_is_help=True)
solvers_app = typer.Typer(help="Fixed-point / root solvers.", no_args_is_help=True)
tasks_app = typer.Typer(help="Tasks (generated and corpora).", no_args_is_help=True)


def _registry(kind: str) -> ModuleType:
    import importlib

    return importlib.import_module({"attention": "formerlab.attention", "mixers": "formerlab.mixers",
                                    "solvers": "formerlab.solvers", "tasks": "formerlab.data"}[kind])


#: what one entry of each registry is called
NOUN = {"attention": "attention kernel", "mixers": "token mixer", "solvers": "solver",
        "tasks": "task"}


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def registry_rows(entries) -> tuple[list[str], list[list[str]]]:
    """Columns and rows of registry entries: name, causal support, cost, description."""
    return (["name", "causal", "complexity", "description"],
            [[e.name, _yes(e.causal), e.complexity, e.description] for e in entries])


@attention_app.command("list")
def attention_list(fmt: Format = format_option()) -> None:
    """List attention kernels: name, causal support, cost, description."""
    write_table("attention kernels", *registry_rows(_registry("attention").describe()), fmt)


@mixers_app.command("list")
def mixers_list(fmt: Format = format_option()) -> None:
    """List token mixers: name, causal support, cost, description."""
    write_table("token mixers", *registry_rows(_registry("mixers").describe()), fmt)


@solvers_app.command("list")
def solvers_list(fmt: Format = format_option()) -> None:
    """List solvers and whether they solve general root problems (solve_root)."""
    rows = [[e.name, "yes" if e.extra.get("root") else "fixed-point only", e.description]
            for e in _registry("solvers").describe()]
    write_table("solvers", ["name", "general root problems", "description"], rows, fmt)


@tasks_app.command("list")
def tasks_list(fmt: Format = format_option()) -> None:
    """List tasks: name and description."""
    rows = [[e.name, e.description] for e in _registry("tasks").describe()]
    write_table("tasks", ["name", "description"], rows, fmt)


# --- describe --------------------------------------------------------------------------------


def option_rows(factory) -> list[list[str]]:
    """(option, default, type) of a factory's keyword options; required ones say so."""
    rows = []
    for p in inspect.signature(factory).parameters.values():
        if p.kind not in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) or p.name == "self":
            continue
        default = "(required)" if p.default is p.empty else repr(p.default)
        kind = "" if p.annotation is p.empty else str(p.annotation).strip("'")
        rows.append([p.name, default, kind])
    return rows


def streaming_support(kind: str, entry) -> str:
    """Whether the entry has a streaming form (init_state / step)."""
    flag = getattr(entry.factory, "supports_streaming", None)
    if isinstance(flag, bool):
        return _yes(flag)
    if kind == "mixers" and entry.causal:
        return "when its kernel streams (see `formerlab attention describe`)"
    return "no" if kind == "attention" else "n/a"


def describe_entry(kind: str, name: str, fmt: Format) -> None:
    registry = _registry(kind)
    entries = {e.name: e for e in registry.describe()}
    if name not in entries:
        raise fail(ValueError(f"unknown {NOUN[kind]} {name!r}; valid names: "
                              f"{', '.join(sorted(entries))}"))
    e = entries[name]
    facts = [["name", e.name], ["description", e.description or "–"]]
    if kind in ("attention", "mixers"):
        facts += [["causal", _yes(e.causal)], ["streaming", streaming_support(kind, e)],
                  ["complexity", e.complexity or "–"]]
    if kind == "solvers":
        facts.append(["general root problems", "yes" if e.extra.get("root") else "fixed-point only"])
    facts += [[key, str(value)] for key, value in e.extra.items() if key != "root"]
    write_table(f"{NOUN[kind]} {e.name}", ["property", "value"], facts, fmt)
    options = option_rows(e.factory)
    if fmt == Format.table:
        console.print()
    write_table(f"options of {e.name}", ["option", "default", "type"],
                options or [["(none)", "", ""]], fmt)


NAME_HELP = "A registered name (see the list command)."


@attention_app.command("describe")
def attention_describe(name: str = typer.Argument(..., help=NAME_HELP),
                       fmt: Format = format_option()) -> None:
    """One attention kernel: options with defaults, causal / streaming support, complexity,
    description."""
    describe_entry("attention", name, fmt)


@mixers_app.command("describe")
def mixers_describe(name: str = typer.Argument(..., help=NAME_HELP),
                    fmt: Format = format_option()) -> None:
    """One token mixer: options with defaults, causal / streaming support, complexity,
    description."""
    describe_entry("mixers", name, fmt)


@solvers_app.command("describe")
def solvers_describe(name: str = typer.Argument(..., help=NAME_HELP),
                     fmt: Format = format_option()) -> None:
    """One solver: options with defaults, whether it solves general root problems,
    description."""
    describe_entry("solvers", name, fmt)


@tasks_app.command("describe")
def tasks_describe(name: str = typer.Argument(..., help=NAME_HELP),
                   fmt: Format = format_option()) -> None:
    """One task: options with defaults, description."""
    describe_entry("tasks", name, fmt)
