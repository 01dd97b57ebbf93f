"""``--optim sam`` / ``--optim zsharp`` as Hugging Face ``TrainingArguments``.

:class:`TrainingArguments` (and :class:`Seq2SeqTrainingArguments`) are the transformers classes
with the sharpness-aware choices added to ``--optim`` and their hyper-parameters as ordinary
fields, so ``HfArgumentParser`` turns them into ordinary command-line flags::

    --optim zsharp --base_optim sgd --optim_args momentum=0.9 --rho 0.05 --percentile 70 --scope global
    --optim sam --base_optim adamw_torch --rho 0.05 --interval 2 --adaptive

``--base_optim`` is any optimizer transformers knows (``sgd``, ``adamw_torch``, ...), built by
transformers exactly as for ``--optim <base_optim>`` (``--learning_rate``, ``--weight_decay``,
``--adam_*``, ``--optim_args``); the sharpness-aware optimizer wraps it. A mistyped ``--optim``
is rejected with the full list of choices (by argparse, and again when the dataclass is built).

transformers checks ``optim`` three times (argparse choices, ``__post_init__``, the Trainer's
optimizer factory); these classes pass the first two, and :mod:`zsharp_algos.hf.trainer` the
third (it builds the base optimizer through transformers and wraps it).

For other ``TrainingArguments`` subclasses (TRL's configs, ...), derive from
:class:`SharpnessArgumentsMixin` first: ``class MyConfig(SharpnessArgumentsMixin, SFTConfig)``
decorated with ``@dataclass``.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Literal

import torch
from transformers import Seq2SeqTrainingArguments as HFSeq2SeqTrainingArguments
from transformers import TrainingArguments as HFTrainingArguments
from transformers.training_args import OptimizerNames
from transformers.utils import ExplicitEnum

from ..optimizer import SharpnessAwareOptimizer
from ..registry import SHARPNESS_OPTIMIZERS

__all__ = [
    "SharpnessOptimizerNames",
    "SharpnessArgumentsMixin",
    "TrainingArguments",
    "Seq2SeqTrainingArguments",
    "is_sharpness_optim",
    "sharpness_name",
    "base_optimizer_args",
    "build_sharpness_optimizer",
    "check_sharpness_hparams",
    "unsupported_setup",
]

#: transformers' ``OptimizerNames`` plus ``sam`` and ``zsharp`` (a str enum, so members compare
#: equal to their values and to transformers' own members).
SharpnessOptimizerNames = ExplicitEnum(
    "SharpnessOptimizerNames",
    [(m.name, m.value) for m in OptimizerNames] + [(name.upper(), name) for name in SHARPNESS_OPTIMIZERS],
    module=__name__,
)

ZSHARP_ONLY = ("percentile", "scope")  # hyper-parameters only ZSharp takes
DEFAULT_OPTIM = getattr(HFTrainingArguments, "default_optim", "adamw_torch")  # transformers' own default


def _value(optim: Any) -> str:
    return str(optim.value if isinstance(optim, Enum) else optim)


def sharpness_name(args: Any) -> str | None:
    """``"sam"`` / ``"zsharp"`` if ``args.optim`` names a sharpness-aware optimizer, else None."""
    name = _value(getattr(args, "optim", "")).lower()
    return name if name in SHARPNESS_OPTIMIZERS else None


def is_sharpness_optim(args: Any) -> bool:
    """Whether ``args.optim`` names a sharpness-aware optimizer."""
    return sharpness_name(args) is not None


def build_sharpness_optimizer(name: str, base_optimizer: torch.optim.Optimizer, **hparams) -> SharpnessAwareOptimizer:
    """``SAM(base_optimizer, ...)`` or ``ZSharp(base_optimizer, ...)`` from the registry;
    ``percentile`` and ``scope`` are dropped for SAM. Raises ``ValueError`` for bad values."""
    cls = SHARPNESS_OPTIMIZERS[name.lower()]
    if name.lower() != "zsharp":
        hparams = {k: v for k, v in hparams.items() if k not in ZSHARP_ONLY}
    return cls(base_optimizer, **hparams)


def check_sharpness_hparams(name: str, **hparams) -> None:
    """Raise ``ValueError`` now (not at the first training step) for bad hyper-parameters."""
    build_sharpness_optimizer(name, torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.0), **hparams)


def unsupported_setup(args: Any) -> str | None:
    """What in ``args`` sharpness-aware training does not support yet, or None."""
    if getattr(args, "deepspeed", None):
        return "DeepSpeed"
    if getattr(args, "fsdp", None):
        return "FSDP"
    return None


@dataclass
class SharpnessArgumentsMixin:
    """The sharpness-aware fields; mix in before a ``TrainingArguments`` class."""

    optim: SharpnessOptimizerNames | str = field(
        default=DEFAULT_OPTIM,
        metadata={
            "help": "The optimizer to use: any of transformers' OptimizerNames, or 'sam' / 'zsharp' "
            "(sharpness-aware: two forward/backward passes per step, wrapping --base_optim)."
        },
    )
    base_optim: OptimizerNames | str = field(
        default=DEFAULT_OPTIM,
        metadata={"help": "With --optim sam/zsharp: the base optimizer (sgd, adamw_torch, ...), built as for --optim."},
    )
    rho: float = field(default=0.05, metadata={"help": "With --optim sam/zsharp: the perturbation radius."})
    percentile: float = field(
        default=70.0,
        metadata={"help": "With --optim zsharp: percentile of |z-score| below which gradient entries are dropped."},
    )
    scope: Literal["global", "tensor"] = field(
        default="global",
        metadata={
            "help": "With --optim zsharp: 'global' (one threshold over the model, the seed README) or 'tensor' "
            "(per-tensor thresholds and norms, the paper's code)."
        },
    )
    interval: int = field(
        default=1, metadata={"help": "With --optim sam/zsharp: a sharpness step every `interval` optimizer steps."}
    )
    adaptive: bool = field(
        default=False, metadata={"help": "With --optim sam/zsharp: ASAM scaling by |w| (use a larger --rho)."}
    )

    def __post_init__(self):
        optim = SharpnessOptimizerNames(_value(self.optim).lower())  # a typo fails here, listing choices
        base = OptimizerNames(_value(self.base_optim).lower())
        sharp = optim.value in SHARPNESS_OPTIMIZERS
        if sharp:
            check_sharpness_hparams(optim.value, **self.sharpness_hparams())
            self.optim = base  # transformers' own checks see the optimizer that takes the steps
        else:
            self.optim = OptimizerNames(optim.value)
        self.base_optim = base
        super().__post_init__()
        if sharp:
            self.optim = optim
            what = unsupported_setup(self)
            if what is not None:
                raise ValueError(
                    f"--optim {optim.value} does not support {what} yet; use DDP (torchrun / accelerate launch)"
                )

    def sharpness_hparams(self) -> dict[str, Any]:
        """The keyword arguments of the sharpness-aware optimizer."""
        return dict(
            rho=self.rho, interval=self.interval, adaptive=self.adaptive, percentile=self.percentile, scope=self.scope
        )


def base_optimizer_args(args: Any) -> Any:
    """``args`` itself, or for ``--optim sam/zsharp`` a shallow copy whose ``optim`` is the base
    optimizer (what transformers' optimizer factory can build)."""
    if not is_sharpness_optim(args):
        return args
    base = copy.copy(args)
    base.optim = OptimizerNames(_value(args.base_optim))
    return base


@dataclass
class TrainingArguments(SharpnessArgumentsMixin, HFTrainingArguments):
    """transformers' ``TrainingArguments`` with ``--optim sam`` / ``--optim zsharp``
    (see :mod:`zsharp_algos.hf.arguments`)."""


@dataclass
class Seq2SeqTrainingArguments(SharpnessArgumentsMixin, HFSeq2SeqTrainingArguments):
    """transformers' ``Seq2SeqTrainingArguments`` with ``--optim sam`` / ``--optim zsharp``."""

