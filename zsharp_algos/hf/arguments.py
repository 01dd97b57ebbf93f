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
import difflib
import warnings
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Literal

import torch
from transformers import Seq2SeqTrainingArguments as HFSeq2SeqTrainingArguments
from transformers import TrainingArguments as HFTrainingArguments
from transformers.training_args import OptimizerNames
from transformers.utils import ExplicitEnum

from ..optimizer import SharpnessAwareOptimizer
from ..options import OPTIONS, check_options
from ..registry import SHARPNESS_OPTIMIZERS, optimizer_info

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
    "fsdp_problem",
    "FSDP2_HINT",
]

SharpnessOptimizerNames = ExplicitEnum(
    "SharpnessOptimizerNames",
    [(m.name, m.value) for m in OptimizerNames] + [(name.upper(), name) for name in SHARPNESS_OPTIMIZERS],
    module=__name__,
)
# The functional enum API takes no docstring: it is set here.
SharpnessOptimizerNames.__doc__ = """transformers' ``OptimizerNames`` plus the sharpness-aware optimizers of
:data:`zsharp_algos.registry.SHARPNESS_OPTIMIZERS` (``sam``, ``zsharp``, ...): the values ``--optim`` takes. A str
enum, so members compare equal to their values and to transformers' own members."""

def _refuse_in_the_stock_trainer(name: str):
    def handler(ctx: Any):
        raise ValueError(
            f"--optim {name} runs two forward/backward passes a step, which transformers' own Trainer cannot: use "
            "zsharp_algos.hf.Trainer (from zsharp_algos.hf import Trainer, TrainingArguments), or run the script "
            f"unchanged through the launcher: zsharp-hf SCRIPT.py --optim {name} ..."
        )

    return handler


def _register_refusals() -> None:
    """A stock ``transformers.Trainer`` given these arguments looks ``--optim`` up in its table of
    optimizer handlers and, for a name it does not know, fails with "unsupported optimizer", which
    names no fix. Our names get a handler there that names it (our Trainer never reaches it: it
    builds the ``--base_optim`` optimizer and wraps it)."""
    try:
        from transformers.trainer_optimizer import _OPTIMIZER_HANDLERS
    except ImportError:  # another transformers layout: its own message stands
        return
    for member in SharpnessOptimizerNames:
        if member.value in SHARPNESS_OPTIMIZERS:
            _OPTIMIZER_HANDLERS.setdefault(member, _refuse_in_the_stock_trainer(member.value))


_register_refusals()

#: The option fields these arguments add (the ones every registered optimizer may take).
SHARPNESS_FIELDS = (
    "rho", "percentile", "scope", "interval", "adaptive", "perturb_eps", "interval_mode", "interval_seed", "reuse",
    "reuse_alpha", "variant", "sigma", "lmbda", "alpha",
)
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


def accepted_hparams(name: str, hparams: dict[str, Any]) -> dict[str, Any]:
    """The options in ``hparams`` that optimizer ``name`` takes (the registry says which)."""
    info = optimizer_info(name)
    return {k: v for k, v in hparams.items() if info.accepts(k)}


def build_sharpness_optimizer(
    name: str, base_optimizer: torch.optim.Optimizer, *, schedule=None, **hparams
) -> SharpnessAwareOptimizer:
    """``SAM(base_optimizer, ...)`` or ``ZSharp(base_optimizer, ...)`` from the registry, with the
    options of ``hparams`` it takes. Raises ``ValueError`` for bad values."""
    return optimizer_info(name).cls(base_optimizer, schedule=schedule, **accepted_hparams(name, hparams))


def check_sharpness_hparams(name: str, **hparams) -> dict[str, Any]:
    """Validate now (not at the first training step); returns the options ``name`` takes. Raises
    ``ValueError`` for bad values and ``TypeError`` for options ``name`` does not take."""
    info = optimizer_info(name)
    return check_options(hparams, info.options, f"--optim {info.name}")


def _changed_fields(args: Any) -> list[str]:
    """Sharpness fields set away from their defaults."""
    return [k for k in SHARPNESS_FIELDS if getattr(args, k) != OPTIONS[k].default]


def warn_unused_flags(args: Any) -> None:
    """Warn about sharpness flags that the chosen ``--optim`` ignores (``--optim adamw_torch
    --rho 0.1``, ``--optim sam --percentile 50``): a silent no-op is how runs go wrong."""
    name = sharpness_name(args)
    changed = _changed_fields(args)
    unused = changed if name is None else [k for k in changed if not optimizer_info(name).accepts(k)]
    if unused:
        flags = " ".join(f"--{k}" for k in unused)
        target = f"--optim {_value(args.optim)}" if name is None else f"--optim {name}"
        hint = "use --optim sam or --optim zsharp" if name is None else "they are --optim zsharp options"
        warnings.warn(f"{flags} ignored: {target} does not use them ({hint})", UserWarning, stacklevel=_user_stacklevel())


def _user_stacklevel() -> int:
    """The ``stacklevel`` that points a warning at the first frame outside this package,
    transformers and the dataclass machinery (whose generated ``__init__`` is ``<string>``): the
    user's script line that built the arguments."""
    import os
    import sys

    skip = tuple(os.path.dirname(m.__file__) for m in (sys.modules["zsharp_algos"], sys.modules["transformers"]))
    frame, level = sys._getframe(1), 1
    while frame is not None:
        name = frame.f_code.co_filename
        if not (name.startswith(skip) or name.startswith("<") or name.endswith(("dataclasses.py", "hf_argparser.py"))):
            return level  # stacklevel 1 is the function that calls warnings.warn (warn_unused_flags)
        frame, level = frame.f_back, level + 1
    return 2


#: The way out named when a setup is refused.
FSDP2_HINT = (
    "use FSDP2 without CPU offload (--fsdp; FSDP2 is transformers' default fsdp_config version, "
    "explicitly --fsdp_config '{\"version\": 2}') or DDP (torchrun / accelerate launch)"
)


def fsdp_problem(version: int, offload: bool = False, xla: bool = False) -> str | None:
    """What in an FSDP setup sharpness-aware training does not support, or None (FSDP2)."""
    if xla:
        return "FSDP on XLA"
    if int(version) != 2:
        return f"FSDP version {version}"
    if offload:
        return "FSDP2 with CPU offload"
    return None


def unsupported_setup(args: Any) -> str | None:
    """What in ``args`` sharpness-aware training does not support, or None (single process,
    DDP, FSDP2)."""
    if getattr(args, "deepspeed", None):
        return "DeepSpeed"
    fsdp = getattr(args, "fsdp", None)
    if not fsdp:
        return None
    config = getattr(args, "fsdp_config", None)
    config = config if isinstance(config, dict) else {}
    plugin = getattr(args, "fsdp_plugin_args", None) or {}  # what transformers hands accelerate
    version = plugin.get("fsdp_version", config.get("version", config.get("fsdp_version", 2)))
    legacy = fsdp.split() if isinstance(fsdp, str) else list(fsdp) if isinstance(fsdp, (list, tuple)) else []
    offload = bool(plugin.get("cpu_offload") or config.get("cpu_offload") or "offload" in legacy)
    return fsdp_problem(version, offload, xla=bool(config.get("xla")))


def _help(name: str) -> str:
    takers = [n for n, info in sorted(SHARPNESS_OPTIMIZERS.items()) if info.accepts(name)]
    return f"With --optim {'/'.join(takers)}: {OPTIONS[name].help}."


@dataclass
class SharpnessArgumentsMixin:
    """The sharpness-aware fields; mix in before a ``TrainingArguments`` class."""

    # str, not the enum: argparse would print its whole usage for a typo; __post_init__ says it in one line
    optim: str = field(
        default=DEFAULT_OPTIM,
        metadata={
            "help": "The optimizer to use: any of transformers' OptimizerNames, or 'sam' / 'zsharp' "
            "(sharpness-aware: two forward/backward passes per step, wrapping --base_optim)."
        },
    )
    base_optim: str = field(
        default=DEFAULT_OPTIM,
        metadata={"help": "With --optim sam/zsharp: the base optimizer (sgd, adamw_torch, ...), built as for --optim."},
    )
    rho: float = field(default=OPTIONS["rho"].default, metadata={"help": _help("rho")})
    percentile: float = field(default=OPTIONS["percentile"].default, metadata={"help": _help("percentile")})
    scope: Literal["global", "tensor"] = field(default=OPTIONS["scope"].default, metadata={"help": _help("scope")})
    interval: int = field(default=OPTIONS["interval"].default, metadata={"help": _help("interval")})
    adaptive: bool = field(default=OPTIONS["adaptive"].default, metadata={"help": _help("adaptive")})
    perturb_eps: float = field(default=OPTIONS["perturb_eps"].default, metadata={"help": _help("perturb_eps")})
    interval_mode: Literal["fixed", "random"] = field(
        default=OPTIONS["interval_mode"].default, metadata={"help": _help("interval_mode")}
    )
    interval_seed: int = field(default=OPTIONS["interval_seed"].default, metadata={"help": _help("interval_seed")})
    reuse: Literal["none", "looksam"] = field(default=OPTIONS["reuse"].default, metadata={"help": _help("reuse")})
    reuse_alpha: float = field(default=OPTIONS["reuse_alpha"].default, metadata={"help": _help("reuse_alpha")})
    variant: Literal["none", "friendly", "gsam", "gcsam"] = field(
        default=OPTIONS["variant"].default, metadata={"help": _help("variant")}
    )
    sigma: float = field(default=OPTIONS["sigma"].default, metadata={"help": _help("sigma")})
    lmbda: float = field(default=OPTIONS["lmbda"].default, metadata={"help": _help("lmbda")})
    alpha: float = field(default=OPTIONS["alpha"].default, metadata={"help": _help("alpha")})

    def __post_init__(self):
        optim = _optimizer_name(self.optim, SharpnessOptimizerNames, "--optim")
        base = _optimizer_name(self.base_optim, OptimizerNames, "--base_optim")
        sharp = optim.value in SHARPNESS_OPTIMIZERS
        warn_unused_flags(self)
        if sharp:
            check_sharpness_hparams(optim.value, **self.sharpness_hparams(optim.value))
            self.optim = base  # transformers' own checks see the optimizer that takes the steps
        else:
            self.optim = OptimizerNames(optim.value)
        self.base_optim = base
        super().__post_init__()
        if sharp:
            self.optim = optim
            what = unsupported_setup(self)
            if what is not None:
                raise ValueError(f"--optim {optim.value} does not support {what}; {FSDP2_HINT}")

    def sharpness_hparams(self, name: str | None = None) -> dict[str, Any]:
        """The keyword arguments of the sharpness-aware optimizer (``name``, default
        ``--optim``): the fields it takes."""
        name = name or sharpness_name(self)
        values = {k: getattr(self, k) for k in SHARPNESS_FIELDS}
        return accepted_hparams(name, values) if name else values


def _optimizer_name(value: Any, names: type, flag: str):
    """``names(value)``; a typo fails with the choices on one short line (not argparse's usage)."""
    try:
        return names(_value(value).lower())
    except ValueError:
        choices = sorted(m.value for m in names)
        close = difflib.get_close_matches(_value(value).lower(), choices, n=3)
        hint = f"did you mean {' or '.join(map(repr, close))}? " if close else ""
        raise ValueError(
            f"{flag} {_value(value)!r} is not an optimizer name; {hint}choices: {', '.join(choices)}"
        ) from None


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

