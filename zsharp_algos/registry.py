"""Optimizers by name, with what each accepts: ``create_optimizer("zsharp", params, base="sgd", ...)``.

One table for every entry point (the demo, the Composer YAMLs, ``--optim`` in HF scripts, the
accelerate and Lightning scripts): a front end asks :func:`optimizer_info` which options a name
takes instead of keeping its own filter, so a new variant is one registration.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Callable, Iterable

import torch

from .optimizer import GCSAM, GSAM, SAM, FriendlySAM, SharpnessAwareOptimizer, ZSharp
from .options import Option, keywords_of

__all__ = [
    "OptimizerInfo",
    "BASE_OPTIMIZERS",
    "SHARPNESS_OPTIMIZERS",
    "optimizer_info",
    "is_sharpness_optimizer",
    "base_optimizer_class",
    "register_optimizer",
    "base_kwargs",
    "create_optimizer",
    "list_optimizers",
]

#: Base optimizers by name (``adamw_torch`` is Hugging Face's name for AdamW).
BASE_OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "sgd": torch.optim.SGD,
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "adamw_torch": torch.optim.AdamW,
}


@dataclass(frozen=True)
class OptimizerInfo:
    """A sharpness-aware optimizer and its capabilities."""

    name: str
    cls: type[SharpnessAwareOptimizer]
    summary: str

    @property
    def options(self) -> tuple[Option, ...]:
        """Every option of its class, those the class fixes included."""
        return self.cls.options

    @property
    def option_names(self) -> tuple[str, ...]:
        """The options it takes as keywords, not those its class fixes (FriendlySAM's variant)."""
        return tuple(o.name for o in self.cls.options if o.keyword)

    def accepts(self, option: str) -> bool:
        """Whether it takes ``option`` as a keyword (one of :attr:`option_names`)."""
        return option in self.option_names


#: The sharpness-aware optimizers by name (filled by :func:`register_optimizer`).
SHARPNESS_OPTIMIZERS: dict[str, OptimizerInfo] = {}


def register_optimizer(name: str, cls: type[SharpnessAwareOptimizer], summary: str) -> OptimizerInfo:
    """Add a sharpness-aware optimizer to the table every front end reads."""
    info = OptimizerInfo(name, cls, summary)
    SHARPNESS_OPTIMIZERS[name] = info
    return info


register_optimizer("sam", SAM, "SAM (Foret et al., 2021): perturb along the gradient")
register_optimizer("zsharp", ZSharp, "ZSharp (arXiv 2505.02369): perturb along the significant z-score entries")
register_optimizer("friendlysam", FriendlySAM, "FriendlySAM (Li et al., CVPR 2024): perturb along g - sigma * EMA(g)")
register_optimizer("gsam", GSAM, "GSAM (Zhuang et al., ICLR 2022): step with g_s - alpha * (g orthogonal to g_s)")
register_optimizer("gcsam", GCSAM, "GCSAM (Hassan et al., 2025): perturb along the gradient centred per output channel")


def list_optimizers() -> list[str]:
    """The names :func:`create_optimizer` takes: the sharpness-aware optimizers, then the base
    optimizers, each sorted."""
    return sorted(SHARPNESS_OPTIMIZERS) + sorted(BASE_OPTIMIZERS)


def _lookup(table: dict, name, what: str, choices: Iterable[str] | None = None):
    """``table[name]`` (case-insensitive); an unknown name fails listing ``choices`` (default:
    the table's names), the closest first."""
    choices = sorted(table) if choices is None else list(choices)
    if not isinstance(name, str):
        raise TypeError(f"{what} must be given by name (one of {', '.join(choices)}), got {name!r}")
    try:
        return table[name.lower()]
    except KeyError:
        close = difflib.get_close_matches(name.strip().lower(), choices, n=3, cutoff=0.5)
        hint = f"did you mean {' or '.join(map(repr, close))}? " if close else ""
        raise ValueError(f"unknown {what} {name!r}; {hint}choose one of {', '.join(choices)}") from None


def optimizer_info(name: str) -> OptimizerInfo:
    """The registered sharpness-aware optimizer ``name`` (``ValueError`` listing the choices)."""
    return _lookup(SHARPNESS_OPTIMIZERS, name, "sharpness-aware optimizer")


def is_sharpness_optimizer(name) -> bool:
    """Whether ``name`` names a registered sharpness-aware optimizer (case-insensitive)."""
    return isinstance(name, str) and name.lower() in SHARPNESS_OPTIMIZERS


def base_optimizer_class(base) -> Callable[..., torch.optim.Optimizer]:
    """A base optimizer by name, or a ``torch.optim.Optimizer`` subclass as it is."""
    if isinstance(base, type) and issubclass(base, torch.optim.Optimizer):
        return base
    return _lookup(BASE_OPTIMIZERS, base, "base optimizer")


def base_kwargs(base, **values) -> dict:
    """The ``values`` that base optimizer ``base`` (a name or class) takes, ``None`` values left
    out: one command line serves every base (``--momentum`` reaches SGD, ``--eps`` Adam)."""
    taken = keywords_of(base_optimizer_class(base))
    return {k: v for k, v in values.items() if v is not None and (taken is None or k in taken)}


def create_optimizer(name: str, params: Iterable, *, base="sgd", **kwargs) -> torch.optim.Optimizer:
    """Build optimizer ``name`` over ``params``.

    ``name`` is a sharpness-aware optimizer (``sam``, ``zsharp``) wrapping the base optimizer
    ``base`` (a name or a ``torch.optim.Optimizer`` class), or a base optimizer used alone.
    ``kwargs`` mix the sharpness options (``rho``, ``interval``, ``adaptive``, ``percentile``,
    ``scope``, ...) with the base's (``lr``, ``momentum``, ``weight_decay``, ...).
    """
    if is_sharpness_optimizer(name):
        return optimizer_info(name).cls(params, base_optimizer_class(base), **kwargs)
    return _lookup(BASE_OPTIMIZERS, name, "optimizer", list_optimizers())(params, **kwargs)
