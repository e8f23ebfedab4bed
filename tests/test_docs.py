"""The documentation site (docs/): its generated references say what the code does.

``make docs`` (run by ``make test``, so by CI) builds the whole site with Sphinx, warnings
as errors; these tests check the generated reference pages against ground truth taken
from the code by other routes than the generators take, without a Sphinx build:

* CLI: every command the Typer app registers, and every option its ``--help`` prints;
* config: every key of ``RunConfig`` and its sections, with its default and bounds;
* registries: every kernel, mixer, solver and task, with every option and its default;
* exit codes: every ``EXIT_*`` constant of the CLI's source, and nothing undescribed;
* API: a page for every public package.

The ```python blocks of every docs page run in ``tests/test_readme.py`` (``DOCUMENTS``).
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
sys.path.insert(0, str(DOCS / "_ext"))

import formerlab_docs as gen  # noqa: E402 - docs/_ext is not a package

SECTIONS = ["getting-started/index", "tutorials/index", "how-to/index", "reference/index",
            "explanation/index", "results/index", "status", "changelog"]


def section(markdown: str, heading: str) -> str:
    """The text under the heading line ``heading`` up to the next heading of that level."""
    level = heading.split(" ")[0]
    lines = markdown.splitlines()
    start = lines.index(heading)
    end = next((i for i in range(start + 1, len(lines))
                if re.match(rf"#{{1,{len(level)}}} ", lines[i])), len(lines))
    return "\n".join(lines[start:end])


def table_row(markdown: str, first_cell: str) -> str:
    rows = [line for line in markdown.splitlines() if line.startswith(f"| {first_cell} |")]
    assert len(rows) == 1, f"expected one table row for {first_cell}, found {len(rows)}"
    return rows[0]


# -- CLI -------------------------------------------------------------------------------


def typer_command_paths(app, prefix=("formerlab",)):
    """Every command path, from the Typer objects' registrations (not the click tree)."""
    paths = [list(prefix)]
    for command in app.registered_commands:
        if command.hidden:
            continue
        name = command.name or command.callback.__name__.replace("_", "-")
        paths.append([*prefix, name])
    for group in app.registered_groups:
        paths += typer_command_paths(group.typer_instance, (*prefix, group.name))
    return paths


@pytest.fixture(scope="module")
def cli_page():
    return gen.cli_markdown()


def test_cli_reference_has_every_command(cli_page):
    from formerlab.cli import app

    paths = typer_command_paths(app)
    assert len(paths) > 20
    headings = re.findall(r"^## `(formerlab[^`]*)`$", cli_page, flags=re.M)
    assert sorted(headings) == sorted(" ".join(p) for p in paths)


def test_cli_reference_has_every_option_of_every_command(cli_page):
    from typer.testing import CliRunner

    from formerlab.cli import app

    runner = CliRunner()
    for path in typer_command_paths(app):
        result = runner.invoke(app, [*path[1:], "--help"], env={"COLUMNS": "200"})
        assert result.exit_code == 0, result.output
        options = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", result.output)) - {"--help"}
        body = section(cli_page, f"## `{' '.join(path)}`")
        documented = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", body))
        missing = options - documented
        assert not missing, f"{' '.join(path)}: options missing from the CLI reference: {missing}"


def test_cli_reference_shows_defaults_types_and_help(cli_page):
    train = section(cli_page, "## `formerlab train`")
    assert "Train a model from a config" in train
    row = table_row(train, "`--nproc`")
    assert "integer (≥ 1)" in row and "| `1` |" in row and "Data-parallel processes" in row
    assert "text, repeatable" in table_row(train, "`--set`")
    assert "`--progress`" in table_row(train, "`--progress / --no-progress`")
    assert "required" in table_row(section(cli_page, "## `formerlab ablate`"), "`SWEEP`")


# -- config ----------------------------------------------------------------------------


def model_fields(model, prefix=""):
    """(dotted key, field) of a pydantic model and its nested sections."""
    from pydantic import BaseModel

    for name, field in model.model_fields.items():
        yield prefix + name, field
        for candidate in (field.annotation, *getattr(field.annotation, "__args__", ())):
            if isinstance(candidate, type) and issubclass(candidate, BaseModel):
                yield from model_fields(candidate, f"{prefix}{name}.")


def test_config_reference_has_every_key_with_default_and_bounds():
    from pydantic_core import PydanticUndefined

    from formerlab.train.config import RunConfig

    page = gen.config_markdown()
    fields = list(model_fields(RunConfig))
    assert len(fields) > 40
    for key, field in fields:
        row = table_row(page, f"`{key}`")
        if field.default is not PydanticUndefined and field.default_factory is None:
            assert f"`{field.default!r}`" in row, (key, row)
        for item in field.metadata:
            for attr, symbol in (("ge", "≥"), ("gt", ">"), ("le", "≤"), ("lt", "<")):
                if getattr(item, attr, None) is not None:
                    assert f"{symbol} {getattr(item, attr)}" in row, (key, row)
    from formerlab import attention

    assert all(f"`{name}`" in table_row(page, "`model.kernel`") for name in attention.available())


def test_config_reference_lists_the_deq_options():
    from formerlab.models.deq import deq_option_names

    page = section(gen.config_markdown(), "### `model.deq` options")
    for name in deq_option_names():
        table_row(page, f"`{name}`")


def test_an_undescribed_config_validator_fails_the_build(monkeypatch):
    checks = dict(gen.CONFIG_CHECKS)
    del checks[("TrainConfig", "_device")]
    monkeypatch.setattr(gen, "CONFIG_CHECKS", checks)
    with pytest.raises(gen.GenerationError, match="TrainConfig._device"):
        gen.config_markdown()


# -- registries ------------------------------------------------------------------------


@pytest.mark.parametrize("kind, package", [("kernels", "attention"), ("mixers", "mixers"),
                                           ("solvers", "solvers"), ("tasks", "data")])
def test_registry_reference_has_every_entry_and_option(kind, package):
    module = importlib.import_module(f"formerlab.{package}")
    page = gen.registry_markdown(kind)
    names = module.available()
    assert names
    for name in names:
        entry = module.describe()[[e.name for e in module.describe()].index(name)]
        body = section(page, f"### `{name}`")
        params = inspect.signature(entry.factory).parameters
        for option in entry.options():
            default = params[option].default
            shown = "required" if default is inspect.Parameter.empty else f"`{default!r}`"
            row = table_row(body, f"`{option}`")
            assert f"| {shown} |" in row, (name, option, row)
        summary = table_row(page, f"{{ref}}`{name} <{gen.slug('registry', kind, name)}>`")
        if kind in ("kernels", "mixers"):
            assert summary.split(" | ")[1] == ("yes" if entry.causal else "no"), summary


def test_kernel_streaming_column_matches_the_kernels():
    from formerlab import attention

    page = gen.registry_markdown("kernels")
    for name in attention.available():
        row = table_row(page, f"{{ref}}`{name} <{gen.slug('registry', 'kernels', name)}>`")
        kernel = attention.build(name)
        streams = type(kernel).init_state is not attention.AttentionKernel.init_state
        assert row.split(" | ")[2] == ("yes" if streams else "no"), row


# -- exit codes ------------------------------------------------------------------------


def cli_source_files():
    cli = importlib.import_module("formerlab.cli")
    if hasattr(cli, "__path__"):
        return sorted(Path(cli.__path__[0]).rglob("*.py"))
    return [Path(cli.__file__)]


def test_exit_codes_page_has_every_exit_constant():
    cli = importlib.import_module("formerlab.cli")
    names = set()
    for path in cli_source_files():
        names |= set(re.findall(r"\bEXIT_[A-Z0-9_]+\b", path.read_text()))
    assert {"EXIT_USAGE", "EXIT_TRIALS_FAILED", "EXIT_INTERRUPTED"} <= names
    page = gen.exit_codes_markdown()
    for name in names:
        value = getattr(cli, name, None)
        if value is None:  # defined in a sub-module of a cli package
            value = gen.exit_constants("formerlab.cli")[name]
        assert re.search(rf"^\| `{value}` \| `{name}` \| \S", page, flags=re.M), name
    for code in (0, 1):
        assert re.search(rf"^\| `{code}` \|", page, flags=re.M)


def test_an_undescribed_exit_code_fails_the_build(monkeypatch):
    cli = importlib.import_module("formerlab.cli")
    monkeypatch.setattr(cli, "EXIT_SOMETHING_NEW", 9, raising=False)
    with pytest.raises(gen.GenerationError, match="EXIT_SOMETHING_NEW"):
        gen.exit_codes_markdown()


# -- API pages, site structure, build wiring -------------------------------------------


def public_packages():
    import formerlab

    found = {"formerlab.testing", "formerlab.integrations.hf"}
    for info in pkgutil.iter_modules(formerlab.__path__, "formerlab."):
        if info.ispkg and hasattr(importlib.import_module(info.name), "__all__"):
            found.add(info.name)
    return sorted(found)


def test_every_public_package_has_an_api_page():
    pages = {}
    for page in (DOCS / "reference" / "api").glob("*.md"):
        for module in re.findall(r"^\.\. automodule:: (\S+)$", page.read_text(), flags=re.M):
            pages[module] = page.stem
    missing = [p for p in public_packages() if p not in pages]
    assert not missing, f"no API page for {missing}"
    toctree = (DOCS / "reference" / "api" / "index.md").read_text()
    for stem in set(pages.values()):
        assert re.search(rf"^{re.escape(stem)}$", toctree, flags=re.M), stem


def test_landing_page_toctree_lists_the_sections():
    text = (DOCS / "index.md").read_text()
    toctree = re.search(r"```\{toctree\}\n(.*?)```", text, flags=re.S).group(1)
    entries = [line.strip() for line in toctree.splitlines()
               if line.strip() and not line.strip().startswith(":")]
    assert entries == SECTIONS


def test_docs_build_is_offline_and_strict():
    conf: dict = {"__file__": str(DOCS / "conf.py")}
    exec(compile((DOCS / "conf.py").read_text(), str(DOCS / "conf.py"), "exec"), conf)  # noqa: S102
    assert "sphinx.ext.intersphinx" not in conf["extensions"]
    assert not conf.get("intersphinx_mapping")
    dry_run = subprocess.run(["make", "-n", "test"], cwd=ROOT, capture_output=True, text=True,
                             env={"PATH": "/usr/bin:/bin", "VENV": ".venv"}, check=True).stdout
    build = [line for line in dry_run.splitlines() if "sphinx-build" in line]
    assert build and " -W " in build[0] and " docs " in build[0], dry_run


def test_docstring_bars_are_escaped_outside_literals():
    assert gen.escape_bars("max |a - b| over t") == r"max \|a - b\| over t"
    assert gen.escape_bars("``|x|`` and :math:`|y|`") == "``|x|`` and :math:`|y|`"
    assert gen.escape_bars("| a | b |") == "| a | b |"  # a table row


def test_generated_fragments_are_written_and_stable(tmp_path):
    first = {p.name: p.read_text() for p in gen.write_generated(tmp_path)}
    assert set(first) == set(gen.GENERATORS)
    stamps = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    gen.write_generated(tmp_path)
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == stamps
