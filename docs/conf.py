"""Sphinx configuration of the formerlab documentation (MyST Markdown, offline).

Build with ``make docs`` (HTML, warnings are errors). Nothing here reaches the network:
no intersphinx, no remote images; the references under ``reference/`` are generated at
build time from the code by the ``formerlab_docs`` extension in ``docs/_ext``.
"""

from __future__ import annotations

import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
sys.path.insert(0, str(DOCS / "_ext"))
sys.path.insert(0, str(DOCS.parent / "src"))  # the checkout's code, installed or not

project = "formerlab"
author = "the formerlab authors"
copyright = "2026, the formerlab authors"  # noqa: A001 - Sphinx's name

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "formerlab_docs",
]

source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "reference/_generated", "Thumbs.db", ".DS_Store"]
templates_path: list[str] = []

# -- MyST ------------------------------------------------------------------------------
myst_enable_extensions = ["colon_fence", "deflist", "fieldlist"]
myst_heading_anchors = 3  # [text](page.md#a-heading) links resolve (and are checked)

# -- autodoc / napoleon ----------------------------------------------------------------
# Members come from each package's ``__all__`` (the public API); signatures keep the
# annotations as written in the code.
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_typehints_format = "short"
autodoc_preserve_defaults = False
autodoc_class_signature = "mixed"
# an undocumented override (forward of an nn.Module or autograd.Function) shows no
# docstring rather than torch's, whose cross-references point into torch's own docs
autodoc_inherit_docstrings = False
napoleon_google_docstring = True
napoleon_numpy_docstring = True
napoleon_use_rtype = False

# -- HTML ------------------------------------------------------------------------------
html_theme = "furo"
html_title = "formerlab"
html_static_path: list[str] = []
html_last_updated_fmt = None
