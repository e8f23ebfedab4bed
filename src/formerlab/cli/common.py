"""What every command shares: the console, ``fail()``, the exit codes, shared options
(``--set``, ``--threads``, ``--format``) and the one table writer."""

from __future__ import annotations

import csv
from collections.abc import Callable, Iterable, Sequence
from enum import StrEnum

import typer
from rich import box
from rich.console import Console
from rich.table import Table

console = Console()
#: progress lines and notes that must not mix into a table on stdout (e.g. ``--format csv``)
err_console = Console(stderr=True)

#: exit codes (README, "Reliability"): 2 a usage / config / file error, 3 a sweep with failed
#: trials, 130 interrupted with Ctrl-C (after saving)
EXIT_USAGE, EXIT_TRIALS_FAILED, EXIT_INTERRUPTED = 2, 3, 130


def fail(error: Exception | str, code: int = EXIT_USAGE) -> typer.Exit:
    """Print a user error without a traceback; use as ``raise fail(err)``."""
    from rich.markup import escape

    console.print(f"[bold red]error:[/] {escape(str(error))}", highlight=False)
    return typer.Exit(code)


# --- --set key=value -------------------------------------------------------------------------


def check_overrides(values: list[str] | None) -> list[str]:
    """``--set`` callback: every item must be ``key=value`` (``--set train.steps 5`` is a
    usage error, exit 2, before any work)."""
    for item in values or []:
        key, sep, _ = item.partition("=")
        if not sep or not key.strip():
            raise typer.BadParameter(
                f"{item!r} is not key=value; expected --set key=value, e.g. --set train.steps=5",
                param_hint="--set",
            )
    return list(values or [])


def set_option(example: str) -> list[str]:
    """The ``--set key=value`` option (repeatable), checked before any work."""
    return typer.Option([], "--set", callback=check_overrides,
                        help=f"Override a key (key=value, repeat): --set {example}.")


# --- --threads 1,2 ---------------------------------------------------------------------------


def parse_threads(value: str | None) -> tuple[int, ...] | None:
    """``--threads`` of every bench command: a comma list like ``1,2`` (None: torch's default);
    a bad value is a usage error naming ``--threads``."""
    from formerlab.bench.threads import parse_threads as parse

    if value is None:
        return None
    try:
        return parse(value)
    except ValueError as error:
        raise fail(error) from None


def threads_option(default: str | None = None, what: str = "") -> str | None:
    """The shared ``--threads`` option: one count or a comma list (``--threads 1,2``)."""
    text = ("torch threads: a count, or a comma list like 1,2 "
            + (what or "to time every method at each count, interleaved")
            + (" (default: torch's)." if default is None else "."))
    return typer.Option(default, "--threads", help=text)


def one_thread_count(counts: tuple[int, ...] | None, command: str) -> int | None:
    """Commands that run at a single thread count: refuse a list, with the reason."""
    if counts is not None and len(counts) > 1:
        raise fail(ValueError(f"--threads={','.join(map(str, counts))}: {command} runs at one "
                              "thread count; give one, e.g. --threads 1"))
    return None if counts is None else counts[0]


# --- the table writer ------------------------------------------------------------------------


class Format(StrEnum):
    table = "table"
    markdown = "markdown"
    csv = "csv"


def format_option(default: Format | None = Format.table, note: str = "") -> Format | None:
    """``--format table|markdown|csv`` (``default`` None: the command picks, see ``note``)."""
    return typer.Option(default, "--format", case_sensitive=False,
                        help="table (rich, for the terminal), markdown or csv" + (note or "."))


def markdown_option() -> bool:
    return typer.Option(False, "--markdown/--no-markdown", help="Same as --format markdown.")


def resolve_format(fmt: Format | None, markdown: bool = False,
                   default: Format = Format.table) -> Format:
    """``--markdown`` is an alias of ``--format markdown``; ``fmt`` None means ``default``."""
    if markdown and fmt not in (None, Format.table, Format.markdown):
        raise fail(ValueError(f"--markdown and --format {fmt.value} disagree; give one of them"))
    return Format.markdown if markdown else Format(fmt or default)


def write_table(
    title: str,
    columns: Sequence[str],
    rows: Iterable[Sequence[object]],
    fmt: Format = Format.table,
    *,
    right: Callable[[int, str], bool] | bool = False,
    notes: Iterable[str] = (),
) -> None:
    """Print one table as a rich table (headers and cells wrap, never cut to "…"), a
    markdown table (title above it) or CSV (header row first; title and notes to stderr).
    ``notes`` are lines printed after the table."""
    body = [["" if cell is None else str(cell) for cell in row] for row in rows]
    notes = list(notes)
    if fmt == Format.csv:
        out = typer.get_text_stream("stdout")
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(columns)
        writer.writerows(body)
        out.flush()
        if title:
            err_console.print(title, highlight=False, markup=False, soft_wrap=True)
        for line in notes:
            err_console.print(line, highlight=False, markup=False, soft_wrap=True)
        return
    if fmt == Format.markdown:
        lines = ([title, ""] if title else [])
        lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(row) + " |" for row in body]
        if notes:
            lines += [""] + notes
        typer.echo("\n".join(lines))  # plain: rich would wrap the long lines
        return
    justify = [("right" if (right(i, c) if callable(right) else right) else "left")
               for i, c in enumerate(columns)]
    for part, (cols, widths) in enumerate(fit_columns(columns, body, console.width)):
        # blank rules, two spaces between columns; a header wraps at its spaces and a
        # word wider than its column folds onto the next line: nothing is cut to "…"
        table = Table(title=(title if part == 0 else None) or None, box=box.SIMPLE_HEAD,
                      show_edge=False, pad_edge=False, padding=(0, 1, 0, 0))
        for i, width in zip(cols, widths):
            table.add_column(columns[i], justify=justify[i], overflow="fold", width=width)
        for row in body:
            table.add_row(*(row[i] for i in cols))
        console.print(table)
    for line in notes:
        console.print(line, highlight=False, markup=False)


GAP = 2  # between columns: one space of padding and the (blank) rule, no edges


def _words(text: str) -> int:
    return max((len(word) for word in text.split()), default=0)


def fit_columns(columns: Sequence[str], body: list[list[str]], width: int
                ) -> list[tuple[list[int], list[int | None]]]:
    """Column groups (indices, widths) that fit ``width`` characters. A table whose columns
    fit is one group with rich's own widths (None); otherwise headers wrap at their spaces
    (data cells keep their longest word whole), and a table too wide even so is split into
    several tables, each repeating the first column."""
    n = len(columns)
    natural = [max([len(columns[i])] + [len(r[i]) for r in body]) for i in range(n)]
    minimum = [max([_words(columns[i])] + [_words(r[i]) for r in body]) for i in range(n)]
    if sum(natural) + GAP * (n - 1) <= width:
        return [(list(range(n)), [None] * n)]
    groups: list[list[int]] = [[0]]
    for i in range(1, n):
        used = sum(minimum[j] for j in groups[-1]) + GAP * len(groups[-1])
        if used + minimum[i] > width and len(groups[-1]) > 1:
            groups.append([0])
        groups[-1].append(i)
    out = []
    for cols in groups:
        spare = width - GAP * (len(cols) - 1) - sum(minimum[i] for i in cols)
        widths = [minimum[i] for i in cols]
        wants = [natural[i] - minimum[i] for i in cols]
        while spare > 0 and any(wants):  # share what is left, one character at a time
            for k in range(len(cols)):
                if spare > 0 and wants[k] > 0:
                    widths[k] += 1
                    wants[k] -= 1
                    spare -= 1
        out.append((cols, widths))
    return out


def progress_line(message: str) -> None:
    """A progress line on stderr (stdout stays clean for tables)."""
    err_console.print(f"  {message}", highlight=False, markup=False)


def with_sdpa_backends(methods: list[str], device: str) -> list[str]:
    """On CUDA, exact attention on SDPA's flash and memory-efficient backends joins the
    comparison (unless already asked for)."""
    if not device.startswith("cuda"):
        return list(methods)
    return list(methods) + [m for m in ("sdpa-flash", "sdpa-efficient") if m not in methods]


def markdown_cells(text: str) -> tuple[list[str], list[list[str]]]:
    """(columns, rows) of a markdown table made by a library function (its ``|---|`` rule
    dropped), for :func:`write_table`."""
    lines = [line.strip() for line in text.splitlines() if line.strip().startswith("|")]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    body = [row for row in cells[1:] if not all(set(c) <= set("-: ") for c in row)]
    return cells[0], body


def write_markdown(title: str, text: str, fmt: Format = Format.table, **options) -> None:
    """:func:`write_table` of a library function's markdown table."""
    write_table(title, *markdown_cells(text), fmt, **options)
