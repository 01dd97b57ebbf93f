"""Sharpness-aware training (SAM and ZSharp) for PyTorch, Composer, Hugging Face and Accelerate.

``import zsharp_algos`` needs only torch; framework integrations are imported on first use.
"""
from __future__ import annotations

from .batchnorm import frozen_norm_stats
from .directions import DIRECTIONS, GradientDirection, ZScoreDirection, register_direction
from .grad_scaler import ClosureGradScaler
from .optimizer import SAM, SharpnessAwareOptimizer, ZSharp
from .registry import create_optimizer, list_optimizers

__version__ = "0.1.0"

# Framework integrations, imported on first use so that `import zsharp_algos` needs only torch.
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
    "SharpnessAwareOptimizer",
    "ClosureGradScaler",
    "frozen_norm_stats",
    "create_optimizer",
    "list_optimizers",
    "DIRECTIONS",
    "GradientDirection",
    "ZScoreDirection",
    "register_direction",
    "ZSharpAlgorithm",
    "SAMAlgorithm",
]
