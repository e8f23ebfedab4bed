"""Every ```python block of README.md runs, so the documentation cannot rot.

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
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
MIRRORED = ("configs",)
NO_RUN = re.compile(r"^<!-- readme: no-run \((?P<reason>[^)]+)\) -->$")
MARKER = re.compile(r"^\s*<!--\s*readme:")  # a marker line, not a mention in prose


@dataclass(frozen=True)
class Block:
    line: int  # 1-based line number of the opening fence
    code: str
    skip_reason: str | None


def python_blocks(text: str) -> list[Block]:
    """The ```python blocks of ``text`` with their fence line and no-run reason."""
    lines = text.splitlines()
    blocks, i = [], 0
    while i < len(lines):
        if lines[i].strip() == "```python":
            start = i
            i += 1
            while i < len(lines) and lines[i].strip() != "```":
                i += 1
            if i == len(lines):
                raise ValueError(f"README.md:{start + 1}: unclosed ```python fence")
            above = NO_RUN.match(lines[start - 1].strip()) if start else None
            reason = above.group("reason") if above else None
            blocks.append(Block(start + 1, "\n".join(lines[start + 1 : i]) + "\n", reason))
        i += 1
    return blocks


BLOCKS = python_blocks(README.read_text(encoding="utf-8"))


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


@pytest.mark.parametrize("block", BLOCKS, ids=[f"README.md:L{b.line}" for b in BLOCKS])
def test_python_block_runs(block, mirror):
    if block.skip_reason is not None:
        pytest.skip(f"README.md:{block.line}: no-run ({block.skip_reason})")
    before = sorted(p.name for p in ROOT.iterdir())
    # pad with blank lines so tracebacks point at the README's own line numbers
    code = compile("\n" * block.line + block.code, str(README), "exec")
    exec(code, {"__name__": f"readme_block_L{block.line}"})  # noqa: S102 - the README's own code
    assert sorted(p.name for p in ROOT.iterdir()) == before, "a README block wrote into the repo"


def test_no_run_markers_are_well_formed():
    """A marker must sit directly above a ```python fence and give a reason."""
    lines = README.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines, start=1):
        if not MARKER.search(line):
            continue
        assert NO_RUN.match(line.strip()), f"README.md:{number}: malformed marker {line!r}"
        follows = lines[number].strip() if number < len(lines) else ""
        assert follows == "```python", f"README.md:{number}: marker not directly above ```python"


def test_block_parser_on_a_known_text():
    text = "a\n```python\nx = 1\n```\n<!-- readme: no-run (needs a GPU) -->\n```python\ny\n```\n"
    got = python_blocks(text)
    assert [(b.line, b.code, b.skip_reason) for b in got] == [
        (2, "x = 1\n", None),
        (6, "y\n", "needs a GPU"),
    ]
