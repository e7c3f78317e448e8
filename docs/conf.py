"""Sphinx configuration for torpor's documentation (``make docs``).

Pages are Markdown (MyST) or reStructuredText; the hook reference is generated
from :mod:`torpor.hookspecs` by autodoc.  The build runs with ``-W``: a warning
is an error.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Import torpor from the tree even where it is not installed (it is, in .venv).
for sub in ("core", "plugins/pv", "plugins/pvhvm", "plugins/hvm", "examples/torpor-pvh/src"):
    sys.path.insert(0, str(ROOT / sub))

project = "torpor"
author = "torpor developers"
copyright = "torpor developers"
release = version = importlib.import_module("torpor").__version__

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build"]

myst_heading_anchors = 3
myst_enable_extensions = ["deflist"]

autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_preserve_defaults = True

html_theme = "alabaster"
html_title = "torpor"
html_static_path: list[str] = []
html_theme_options = {
    "description": "Suspend and resume Xen guest domains from dom0",
    "fixed_sidebar": True,
    "page_width": "1100px",
}
