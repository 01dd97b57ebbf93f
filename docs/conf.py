"""Sphinx configuration of the documentation site (``make docs``).

The source directory is the repository root, so the README, ``docs/`` and the framework READMEs
next to their scripts are the site's pages as they are, and their relative links work both on a
code host and in the site. The API pages are generated from the docstrings by autodoc; the tables
of options, optimizers and refusals by ``docs/_ext/zsharp_docs.py`` from the code that defines
them. Built with ``-W --keep-going -n``: every warning (a broken cross-reference, a public object
without a docstring) fails the build.
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The checkout's package, not an installed copy; and the local extension.
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "docs" / "_ext"))

import zsharp_algos  # noqa: E402

project = "zsharp-algos"
author = "the zsharp-algos authors"
copyright = "the zsharp-algos authors, Apache-2.0"
release = version = zsharp_algos.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "myst_parser",
    "zsharp_docs",
]

root_doc = "docs/index"
# Only these are pages; everything else under the root (the package, tests, environments) is not
# even walked into.
include_patterns = ["README.md", "docs/**.md", "docs/**.rst", "integrations/*/README.md"]
exclude_patterns = ["docs/_build", ".venv*", ".git", "results", "build", "dist", "zsharp_algos", "tests",
                    "benchmarks", "yamls", "**/__pycache__"]
source_suffix = {".md": "markdown", ".rst": "restructuredtext"}

# MyST: GitHub-style heading anchors, so links like performance.md#the-demo resolve here as on a
# code host; ::: fences for directives (a code host shows them as plain text, not as code).
myst_heading_anchors = 4
myst_enable_extensions = ["colon_fence"]
suppress_warnings = []

# autodoc + napoleon: Google-style docstrings with reST roles.
# Each page says :members: itself (a default "members" would override a page's list). A public
# member without a docstring is a warning (docs/_ext/zsharp_docs.py).
autodoc_default_options = {"show-inheritance": True, "member-order": "bysource"}
autodoc_typehints = "description"
autodoc_typehints_format = "short"
autodoc_class_signature = "mixed"
autoclass_content = "class"
autodoc_preserve_defaults = True
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_ivar = False  # Attributes: as attribute entries, so :attr: references find them
napoleon_use_rtype = False

# Nitpicky: a reference that does not resolve is an error. No inventories are fetched (the build
# runs without network), so references to other projects' objects cannot resolve: they are listed
# here by pattern. References into zsharp_algos are never ignored.
nitpicky = True
nitpick_ignore_regex = [
    (r"py:.*", r"(torch|transformers|composer|lightning|pytorch_lightning|accelerate|numpy|np|timm)(\..*)?"),
    (r"py:.*", r"(typing|collections\.abc|dataclasses|argparse|enum|contextlib|types)\..*"),
    (r"py:.*", r"(Any|Callable|Iterable|Iterator|Mapping|Sequence|NamedTuple|Optional|Union|Literal|Tensor|"
               r"Optimizer|Module|Parameter|Generator|ContextManager|TypeVar|Self)"),
    (r"py:.*", r"(int|float|bool|str|bytes|dict|list|tuple|set|frozenset|type|object|None|Exception|"
               r"ValueError|TypeError|RuntimeError|KeyError|ImportError|NotImplementedError|StrEnum|Enum)"),
    (r"py:.*", r"(pathlib|contextlib|os)\..*|AbstractContextManager|nn\..*"),
    # Composer's classes as the annotations and docstrings of zsharp_algos.composer name them
    (r"py:.*", r"(Event|State|Logger|Trace)(\..*)?"),
]

html_theme = "furo"
html_title = f"zsharp-algos {release}"
html_static_path: list[str] = []
