"""The site's own Sphinx extension: tables generated from the code, and a missing docstring as a
warning.

Directives (in MyST pages, ``:::{zsharp-options}`` ... ``:::``):

* ``zsharp-options``: every option of :data:`zsharp_algos.options.OPTIONS` with its default,
  what it takes, its help text and the optimizers of
  :data:`zsharp_algos.registry.SHARPNESS_OPTIMIZERS` that take it;
* ``zsharp-optimizers``: the registered sharpness-aware optimizers, their classes and summaries,
  the options each takes beyond SAM's;
* ``zsharp-refusals``: :data:`zsharp_algos.capabilities.ENTRY_POINTS`, what each entry point runs
  and refuses.

Each builds a Markdown table from the code and parses it in place, so the pages hold no copy of
the values. ``autodoc-process-docstring`` warns about a public module, class, function, method or
property without a docstring; the build treats warnings as errors.
"""
from __future__ import annotations

import enum
import inspect

from docutils import nodes
from sphinx import addnodes
from docutils.statemachine import StringList
from sphinx.application import Sphinx
from sphinx.util import logging
from sphinx.util.docutils import SphinxDirective

logger = logging.getLogger(__name__)

#: Longest value a signature shows (`` = ...`` included).
MAX_VALUE_LENGTH = 80


def _cell(text: object) -> str:
    """``text`` for a Markdown table cell: pipes escaped, no line breaks."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def _code(text: object) -> str:
    return f"`{_cell(text)}`"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


class _TableDirective(SphinxDirective):
    has_content = False

    def lines(self) -> list[str]:
        raise NotImplementedError

    def run(self) -> list[nodes.Node]:
        container = nodes.container(classes=["zsharp-generated"])
        self.state.nested_parse(StringList(self.lines(), source=self.get_source_info()[0]), self.content_offset,
                                container)
        return [container]


class OptionsTable(_TableDirective):
    """The options of :mod:`zsharp_algos.options`, and which optimizers take each."""

    def lines(self) -> list[str]:
        from zsharp_algos.options import OPTIONS
        from zsharp_algos.registry import SHARPNESS_OPTIMIZERS

        rows = []
        for name, option in OPTIONS.items():
            takers = [n for n, info in SHARPNESS_OPTIMIZERS.items() if info.accepts(name)]
            rows.append([_code(name), _code(repr(option.default)), _cell(option.expects), _cell(option.help),
                         ", ".join(takers) or "none"])
        return _table(["option", "default", "takes", "what it does", "taken by"], rows)


class OptimizersTable(_TableDirective):
    """The optimizers of :mod:`zsharp_algos.registry`."""

    def lines(self) -> list[str]:
        from zsharp_algos.options import SAM_OPTIONS
        from zsharp_algos.registry import SHARPNESS_OPTIMIZERS

        common = {o.name for o in SAM_OPTIONS}
        rows = []
        for name, info in SHARPNESS_OPTIMIZERS.items():
            own = [o for o in info.option_names if o not in common]
            fixed = [f"{o.name}={o.default!r}" for o in info.options if not o.keyword]
            cls = f"{info.cls.__module__.split('.optimizer')[0]}.{info.cls.__name__}"
            rows.append([_code(name), f"{{class}}`~{cls}`", _cell(info.summary),
                         ", ".join(map(_code, own)) or "none", ", ".join(map(_code, fixed)) or ""])
        return _table(["name", "class", "what it is", "options beyond SAM's", "fixed"], rows)


class RefusalsTable(_TableDirective):
    """:data:`zsharp_algos.capabilities.ENTRY_POINTS`."""

    def lines(self) -> list[str]:
        from zsharp_algos.capabilities import ENTRY_POINTS

        rows = [[_cell(e.label), str(e.passes), _cell(e.parallel), _cell(e.precision),
                 "; ".join(_cell(r) for r in e.refuses) or "nothing"]
                for e in ENTRY_POINTS.values()]
        return _table(["entry point", "passes a sharpness step", "runs", "precision", "refuses"], rows)


def _missing(name: str, what: str) -> None:
    logger.warning("%s %s has no docstring", what, name, type="zsharp", subtype="docstring")


def _public_names(module) -> list[str]:
    names = getattr(module, "__all__", None)
    return list(names) if names is not None else [n for n in vars(module) if not n.startswith("_")]


def warn_on_missing_docstring(app: Sphinx, what: str, name: str, obj, options, lines: list[str]) -> None:
    """Warn about a public object without a docstring, at the module or class that holds it.

    autodoc leaves an undocumented member out (``undoc-members`` is off, so that data fields
    documented in an ``Attributes:`` section are not documented twice); this hook looks at what
    it would have left out: a module's public functions and classes (its ``__all__``), its
    public data without a ``#:`` comment, and a class's own public methods and properties
    (a docstring inherited from a base counts)."""
    if what == "module":
        members = options["members"] if "members" in options else None
        if not members:  # :no-members: documents the module's text only
            return
        from sphinx.pycode import ModuleAnalyzer

        try:
            commented = {attr for (_, attr) in ModuleAnalyzer.for_module(name).find_attr_docs()}
        except Exception:  # no source to analyse
            commented = set()
        wanted = list(members) if isinstance(members, (list, tuple)) else _public_names(obj)  # else: ALL
        for member in wanted:
            value = getattr(obj, member, None)
            full = f"{name}.{member}"
            if inspect.isclass(value) or inspect.isroutine(value):
                if not inspect.getdoc(value):
                    _missing(full, "class" if inspect.isclass(value) else "function")
            elif member not in commented and not inspect.ismodule(value):
                _missing(full, "data (a #: comment)")
    elif what in ("class", "exception"):
        for member, value in vars(obj).items():
            if member.startswith("_"):
                continue
            if isinstance(value, (staticmethod, classmethod)):
                value = value.__func__
            if inspect.isfunction(value) or isinstance(value, property):
                doc = inspect.getdoc(getattr(obj, member, value)) if not isinstance(value, property) else value.__doc__
                if not doc and not _inherited_doc(obj, member):
                    _missing(f"{name}.{member}", "property" if isinstance(value, property) else "method")
    elif what in ("function", "method", "property") and not any(line.strip() for line in lines):
        _missing(name, what)


def _inherited_doc(cls: type, member: str) -> bool:
    for base in cls.__mro__[1:]:
        value = vars(base).get(member)
        if value is not None and getattr(value, "__doc__", None):
            return True
    return False


def skip_members(app: Sphinx, what: str, name: str, obj, skip: bool, options) -> bool | None:
    """Leave out an enum's members, which are its values, not API (``SharpnessOptimizerNames``
    would list every optimizer name of transformers); and a named tuple's fields, whose
    docstrings ("Alias for field number 0") Python writes: the class's ``Attributes:`` say what
    they are."""
    if what == "class" and isinstance(obj, enum.Enum):
        return True
    if what == "class" and (getattr(obj, "__doc__", None) or "").startswith("Alias for field number"):
        return True
    return None


def drop_private_bases(app: Sphinx, name: str, obj, options, bases: list) -> None:
    """Leave private bases (``zsharp_algos.lightning._hooks.SAMHooks``) out of "Bases:": they are
    not documented, and the class's own page says what it does."""
    bases[:] = [b for b in bases
                if not any(part.startswith("_") for part in f"{b.__module__}.{b.__qualname__}".split("."))]


def drop_long_values(app: Sphinx, doctree: nodes.document) -> None:
    """A data or attribute signature shows its value only when it is short: the repr of a table
    (``OPTIONS``, ``SAM.options``) is the generated tables' business, not a signature's."""
    for signature in doctree.findall(addnodes.desc_signature):
        for annotation in list(signature.findall(addnodes.desc_annotation)):
            text = annotation.astext().strip()
            if text.startswith("=") and len(text) > MAX_VALUE_LENGTH:
                annotation.parent.remove(annotation)


def setup(app: Sphinx) -> dict:
    app.add_directive("zsharp-options", OptionsTable)
    app.add_directive("zsharp-optimizers", OptimizersTable)
    app.add_directive("zsharp-refusals", RefusalsTable)
    app.connect("autodoc-process-docstring", warn_on_missing_docstring)
    app.connect("autodoc-skip-member", skip_members)
    app.connect("autodoc-process-bases", drop_private_bases)
    app.connect("doctree-read", drop_long_values)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
