"""Hugging Face ``transformers`` integration: ``--optim sam`` / ``--optim zsharp``.

Two ways, both giving true two-pass sharpness-aware training:

1. In a script you write, change the import::

       from zsharp_algos.hf import Trainer, TrainingArguments   # was: from transformers import ...

   and pass ``--optim zsharp --base_optim sgd --rho 0.05 ...`` (or set the same fields).
2. For a script you do not want to touch, the launcher: ``zsharp-hf train.py --optim zsharp ...``
   (:mod:`zsharp_algos.hf.launch`).

And for a stock ``Trainer``: :class:`SAMCallback` / :class:`ZSharpCallback`, the cheaper
single-pass variant (:mod:`zsharp_algos.hf.callback`).
"""
from __future__ import annotations

from .._optional import require

require("transformers", "hf", "zsharp_algos.hf")

from .arguments import (  # noqa: E402
    Seq2SeqTrainingArguments,
    SharpnessArgumentsMixin,
    SharpnessOptimizerNames,
    TrainingArguments,
)
from .callback import SAMCallback, SharpnessCallback, ZSharpCallback  # noqa: E402
from .launch import patched_transformers  # noqa: E402
from .trainer import Seq2SeqTrainer, Trainer, TwoPassTrainerMixin  # noqa: E402

__all__ = [
    "TrainingArguments",
    "Seq2SeqTrainingArguments",
    "Trainer",
    "Seq2SeqTrainer",
    "SharpnessArgumentsMixin",
    "TwoPassTrainerMixin",
    "SharpnessOptimizerNames",
    "SharpnessCallback",
    "SAMCallback",
    "ZSharpCallback",
    "patched_transformers",
]
