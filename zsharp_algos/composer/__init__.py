"""Composer integration: :class:`ZSharpAlgorithm` and :class:`SAMAlgorithm`.

``Trainer(..., algorithms=[ZSharpAlgorithm()])`` turns the trainer's optimizers into ZSharp (or
SAM) optimizers that step through the trainer's own closure. Needs ``mosaicml``
(``pip install 'zsharp-algos[composer]'``); ``import zsharp_algos`` alone never imports it.
"""
from __future__ import annotations

from .._optional import require

require("composer", "composer", "zsharp_algos.composer")

from .algorithm import SAMAlgorithm, SharpnessAwareAlgorithm, ZSharpAlgorithm  # noqa: E402
from .optimizer import ComposerSAM, ComposerZSharp, TrainerClosureMixin  # noqa: E402

__all__ = [
    "SAMAlgorithm",
    "ZSharpAlgorithm",
    "SharpnessAwareAlgorithm",
    "ComposerSAM",
    "ComposerZSharp",
    "TrainerClosureMixin",
]
