"""Import an optional dependency, or fail with the ``pip install`` line that provides it."""
from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["require"]


def require(module: str, extra: str, purpose: str) -> ModuleType:
    """``importlib.import_module(module)``; if it is missing, raise an :class:`ImportError` naming
    the ``zsharp-algos[extra]`` extra that installs it and what it is needed for."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        top = module.split(".")[0]
        raise ImportError(
            f"{purpose} needs the optional dependency {top!r}: install the zsharp-algos[{extra}] "
            f"extra (pip install -e '.[{extra}]' in a checkout, or pip install "
            f"'dist/<wheel>[{extra}]'), or install {top!r} directly"
        ) from err
