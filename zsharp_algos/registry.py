"""Optimizers by name: ``create_optimizer("zsharp", model.parameters(), base="sgd", lr=0.1, ...)``.

One table for every entry point (the demo, the Composer YAMLs, ``--optim`` in HF scripts, the
accelerate script), so a new variant is one registration, not another if/else chain.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch

from .optimizer import SAM, SharpnessAwareOptimizer, ZSharp

__all__ = ["BASE_OPTIMIZERS", "SHARPNESS_OPTIMIZERS", "create_optimizer", "list_optimizers"]

BASE_OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "sgd": torch.optim.SGD,
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "adamw_torch": torch.optim.AdamW,  # Hugging Face's name for it
}

SHARPNESS_OPTIMIZERS: dict[str, type[SharpnessAwareOptimizer]] = {"sam": SAM, "zsharp": ZSharp}


def list_optimizers() -> list[str]:
    return sorted(SHARPNESS_OPTIMIZERS) + sorted(BASE_OPTIMIZERS)


def _lookup(table: dict, name: str, what: str):
    try:
        return table[name.lower()]
    except KeyError:
        raise ValueError(f"unknown {what} {name!r}; choose one of {sorted(table)}") from None


def create_optimizer(name: str, params: Iterable, *, base: str = "sgd", **kwargs) -> torch.optim.Optimizer:
    """Build optimizer ``name`` over ``params``.

    ``name`` is a sharpness-aware optimizer (``sam``, ``zsharp``) wrapping the base optimizer
    ``base``, or a base optimizer used alone. ``kwargs`` mix the sharpness hyper-parameters
    (``rho``, ``interval``, ``adaptive``, ``percentile``, ``scope``, ...) with the base's
    (``lr``, ``momentum``, ``weight_decay``, ...).
    """
    if name.lower() in SHARPNESS_OPTIMIZERS:
        cls = SHARPNESS_OPTIMIZERS[name.lower()]
        return cls(params, _lookup(BASE_OPTIMIZERS, base, "base optimizer"), **kwargs)
    return _lookup(BASE_OPTIMIZERS, name, "optimizer")(params, **kwargs)
