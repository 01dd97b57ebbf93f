"""Which Lightning a trainer belongs to, and the handful of its classes the integration checks.

``lightning.pytorch`` and ``pytorch_lightning`` ship the same code under two package names; a
trainer of one does not accept the other's callbacks and its strategies are the other's
classes' twins, not subclasses. Everything here is looked up in the package the trainer (or
LightningModule) comes from, so one implementation serves both.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from functools import lru_cache
from types import ModuleType
from typing import Any

__all__ = ["Framework", "framework_of"]

ROOTS = ("lightning.pytorch", "pytorch_lightning")


@dataclass(frozen=True)
class Framework:
    """The classes of one Lightning package (``root``) that the integration needs."""

    root: str
    pl: ModuleType

    @property
    def LightningModule(self) -> type:
        return self.pl.LightningModule

    @property
    def Closure(self) -> type:
        return self._module("loops.optimization.automatic").Closure

    def strategy(self, name: str) -> type | None:
        return getattr(self._module("strategies"), name, None)

    def precision(self, name: str) -> type | None:
        return getattr(self._module("plugins.precision"), name, None)

    def _module(self, sub: str) -> ModuleType:
        return importlib.import_module(f"{self.root}.{sub}")


@lru_cache(maxsize=None)
def _framework(root: str) -> Framework:
    return Framework(root, importlib.import_module(root))


def framework_of(obj: Any) -> Framework:
    """The Lightning package ``obj`` (a ``Trainer``, ``LightningModule`` or callback, or a
    subclass of one) was built with."""
    for cls in type(obj).__mro__:
        module = cls.__module__ or ""
        for root in ROOTS:
            if module == root or module.startswith(root + "."):
                return _framework(root)
    raise TypeError(
        f"{type(obj).__name__} is not a Lightning object (lightning.pytorch or pytorch_lightning Trainer / "
        "LightningModule)"
    )

