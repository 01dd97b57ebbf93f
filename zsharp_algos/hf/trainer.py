"""Two-pass sharpness-aware steps inside the Hugging Face ``Trainer``.

:class:`Trainer` (and :class:`Seq2SeqTrainer`) are transformers' classes with
:class:`TwoPassTrainerMixin` in front. With ``--optim sam`` / ``--optim zsharp``
(:mod:`zsharp_algos.hf.arguments`), or with a :class:`~zsharp_algos.SAM` /
:class:`~zsharp_algos.ZSharp` instance passed as ``optimizers=(optimizer, scheduler)``:

* the optimizer is transformers' own ``--base_optim`` optimizer (same parameter groups, weight
  decay split, ``--optim_args``) wrapped in the sharpness-aware optimizer, whose interval
  follows the trainer's ``global_step`` (so resume keeps the phase);
* ``training_step`` runs the stock ``training_step`` twice per micro-batch on sharpness steps:
  first inside ``accelerator.no_sync(model)`` (forward included: no DDP all-reduce, each rank
  perturbs with its own gradient), then, at the perturbed weights with BatchNorm statistics
  frozen, through the stock path, so transformers' loss scaling for gradient accumulation, DDP
  sync, fp16/bf16, clipping (``--max_grad_norm``, once, on the gradient the base optimizer
  uses), scheduler-skip-on-overflow and loss logging work as for any optimizer; the weights are
  restored exactly afterwards. See :mod:`zsharp_algos.two_pass` for the overflow handling;
* the logs of training steps get ``sharpness/*`` statistics (:mod:`zsharp_algos.stats`),
  averaged over processes.

Checkpoints hold the base optimizer's state plus the interval counter (the optimizer's
``state_dict``), so a resumed run continues exactly where transformers' own resume does.
FSDP2 (``--fsdp``, transformers' default ``fsdp_config`` version, or an accelerate config with
``fsdp_version: 2``): the optimizer works on the local shards (:mod:`zsharp_algos.sharding`),
the first pass is reduce-scattered rather than ``no_sync``-ed, so every rank perturbs along the
global batch's gradient, and transformers saves and resumes the sharded checkpoint (optimizer
state with the interval counter) as for any optimizer. FSDP1, FSDP2 with CPU offload, FSDP on
XLA and DeepSpeed are refused at construction.

Without a sharpness-aware optimizer the classes behave exactly as transformers' own.
"""
from __future__ import annotations

import functools
from typing import Any

from transformers import Seq2SeqTrainer as HFSeq2SeqTrainer
from transformers import Trainer as HFTrainer

from ..accelerate_loop import mean_over_processes
from ..two_pass import find_sharpness_optimizer, two_pass_backward
from .arguments import (
    FSDP2_HINT,
    base_optimizer_args,
    build_sharpness_optimizer,
    fsdp_problem,
    is_sharpness_optim,
    sharpness_name,
    unsupported_setup,
)

__all__ = ["TwoPassTrainerMixin", "Trainer", "Seq2SeqTrainer"]


class TwoPassTrainerMixin:
    """Sharpness-aware two-pass steps for a transformers ``Trainer`` class (mix in first)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if is_sharpness_optim(self.args) or find_sharpness_optimizer(self.optimizer) is not None:
            what = unsupported_setup(self.args)
            if what is None and getattr(self, "is_deepspeed_enabled", False):
                what = "DeepSpeed"
            if what is None and getattr(self, "is_fsdp_xla_enabled", False):
                what = "FSDP on XLA"
            if what is None and getattr(self, "is_fsdp_enabled", False):  # also from an accelerate config
                plugin = self.accelerator.state.fsdp_plugin
                offload = type(getattr(plugin, "cpu_offload", None)).__name__ in ("CPUOffloadPolicy", "CPUOffload") and (
                    getattr(plugin.cpu_offload, "offload_params", True)
                )
                what = fsdp_problem(getattr(plugin, "fsdp_version", 1), offload)
            if what is not None:
                raise ValueError(f"sharpness-aware training (SAM / ZSharp) does not support {what}; {FSDP2_HINT}")

    # -------------------------------------------------------------- the optimizer
    @staticmethod
    def get_optimizer_cls_and_kwargs(args, model=None) -> tuple[Any, dict[str, Any]]:
        """transformers' factory, for ``--base_optim`` when ``--optim`` is sam/zsharp."""
        return HFTrainer.get_optimizer_cls_and_kwargs(base_optimizer_args(args), model)

    def create_optimizer(self, model=None):
        """transformers' optimizer, wrapped in the sharpness-aware optimizer ``--optim`` names
        (its interval following ``state.global_step``); the stock one for any other ``--optim``."""
        wrap = self.optimizer is None and is_sharpness_optim(self.args)
        # transformers < 5 has no `model` argument here
        optimizer = super().create_optimizer() if model is None else super().create_optimizer(model)
        if wrap:
            self.optimizer = build_sharpness_optimizer(
                sharpness_name(self.args), optimizer, schedule=lambda: self.state.global_step, **self.args.sharpness_hparams()
            )
        return self.optimizer

    # -------------------------------------------------------------- the step
    def training_step(self, model, inputs, num_items_in_batch=None):
        """The stock ``training_step``, run twice on a sharpness step by
        :func:`~zsharp_algos.two_pass.two_pass_backward` (once with a plain optimizer)."""
        stock = super().training_step
        sharpness = find_sharpness_optimizer(self.optimizer)
        if sharpness is None:
            return stock(model, inputs, num_items_in_batch)
        return two_pass_backward(
            sharpness,
            lambda: stock(model, inputs, num_items_in_batch),
            model,
            no_sync=functools.partial(self.accelerator.no_sync, model),
            scaler=self.accelerator.scaler,
        )

    # -------------------------------------------------------------- logging
    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        """transformers' ``log``; the loss logs gain the ``sharpness/*`` statistics, averaged
        since the last log and over processes."""
        sharpness = find_sharpness_optimizer(self.optimizer)
        if sharpness is not None and "loss" in logs and sharpness.stats.pending():
            stats = mean_over_processes(self.accelerator, sharpness.stats.pop_tensors())
            logs.update({k: round(v, 6) for k, v in stats.items()})
        super().log(logs, *args, **kwargs)


class Trainer(TwoPassTrainerMixin, HFTrainer):
    """transformers' ``Trainer`` with two-pass SAM / ZSharp (see :mod:`zsharp_algos.hf.trainer`)."""


class Seq2SeqTrainer(TwoPassTrainerMixin, HFSeq2SeqTrainer):
    """transformers' ``Seq2SeqTrainer`` with two-pass SAM / ZSharp."""
