"""The ``formerlab`` command. Sub-commands are thin: they parse, then call into the library."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(
    help="formerlab: efficient and implicit Transformer layers, and a workbench to compare them.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)
attention_app = typer.Typer(help="Attention kernels.", no_args_is_help=True)
bench_app = typer.Typer(help="Speed / memory benchmarks (ratios measured side by side).", no_args_is_help=True)
app.add_typer(attention_app, name="attention")
app.add_typer(bench_app, name="bench")
console = Console()


@attention_app.command("list")
def attention_list() -> None:
    """List attention kernels: name, causal support, cost, description."""
    from formerlab import attention

    table = Table(title="attention kernels")
    for column in ("name", "causal", "complexity", "description"):
        table.add_column(column)
    for entry in attention.describe():
        table.add_row(entry.name, "yes" if entry.causal else "no", entry.complexity, entry.description)
    console.print(table)


def main() -> None:  # pragma: no cover - console-script entry
    app()
