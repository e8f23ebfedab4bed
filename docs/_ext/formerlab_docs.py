"""Sphinx extension: the generated parts of the formerlab reference.

Every page fragment here is computed from the code when the docs are built, so the
reference cannot drift from what the code does:

* ``cli_markdown()``: every command of the Typer app (``formerlab.cli:app``, walked as the
  click command tree), with its usage, help, arguments and options (type, default, help);
* ``config_markdown()``: every key of ``RunConfig`` and its sections (type, default,
  constraints, description, the checks its validators make) and the ``model.deq`` options;
* ``registry_markdown(kind)``: the attention kernels, token mixers, solvers and tasks from
  each package's ``describe()``, with every option and its default;
* ``exit_codes_markdown()``: the ``EXIT_*`` codes of the command line (and of sweep
  workers), with what each means.

The functions return MyST Markdown; at ``builder-inited`` they are written to
``docs/reference/_generated/*.md`` (git-ignored, rewritten only when they change), which the
reference pages ``{include}``. ``tests/test_docs.py`` calls the same functions. Anything the
generators cannot describe (an exit code or a config validator without a description here)
raises, so the build fails rather than publishing a silent gap.

Also here: ``autodoc-process-docstring`` escapes the bars of ``|x|`` (absolute values and
norms, as the docstrings write them) outside inline literals, where reST would read a
substitution reference.
"""

from __future__ import annotations

import enum
import importlib
import inspect
import pkgutil
import re
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

GENERATED = Path(__file__).resolve().parent.parent / "reference" / "_generated"


class GenerationError(RuntimeError):
    """The code holds something the reference generators have no description for."""


# -- Markdown helpers ------------------------------------------------------------------

_MD_SPECIAL = re.compile(r"([\\`*_\[\]<>|{}#~$])")


def md(text: str) -> str:
    """``text`` as literal Markdown text (no markup, no HTML; safe in a table cell)."""
    return _MD_SPECIAL.sub(r"\\\1", re.sub(r"\s+", " ", str(text)))


def code(text: Any) -> str:
    """``text`` as an inline code span (safe in a table cell)."""
    text = " ".join(str(text).split()).replace("|", "\\|")
    fence = "``" if "`" in text else "`"
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


_RST_INLINE = re.compile(r"``(.+?)``|:[a-z:]+:`~?(.+?)`|`([^`]+)`")


def doc_md(text: str) -> str:
    """A docstring's paragraph (reST inline markup: ``literal``, :role:`target`) as
    Markdown: literals and roles become code spans, everything else literal text."""
    out, pos = [], 0
    text = " ".join(str(text).split())
    for match in _RST_INLINE.finditer(text):
        out.append(md(text[pos:match.start()]))
        out.append(code(next(g for g in match.groups() if g is not None)))
        pos = match.end()
    out.append(md(text[pos:]))
    return "".join(out)


def doc_paragraphs(doc: str) -> str:
    """A whole docstring as Markdown paragraphs (its ``Args:`` section left out)."""
    paragraphs = []
    for paragraph in inspect.cleandoc(doc or "").split("\n\n"):
        if re.match(r"(Args|Arguments|Parameters|Returns|Raises|Example|Examples):", paragraph):
            break
        if paragraph.strip():
            paragraphs.append(doc_md(paragraph))
    return "\n\n".join(paragraphs)


def own_doc(obj: Any) -> str:
    """``obj``'s own docstring, cleaned (not one inherited from a base class)."""
    doc = getattr(obj, "__doc__", None)
    return inspect.cleandoc(doc) if isinstance(doc, str) else ""


def arg_docs(obj: Any) -> dict[str, str]:
    """``name -> description`` from the Google-style ``Args:`` section of ``obj``'s
    docstring (the class's, then its ``__init__``'s); ``a, b: text`` describes both."""
    found: dict[str, str] = {}
    docs = [own_doc(obj)]
    if inspect.isclass(obj) and "__init__" in vars(obj):
        docs.append(own_doc(vars(obj)["__init__"]))
    for doc in docs:
        lines = doc.splitlines()
        inside, indent, current = False, None, None
        for line in lines:
            if re.fullmatch(r"(Args|Arguments|Parameters|Keyword Args):\s*", line.strip()):
                inside, indent, current = True, None, None
                continue
            if not inside:
                continue
            if not line.strip():
                continue
            width = len(line) - len(line.lstrip())
            if indent is None:
                indent = width
            if width < indent or (width == 0):
                inside = False
                continue
            entry = re.match(r"\s*([\w*]+(?:\s*,\s*[\w*]+)*)\s*(?:\([^)]*\))?:\s*(.*)", line)
            if width == indent and entry:
                names = [n.strip().lstrip("*") for n in entry.group(1).split(",")]
                current = names
                for name in names:
                    found.setdefault(name, entry.group(2))
            elif current:
                for name in current:
                    if found.get(name) is not None:
                        found[name] += " " + line.strip()
    return {name: text.strip() for name, text in found.items()}


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell or " " for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def ref(text: str, label: str) -> str:
    """A ``{ref}`` role: a link to ``label`` (checked by the build) showing ``text``."""
    text = re.sub(r"([<>`])", r"\\\1", " ".join(text.split()))
    return f"{{ref}}`{text} <{label}>`"


def slug(*parts: str) -> str:
    return "-".join(re.sub(r"[^a-z0-9]+", "-", p.lower()).strip("-") for p in parts if p)


# -- CLI -------------------------------------------------------------------------------


def cli_commands(app: Any = None) -> list[tuple[list[str], Any, Any]]:
    """Every command of the Typer app as ``(path, click command, click context)``, the root
    first, then depth-first in the order ``--help`` lists them. Duck-typed: recent Typer
    releases ship their own copy of click, so nothing here checks click's classes."""
    import typer.main

    if app is None:
        from formerlab.cli import app
    root = typer.main.get_command(app)
    found: list[tuple[list[str], Any, Any]] = []

    def walk(command: Any, path: list[str], parent: Any) -> None:
        ctx = command.context_class(command, info_name=path[-1], parent=parent)
        found.append((path, command, ctx))
        if hasattr(command, "list_commands"):
            for name in command.list_commands(ctx):
                sub = command.get_command(ctx, name)
                if sub is not None and not getattr(sub, "hidden", False):
                    walk(sub, [*path, name], ctx)

    walk(root, ["formerlab"], None)
    return found


def _param_names(param: Any) -> str:
    if param.param_type_name == "argument":
        readable = getattr(param, "human_readable_name", None)  # click's Argument
        return readable or param.metavar or param.name.upper()
    names = ", ".join(param.opts)
    if param.secondary_opts:
        names += " / " + ", ".join(param.secondary_opts)
    return names


_TYPE_WORDS = {str: "text", int: "integer", float: "number", bool: "boolean"}


def _annotation_word(annotation: Any) -> str:
    if typing.get_origin(annotation) is typing.Literal:
        return "one of " + ", ".join(map(str, typing.get_args(annotation)))
    if inspect.isclass(annotation) and issubclass(annotation, enum.Enum):
        return "one of " + ", ".join(str(m.value) for m in annotation)
    return _TYPE_WORDS.get(annotation, getattr(annotation, "__name__", str(annotation)))


def _param_type(param: Any, ctx: Any) -> str:
    """What a parameter takes: ``integer (≥ 1)``, ``text, repeatable``, ``flag``, ...
    (from click's ``param.type``, or from the annotation in Typer's own click copy)."""
    multiple = bool(getattr(param, "multiple", False)) or getattr(param, "nargs", 1) == -1
    low = high = None
    if getattr(param, "is_flag", False) and not getattr(param, "count", False):
        kind = "flag"
    elif hasattr(param, "type"):  # click
        kind = ("one of " + ", ".join(map(str, param.type.choices))
                if hasattr(param.type, "choices") else param.type.name.lower())
        low, high = getattr(param.type, "min", None), getattr(param.type, "max", None)
    else:  # typer >= 0.2x: its own click copy, parameters typed by annotation
        annotation = param.type_descriptor.annotation
        if multiple and typing.get_origin(annotation) in (list, tuple, set):
            annotation = typing.get_args(annotation)[0]
        kind = _annotation_word(annotation)
        low, high = getattr(param, "min", None), getattr(param, "max", None)
    bounds = [f"≥ {low}" if low is not None else "", f"≤ {high}" if high is not None else ""]
    if any(bounds):
        kind += " (" + ", ".join(b for b in bounds if b) + ")"
    return kind + (", repeatable" if multiple else "")


def _usage_pieces(command: Any, ctx: Any) -> list[str]:
    """``[OPTIONS] CONFIG [RUN_DIR] ...`` (or ``COMMAND [ARGS]...`` for a group)."""
    pieces = ["[OPTIONS]"]
    for param in command.get_params(ctx):
        if param.param_type_name != "argument":
            continue
        piece = _param_names(param) + ("..." if getattr(param, "nargs", 1) == -1 else "")
        pieces.append(piece if param.required else f"[{piece}]")
    if hasattr(command, "list_commands"):
        pieces.append("COMMAND [ARGS]...")
    return pieces


def _param_default(param: Any) -> str:
    if param.required:
        return "required"
    default = param.default
    if callable(default):
        return "(computed)"
    if getattr(param, "is_flag", False) and getattr(param, "secondary_opts", None):
        return code(param.opts[0] if default else param.secondary_opts[0])
    if default is None or default == () or default == []:
        return "—"
    if isinstance(default, str) and not default.strip():
        return code(repr(default))
    return code(default)


def _help(command: Any) -> str:
    return inspect.cleandoc(command.help or getattr(command, "short_help", None) or "")


def cli_markdown(app: Any = None) -> str:
    """The CLI reference: one section per command, root first."""
    out = []
    for path, command, ctx in cli_commands(app):
        name = " ".join(path)
        label = slug("cli", *path[1:]) if len(path) > 1 else "cli-formerlab"
        out.append(f"({label})=\n## `{name}`\n")
        usage = " ".join([name, *_usage_pieces(command, ctx)])
        out.append(f"```text\n{usage}\n```\n")
        help_text = doc_paragraphs(_help(command))
        if help_text:
            out.append(help_text + "\n")
        subcommands = []
        if hasattr(command, "list_commands"):
            for sub in command.list_commands(ctx):
                c = command.get_command(ctx, sub)
                if c is None or getattr(c, "hidden", False):
                    continue
                first = (_help(c).split("\n\n")[0]) if _help(c) else ""
                subcommands.append([ref(f"{name} {sub}", slug('cli', *path[1:], sub)),
                                    doc_md(first)])
        if subcommands:
            out.append("Commands:\n\n" + table(["command", "what it does"], subcommands))
        rows = []
        for param in command.get_params(ctx):
            if getattr(param, "hidden", False) or "--help" in getattr(param, "opts", ()):
                continue
            kind = "argument" if param.param_type_name == "argument" else "option"
            rows.append([code(_param_names(param)), kind, md(_param_type(param, ctx)),
                         _param_default(param), doc_md(getattr(param, "help", None) or "")])
        if rows:
            out.append(table(["name", "kind", "type", "default", "help"], rows))
    return "\n".join(out)


# -- exit codes ------------------------------------------------------------------------

#: what each exit code of the ``formerlab`` command means (keys: the constants' names in
#: ``formerlab.cli``); 0 and 1 have no constant
EXIT_CODE_MEANINGS = {
    "EXIT_USAGE": (
        "a usage, config or file error, printed as one line `error: …` naming what is wrong "
        "and what to do (no traceback); click's own usage errors (an unknown option, a "
        "missing argument, a value out of range) exit with 2 too"),
    "EXIT_TRIALS_FAILED": (
        "`formerlab ablate` finished, but at least one trial failed (each error is printed "
        "and stored in the trial's `result.json`); rerun the failed ones with `--resume`"),
    "EXIT_INTERRUPTED": (
        "interrupted with Ctrl-C after saving: `train` prints the `formerlab train --resume "
        "RUN_DIR` that continues the run, `ablate` the `--resume` command of the sweep"),
}
OTHER_EXIT_CODES = {
    0: "done (`ablate`: every trial completed)",
    1: ("an unexpected error (a Python traceback is printed), or, in a multi-process "
        "`train --nproc N` / torchrun job, a failed rank (the message names the rank)"),
}
#: exit statuses of the worker processes of ``formerlab ablate`` (``formerlab.experiments.backends``)
WORKER_EXIT_MEANINGS = {
    "EXIT_ORPHANED": ("a sweep worker found its parent process (the `formerlab ablate` "
                      "that started it) gone, and exited"),
}


def exit_constants(module_name: str) -> dict[str, int]:
    """``EXIT_*`` integer constants of a module, or of every module of a package."""
    module = importlib.import_module(module_name)
    modules = [module]
    if hasattr(module, "__path__"):
        modules += [importlib.import_module(info.name)
                    for info in pkgutil.walk_packages(module.__path__, module_name + ".")]
    found: dict[str, int] = {}
    for mod in modules:
        for name, value in vars(mod).items():
            if re.fullmatch(r"EXIT_[A-Z0-9_]+", name) and isinstance(value, int):
                if found.get(name, value) != value:
                    raise GenerationError(f"{name} has two values in {module_name}")
                found[name] = value
    return found


def _exit_rows(constants: dict[str, int], meanings: dict[str, str], where: str) -> list[list[str]]:
    missing = sorted(set(constants) - set(meanings))
    stale = sorted(set(meanings) - set(constants))
    if missing or stale:
        raise GenerationError(
            f"exit codes of {where}: no description for {missing} (add it to "
            f"docs/_ext/formerlab_docs.py); described but not defined: {stale}")
    return [[code(value), code(name), meanings[name]]
            for name, value in sorted(constants.items(), key=lambda item: item[1])]


def exit_codes_markdown() -> str:
    cli = exit_constants("formerlab.cli")
    taken = set(cli.values()) & set(OTHER_EXIT_CODES)
    if taken:
        raise GenerationError(f"formerlab.cli redefines exit code(s) {sorted(taken)}")
    rows = [[code(c), "", text] for c, text in OTHER_EXIT_CODES.items()]
    rows += _exit_rows(cli, EXIT_CODE_MEANINGS, "formerlab.cli")
    rows.sort(key=lambda row: int(row[0].strip("`")))
    workers = _exit_rows(exit_constants("formerlab.experiments.backends"), WORKER_EXIT_MEANINGS,
                         "formerlab.experiments.backends")
    return ("## The `formerlab` command\n\n" + table(["code", "constant", "meaning"], rows)
            + "\n## Sweep workers\n\nWhat `formerlab ablate` reports when a worker process "
            "ends on its own (a worker killed by a signal is reported with the signal's "
            "name):\n\n" + table(["status", "constant", "meaning"], workers))


# -- config ----------------------------------------------------------------------------

#: what each config validator checks, keyed by (model class name, validator name); the
#: ``{...}`` fields are filled in from the registries when the docs are built
CONFIG_CHECKS: dict[tuple[str, str], str] = {
    ("StrictModel", "_no_bools_for_numbers"): "",  # every model: described in the page text
    ("RunConfig", "_tracking_shorthand"): "`tracking: none` / `tracking: mlflow` is short "
                                          "for `tracking: {{backend: …}}`",
    ("TaskConfig", "_known_name"): "a registered task: {tasks}",
    ("TaskConfig", "_known_options"): "`options` are checked against the task's options "
                                      "({{ref}}`tasks <registry-tasks>`)",
    ("HFConfig", "_known_kernel"): "a registered kernel: {kernels}",
    ("HFConfig", "_known_options"): "`kernel_options` are checked against the kernel's options",
    ("ModelConfig", "_known_mixer"): "a registered token mixer: {mixers}",
    ("ModelConfig", "_known_kernel"): "a registered kernel: {kernels}",
    ("ModelConfig", "_known_options"): (
        "`mixer_options` and `kernel_options` are checked against the mixer's and the "
        "kernel's options (one mixer is built to check them); `deq` keys and values are "
        "checked against the DEQ options below"),
    ("TrainConfig", "_device"): "a device of this machine: `cpu`, `cuda`, `cuda:N`, `mps`",
    ("TrainConfig", "_one_cycle_warmup"): "with `schedule: one_cycle`, "
                                          "`2 <= warmup < steps`",
}


def _type_name(annotation: Any) -> str:
    from pydantic import BaseModel

    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is type(None):
        return "None"
    if annotation is Any:
        return "any"
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation.__name__
    if origin is not None:
        inner = ", ".join(_type_name(a) for a in args)
        return f"{getattr(origin, '__name__', str(origin))}[{inner}]"
    return getattr(annotation, "__name__", str(annotation))


def _constraints(field: Any) -> list[str]:
    symbols = {"ge": "≥", "gt": ">", "le": "≤", "lt": "<", "multiple_of": "multiple of",
               "min_length": "length ≥", "max_length": "length ≤"}
    found = []
    for item in field.metadata:
        for attr, symbol in symbols.items():
            value = getattr(item, attr, None)
            if value is not None:
                found.append(f"{symbol} {value}")
    return found


def _default(field: Any) -> str:
    from pydantic import BaseModel
    from pydantic_core import PydanticUndefined

    if field.default_factory is not None:
        value = field.default_factory()
        return "(section defaults)" if isinstance(value, BaseModel) else code(repr(value))
    if field.default is PydanticUndefined:
        return "required"
    return code(repr(field.default))


def _section_model(annotation: Any) -> Any:
    from pydantic import BaseModel

    for candidate in (annotation, *typing.get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def config_sections() -> list[tuple[str, Any]]:
    """``(dotted prefix, model class)`` for RunConfig and every nested section."""
    from formerlab.train.config import RunConfig

    sections, todo = [], [("", RunConfig)]
    while todo:
        prefix, model = todo.pop(0)
        sections.append((prefix, model))
        for name, field in model.model_fields.items():
            sub = _section_model(field.annotation)
            if sub is not None:
                todo.append((f"{prefix}{name}.", sub))
    return sections


def config_keys() -> list[str]:
    """Every dotted key the config reference documents."""
    return [prefix + name for prefix, model in config_sections() for name in model.model_fields]


def _validator_notes(model: Any, fill: dict[str, str]) -> tuple[dict[str, list[str]], list[str]]:
    """Per field, and for the model as a whole, what its validators check."""
    per_field: dict[str, list[str]] = {}
    whole: list[str] = []
    decorators = model.__pydantic_decorators__
    owners = {cls.__name__ for cls in model.__mro__}
    for kind in ("field_validators", "model_validators"):
        for name, decorator in getattr(decorators, kind).items():
            owner = next((c.__name__ for c in model.__mro__ if name in vars(c)), model.__name__)
            key = (owner, name)
            if key not in CONFIG_CHECKS or owner not in owners:
                raise GenerationError(
                    f"config validator {owner}.{name} has no description: add it to "
                    "CONFIG_CHECKS in docs/_ext/formerlab_docs.py")
            text = CONFIG_CHECKS[key].format(**fill)
            if not text:
                continue
            fields = getattr(decorator.info, "fields", ())
            if kind == "field_validators" and fields != ("*",):
                for f in fields:
                    per_field.setdefault(f, []).append(text)
            else:
                whole.append(text)
    return per_field, whole


def _code_list(names: list[str]) -> str:
    return ", ".join(f"`{n}`" for n in names)


def deq_options_rows() -> list[list[str]]:
    from formerlab.deq import DEQ
    from formerlab.deq.norm import NORMS
    from formerlab.models.deq import deq_option_names

    params = inspect.signature(DEQ.__init__).parameters
    described = arg_docs(DEQ)
    rows = []
    for name in deq_option_names():
        if name == "norm":
            rows.append([code(name), code("'none'"), "one of " + _code_list(list(NORMS))])
            continue
        default = params[name].default
        shown = "required" if default is inspect.Parameter.empty else code(repr(default))
        rows.append([code(name), shown, doc_md(described.get(name, ""))
                     or f"`formerlab.deq.DEQ({name}=…)`"])
    return rows


def field_comments(model: Any) -> dict[str, str]:
    """The source comments of a model's fields: ``# ...`` lines directly above a field and
    a ``# ...`` after it on its line."""
    import io
    import tokenize

    try:
        source = inspect.cleandoc("\n" + inspect.getsource(model))
    except (OSError, TypeError):
        return {}
    comments: dict[int, str] = {}
    code_lines: set[int] = set()
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            comments[token.start[0]] = token.string.lstrip("#").strip()
        elif token.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT,
                                tokenize.DEDENT, tokenize.ENDMARKER):
            code_lines.add(token.start[0])
    found = {}
    for number, line in enumerate(source.splitlines(), start=1):
        field = re.match(r"\s+(\w+)\s*:", line)
        if not field or field.group(1) not in model.model_fields:
            continue
        above, k = [], number - 1
        while k in comments and k not in code_lines:
            above.insert(0, comments[k])
            k -= 1
        text = " ".join(above + ([comments[number]] if number in comments and
                                 number in code_lines else []))
        if text:
            found[field.group(1)] = text
    return found


def config_markdown() -> str:
    from formerlab import attention, data, mixers

    fill = {"tasks": _code_list(data.available()), "kernels": _code_list(attention.available()),
            "mixers": _code_list(mixers.available())}
    out = []
    for prefix, model in config_sections():
        title = f"`{prefix.rstrip('.')}`" if prefix else "top level"
        out.append(f"({slug('config', prefix.rstrip('.') or 'top')})=\n"
                   f"## {title} ({model.__name__})\n")
        doc = doc_paragraphs(own_doc(model))
        if doc:
            out.append(doc + "\n")
        comments = field_comments(model)
        per_field, whole = _validator_notes(model, fill)
        rows = []
        for name, field in model.model_fields.items():
            notes = _constraints(field)
            annotation = field.annotation
            literal = next((a for a in (annotation, *typing.get_args(annotation))
                            if typing.get_origin(a) is typing.Literal), None)
            if literal is not None:
                notes.append("one of " + _code_list([str(a) for a in typing.get_args(literal)]))
            notes += per_field.get(name, [])
            sub = _section_model(annotation)
            described = doc_md(" ".join(filter(None, [field.description, comments.get(name)])))
            if sub is not None:
                link = ref(prefix + name, slug("config", prefix + name))
                described = (described + " " if described else "") + f"see {link}"
            rows.append([code(prefix + name), code(_type_name(annotation)), _default(field),
                         "; ".join(notes), described])
        out.append(table(["key", "type", "default", "constraints", "description"], rows))
        if whole:
            out.append("Checked as a whole: " + "; ".join(whole) + ".\n")
        if prefix == "model.":
            out.append("(config-model-deq-options)=\n### `model.deq` options\n\n"
                       "`model.deq` is a mapping of these keys (any subset; the rest keep "
                       "their defaults):\n\n"
                       + table(["key", "default", "meaning"], deq_options_rows()))
    return "\n".join(out)


# -- registries ------------------------------------------------------------------------

REGISTRIES = {
    "kernels": ("formerlab.attention", "attention kernel"),
    "mixers": ("formerlab.mixers", "token mixer"),
    "solvers": ("formerlab.solvers", "solver"),
    "tasks": ("formerlab.data", "task"),
}


def registry_entries(kind: str) -> list[Any]:
    module = importlib.import_module(REGISTRIES[kind][0])
    return list(module.describe())


def entry_options(entry: Any) -> list[tuple[str, str]]:
    """``(option, shown default)`` for every keyword option of a registry entry."""
    params = inspect.signature(entry.factory).parameters
    shown = []
    for name in entry.options():
        default = params[name].default
        shown.append((name, "required" if default is inspect.Parameter.empty else repr(default)))
    return shown


def kernel_streams(name: str) -> bool:
    from formerlab import attention

    return bool(getattr(attention.build(name), "supports_streaming", False))


def mixer_streaming(entry: Any) -> str:
    """``yes`` / ``no`` / ``with kernels …``: whether the mixer built with defaults (or with
    each causal kernel, for mixers that take one) has ``init_state`` / ``step``."""
    from formerlab import attention, mixers

    def streams(**options: Any) -> bool | None:
        try:
            return bool(mixers.build(entry.name, dim=16, heads=2, **options).supports_streaming)
        except (ValueError, TypeError):
            return None

    if "kernel" not in entry.options():
        return "yes" if streams() else "no"
    with_kernels = [k for k in attention.available(causal=True) if streams(kernel=k)]
    return ("with kernel " + ", ".join(with_kernels)) if with_kernels else "no"


def _api_link(entry: Any, module_name: str) -> str:
    module = importlib.import_module(module_name)
    name = getattr(entry.factory, "__name__", "")
    if name in getattr(module, "__all__", ()) and getattr(module, name) is entry.factory:
        role = "py:class" if inspect.isclass(entry.factory) else "py:func"
        return f"{{{role}}}`{module_name}.{name}`"
    return ""


def registry_markdown(kind: str) -> str:
    module_name, what = REGISTRIES[kind]
    entries = registry_entries(kind)
    header = ["name", "description"]
    if kind in ("kernels", "mixers"):
        header[1:1] = ["causal", "streaming", "complexity"]
    if kind == "solvers":
        header[1:1] = ["problems", "cost"]
    rows = []
    for entry in entries:
        link = ref(entry.name, slug("registry", kind, entry.name))
        if kind == "kernels":
            cells = ["yes" if entry.causal else "no",
                     "yes" if kernel_streams(entry.name) else "no", md(entry.complexity)]
        elif kind == "mixers":
            cells = ["yes" if entry.causal else "no", md(mixer_streaming(entry)),
                     md(entry.complexity)]
        elif kind == "solvers":
            cells = ["root or fixed point" if entry.extra.get("root") else "fixed point only",
                     md(entry.complexity)]
        else:
            cells = []
        rows.append([link, *cells, md(entry.description)])
    out = [table(header, rows)]
    for entry in entries:
        out.append(f"({slug('registry', kind, entry.name)})=\n### `{entry.name}`\n")
        doc = doc_paragraphs(own_doc(entry.factory)) or doc_md(entry.description)
        lines = [doc] if doc else []
        api = _api_link(entry, module_name)
        if api:
            lines.append(f"API: {api}.")
        if kind == "mixers":
            if entry.accepts_any_option() and "kernel" in entry.options():
                lines.append("Also takes the options of its kernel (`kernel=`; see "
                             "{ref}`kernels <registry-kernels>`), passed through flat.")
            ignores = entry.extra.get("ignores", ())
            if ignores:
                lines.append("Ignores " + _code_list(list(ignores))
                             + " (models pass them to every mixer).")
        for key, value in sorted(entry.extra.items()):
            if key not in ("ignores", "root"):
                lines.append(f"{md(key)}: {code(repr(value))}")
        out.append("\n\n".join(lines) + "\n")
        options = entry_options(entry)
        described = arg_docs(entry.factory)
        if options:
            rows = [[code(o), code(d) if d != "required" else "required",
                     doc_md(described.get(o, ""))] for o, d in options]
            if not any(row[2] for row in rows):
                rows = [row[:2] for row in rows]
            out.append(table(["option", "default", "description"][:len(rows[0])], rows))
        else:
            out.append(f"No options{' of its own' if entry.accepts_any_option() else ''}.\n")
    return "\n".join(out)


def registries_markdown() -> str:
    titles = {"kernels": "Attention kernels", "mixers": "Token mixers", "solvers": "Solvers",
              "tasks": "Tasks"}
    intro = {
        "kernels": "`formerlab.attention.build(name, **options)`; in a config "
                   "`model.kernel` and `model.kernel_options`.",
        "mixers": "`formerlab.mixers.build(name, dim=..., heads=..., **options)`; in a "
                  "config `model.mixer` and `model.mixer_options`.",
        "solvers": "`formerlab.solvers.build(name, **options)`; in a config "
                   "`model.deq.solver` and `model.deq.solver_options`.",
        "tasks": "`formerlab.data.build(name, **options)`; in a config `task.name` and "
                 "`task.options`.",
    }
    return "\n".join(f"({slug('registry', kind)})=\n## {titles[kind]}\n\n{intro[kind]}\n\n{registry_markdown(kind)}"
                     for kind in REGISTRIES)


# -- docstrings ------------------------------------------------------------------------

_LITERAL = re.compile(r"(``.*?``|`[^`]*`)")


def escape_bars(line: str) -> str:
    """Escape ``|`` outside inline literals / roles (``|x|`` is an absolute value in these
    docstrings, never a substitution); table rows (a leading ``|`` or ``+``) stay as they are."""
    if "|" not in line or line.lstrip().startswith(("|", "+")):
        return line
    parts = _LITERAL.split(line)
    return "".join(p if i % 2 else re.sub(r"(?<!\\)\|", r"\\|", p) for i, p in enumerate(parts))


def _process_docstring(app: Any, what: str, name: str, obj: Any, options: Any,
                       lines: list[str]) -> None:
    lines[:] = [escape_bars(line) for line in lines]


# -- Sphinx wiring ---------------------------------------------------------------------

GENERATORS: dict[str, Callable[[], str]] = {
    "cli.md": cli_markdown,
    "config.md": config_markdown,
    "registries.md": registries_markdown,
    "exit-codes.md": exit_codes_markdown,
}


def write_generated(folder: Path = GENERATED) -> list[Path]:
    """Write every generated fragment into ``folder``; files are only rewritten when their
    text changes (so an unchanged reference does not trigger a rebuild)."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, generate in GENERATORS.items():
        path = folder / name
        text = ("<!-- generated by docs/_ext/formerlab_docs.py at build time; do not edit -->\n\n"
                + generate())
        if not path.is_file() or path.read_text(encoding="utf-8") != text:
            path.write_text(text, encoding="utf-8")
        written.append(path)
    return written


def _builder_inited(app: Any) -> None:
    from sphinx.errors import ExtensionError

    try:
        write_generated(Path(app.srcdir) / "reference" / "_generated")
    except GenerationError as error:
        raise ExtensionError(str(error)) from error


def setup(app: Any) -> dict[str, Any]:
    app.connect("builder-inited", _builder_inited)
    app.connect("autodoc-process-docstring", _process_docstring)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
