"""Every ```python block of README.md runs, and prints what the README shows, so the
documentation cannot rot.

How blocks are found and run:

* A block is a fence that opens with a line ```python and closes with a line ```. Its test
  id is ``README.md:L<n>``, n the line number of the opening fence.
* Each block runs on its own (``exec``) in a fresh namespace, in this process (imports are
  cached, so a block costs what its code costs), and must define its own tiny inputs.
* Working directory: a temporary mirror of the repository root, so nothing a block writes
  (``runs/``, MLflow stores, checkpoints) can land in the repository. The mirror holds a
  copy of ``MIRRORED`` (the paths that README blocks read, e.g. ``configs/``);
  ``FORMERLAB_DATA`` is set to the absolute data directory when it is not set already,
  because the default data places are relative to the working directory.
* A block whose fence is directly preceded by the line
  ``<!-- readme: no-run (reason) -->`` is reported as skipped with that reason; a marker
  anywhere else, or without a reason, fails ``test_no_run_markers_are_well_formed``.
* Torch's RNG state, default dtype and thread count are restored after each block.

What a block prints (the output convention):

* A ```text fence that follows a ```python block's closing fence with nothing but blank
  lines between is that block's **shown output**: what the block writes to stdout must
  match it, line for line (trailing spaces and trailing blank lines aside). A block that
  prints something must show it (``test_printing_blocks_show_their_output``); a block
  whose output cannot be shown (it depends on the machine) prints nothing, or is no-run.
* Numbers: a number shown with a decimal point or an exponent matches a printed number
  within ``FLOAT_RTOL`` relative (or ``FLOAT_ATOL`` absolute) — the last digits of a
  float may differ between machines and thread counts; integers and all other text match
  exactly. ``...`` in a shown line matches any text within that line (a temporary path).
* ``markdown_examples(path)`` / ``run_example(example)`` / ``output_mismatch(shown,
  printed)`` work on any markdown file; ``DOCUMENTS`` is the README plus every page under
  ``docs/``, so the docs site's examples are checked the same way.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
# markdown files whose ```python blocks run: the README and every page of the docs site
# (found when the tests are collected, so a new page is covered without an edit here;
# the build output and the generated reference fragments are not pages of their own)
DOCS_PAGES = sorted(
    page for page in (ROOT / "docs").rglob("*.md")
    if not {"_build", "_generated"} & set(page.relative_to(ROOT / "docs").parts)
)
DOCUMENTS = (README, *DOCS_PAGES)
MIRRORED = ("configs",)
NO_RUN = re.compile(r"^<!-- readme: no-run \((?P<reason>[^)]+)\) -->$")
MARKER = re.compile(r"^\s*<!--\s*readme:")  # a marker line, not a mention in prose
FLOAT_RTOL, FLOAT_ATOL = 1e-3, 1e-6
NUMBER = re.compile(r"[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?")


@dataclass(frozen=True)
class Block:
    line: int  # 1-based line number of the opening fence
    code: str
    skip_reason: str | None
    output: str | None = None  # the shown output (the ```text fence after it), if any
    output_line: int | None = None  # 1-based line of that fence
    path: str = "README.md"

    @property
    def id(self) -> str:
        return f"{self.path}:L{self.line}"


def _fence_end(lines: list[str], start: int, where: str) -> int:
    """Index of the closing ``` of the fence opened at ``start``."""
    i = start + 1
    while i < len(lines) and lines[i].strip() != "```":
        i += 1
    if i == len(lines):
        raise ValueError(f"{where}:{start + 1}: unclosed {lines[start].strip()} fence")
    return i


def python_blocks(text: str, path: str = "README.md") -> list[Block]:
    """The ```python blocks of ``text`` with their fence line, no-run reason and shown output."""
    lines = text.splitlines()
    blocks, i = [], 0
    while i < len(lines):
        if lines[i].strip() == "```python":
            start = i
            i = _fence_end(lines, start, path)
            above = NO_RUN.match(lines[start - 1].strip()) if start else None
            reason = above.group("reason") if above else None
            code = "\n".join(lines[start + 1 : i]) + "\n"
            j = i + 1
            while j < len(lines) and not lines[j].strip():
                j += 1
            output = output_line = None
            if j < len(lines) and lines[j].strip() == "```text":
                end = _fence_end(lines, j, path)
                output, output_line = "\n".join(lines[j + 1 : end]) + "\n", j + 1
                i = end
            blocks.append(Block(start + 1, code, reason, output, output_line, path))
        i += 1
    return blocks


def markdown_examples(path: Path) -> list[Block]:
    """The ```python blocks of the markdown file ``path`` (ids relative to the repository)."""
    name = str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)
    return python_blocks(path.read_text(encoding="utf-8"), name)


def run_example(block: Block, filename: str | None = None) -> str:
    """Run ``block`` in a fresh namespace; returns what it printed."""
    # pad with blank lines so tracebacks point at the markdown file's own line numbers
    code = compile("\n" * block.line + block.code, filename or block.path, "exec")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(code, {"__name__": f"readme_block_L{block.line}"})  # noqa: S102 - the docs' own code
    return printed.getvalue()


def _normalise(text: str) -> list[str]:
    lines = [line.rstrip() for line in text.splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    return lines


def _line_pattern(shown: str) -> tuple[re.Pattern, list[str]]:
    """A regex for a shown line: numbers become capture groups, ``...`` any text."""
    parts, numbers, pos = [], [], 0
    for match in re.finditer(r"\.\.\.|" + NUMBER.pattern, shown):
        parts.append(re.escape(shown[pos : match.start()]))
        if match.group() == "...":
            parts.append(".*?")
        else:
            parts.append(f"({NUMBER.pattern})")
            numbers.append(match.group())
        pos = match.end()
    parts.append(re.escape(shown[pos:]))
    return re.compile("".join(parts) + r"\Z"), numbers


def _numbers_agree(shown: str, printed: str) -> bool:
    if not any(c in shown for c in ".eE"):  # an integer: exactly
        return shown == printed
    a, b = float(shown), float(printed)
    return math.isclose(a, b, rel_tol=FLOAT_RTOL, abs_tol=FLOAT_ATOL)


def output_mismatch(shown: str, printed: str) -> str | None:
    """None if ``printed`` matches the ``shown`` output (the convention above), else why not."""
    want, got = _normalise(shown), _normalise(printed)
    if len(want) != len(got):
        return (f"printed {len(got)} lines, the docs show {len(want)}:\n--- shown\n"
                + "\n".join(want) + "\n--- printed\n" + "\n".join(got))
    for number, (w, g) in enumerate(zip(want, got), start=1):
        pattern, numbers = _line_pattern(w)
        match = pattern.match(g)
        if match is None or not all(_numbers_agree(s, p) for s, p in zip(numbers, match.groups())):
            return f"output line {number} differs:\n  shown:   {w}\n  printed: {g}"
    return None


BLOCKS = markdown_examples(README)
EXAMPLES = [block for document in DOCUMENTS for block in markdown_examples(document)]


def data_dir() -> str | None:
    """The data directory the default search would find from the repository root."""
    for candidate in (ROOT / "data", ROOT.parent / "shared" / "data"):
        if candidate.is_dir():
            return str(candidate)
    return None


@pytest.fixture
def mirror(tmp_path, monkeypatch):
    """A temporary stand-in for the repository root as working directory."""
    for name in MIRRORED:
        shutil.copytree(ROOT / name, tmp_path / name)
    if not os.environ.get("FORMERLAB_DATA") and data_dir():
        monkeypatch.setenv("FORMERLAB_DATA", data_dir())
    monkeypatch.chdir(tmp_path)
    rng, dtype, threads = torch.get_rng_state(), torch.get_default_dtype(), torch.get_num_threads()
    yield tmp_path
    torch.set_rng_state(rng)
    torch.set_default_dtype(dtype)
    torch.set_num_threads(threads)


def test_readme_has_python_blocks():
    assert len(BLOCKS) >= 5, "the README's Python examples were not found"


@pytest.mark.parametrize("block", EXAMPLES, ids=[b.id for b in EXAMPLES])
def test_python_block_runs_and_prints_what_it_shows(block, mirror):
    if block.skip_reason is not None:
        pytest.skip(f"{block.id}: no-run ({block.skip_reason})")
    before = sorted(p.name for p in ROOT.iterdir())
    printed = run_example(block, str(ROOT / block.path))
    assert sorted(p.name for p in ROOT.iterdir()) == before, "a docs block wrote into the repo"
    if block.output is None:
        assert not printed.strip(), (
            f"{block.id} prints but shows no output: add a ```text block after it with\n{printed}")
        return
    mismatch = output_mismatch(block.output, printed)
    assert mismatch is None, f"{block.path}:{block.output_line}: {mismatch}"


@pytest.mark.parametrize("document", DOCUMENTS, ids=[str(d.relative_to(ROOT)) for d in DOCUMENTS])
def test_no_run_markers_are_well_formed(document):
    """A marker must sit directly above a ```python fence and give a reason."""
    lines = document.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines, start=1):
        if not MARKER.search(line):
            continue
        assert NO_RUN.match(line.strip()), f"{document.name}:{number}: malformed marker {line!r}"
        follows = lines[number].strip() if number < len(lines) else ""
        assert follows == "```python", f"{document.name}:{number}: marker not directly above ```python"


def test_block_parser_on_a_known_text():
    text = ("a\n```python\nx = 1\n```\n<!-- readme: no-run (needs a GPU) -->\n```python\ny\n```\n"
            "\n```python\nprint(2)\n```\n\n```text\n2\n```\n```text\nnot an output\n```\n")
    got = python_blocks(text)
    assert [(b.line, b.code, b.skip_reason, b.output, b.output_line) for b in got] == [
        (2, "x = 1\n", None, None, None),
        (6, "y\n", "needs a GPU", None, None),
        (10, "print(2)\n", None, "2\n", 14),
    ]


def test_output_comparison_rules():
    assert output_mismatch("torch.Size([1, 104]) True\n", "torch.Size([1, 104]) True  \n\n") is None
    assert "line 1 differs" in output_mismatch("torch.Size([1, 104]) True", "torch.Size([1, 104]) False")
    assert output_mismatch("loss 4.1742", "loss 4.17425") is None  # floats: FLOAT_RTOL
    assert output_mismatch("loss 4.1742", "loss 4.2") is not None
    assert output_mismatch("9 tokens", "10 tokens") is not None  # integers: exactly
    assert output_mismatch("[3, 1]", "[3, 1.0]") is not None
    assert output_mismatch("run in ...", "run in /tmp/x/runs/1") is None
    assert output_mismatch("a\nb", "a") is not None
    assert output_mismatch("1e-05", "1.00001e-05") is None


def test_printed_output_is_compared_with_the_shown_output():
    """A shown ``True`` that the code prints as ``False`` fails (the check has teeth)."""
    block = python_blocks("```python\nprint(1 == 2)\n```\n```text\nTrue\n```\n")[0]
    assert output_mismatch(block.output, run_example(block)) is not None
