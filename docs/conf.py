"""Sphinx configuration of recon's documentation site.

Build it (warnings are errors, as in CI)::

    python -m sphinx -W -b html docs /tmp/site
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import recon

project = "recon"
author = "the recon authors"
copyright = "2026, the recon authors"
version = release = recon.__version__

extensions = [
    "myst_parser",
    "numpydoc",
    "sphinx.ext.autodoc",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]

# Markdown: $...$ math, ::: fences, `(label)=` targets, and anchors for ## / ### headings.
myst_enable_extensions = ["colon_fence", "dollarmath", "deflist"]
myst_heading_anchors = 4
# The result pages are written by scripts (docs/*.md, docs/*/...): their tables start at
# ### under the page title, which MyST would report as a skipped level.
suppress_warnings = ["myst.header"]

# API reference: numpydoc renders the docstrings; members in source order.
autodoc_member_order = "bysource"
autodoc_typehints = "none"  # the numpydoc Parameters sections give the types
autodoc_default_options = {"members": True, "show-inheritance": False}
numpydoc_show_class_members = False
numpydoc_class_members_toctree = False
numpydoc_xref_param_type = False

html_theme = "alabaster"
html_title = f"recon {release}"
html_theme_options = {"description": "Reconstruction-based channel pruning for CNNs"}
