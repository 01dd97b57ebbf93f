"""Sharpness-aware training (SAM and ZSharp) for PyTorch, Composer, Hugging Face, Accelerate and
Lightning.

``import zsharp_algos`` (and ``from zsharp_algos import *``) needs only torch. The framework
integrations live in subpackages imported on first use: :mod:`zsharp_algos.composer`,
:mod:`zsharp_algos.hf`, :mod:`zsharp_algos.accelerate_loop`, :mod:`zsharp_algos.lightning`.
"""
from __future__ import annotations

from .batchnorm import frozen_norm_stats
from .grad_scaler import ClosureGradScaler
from .optimizer import GCSAM, GSAM, SAM, FriendlySAM, SharpnessAwareOptimizer, SkipStep, ZSharp
from .param_groups import no_perturbation_groups
from .registry import create_optimizer, list_optimizers
from .stats import SharpnessStats

__version__ = "0.1.0"

# Reachable as zsharp_algos.<name> for convenience, imported on first use (they need Composer);
# not in __all__, so `from zsharp_algos import *` stays torch-only.
_LAZY = {
    "ZSharpAlgorithm": "zsharp_algos.composer",
    "SAMAlgorithm": "zsharp_algos.composer",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'zsharp_algos' has no attribute {name!r}")


__all__ = [
    "SAM",
    "ZSharp",
    "FriendlySAM",
    "GSAM",
    "GCSAM",
    "SharpnessAwareOptimizer",
    "SkipStep",
    "ClosureGradScaler",
    "SharpnessStats",
    "frozen_norm_stats",
    "no_perturbation_groups",
    "create_optimizer",
    "list_optimizers",
]
