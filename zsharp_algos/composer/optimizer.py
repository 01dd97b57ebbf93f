"""The core sharpness-aware optimizers, speaking the Composer Trainer's closure protocol.

Composer's trainer steps every optimizer as ``optimizer.step(closure=...)`` (fp32 and bf16, and
fp16 when the optimizer sets ``_step_supports_amp_closure``), where the closure runs the whole
batch (every micro-batch: zero_grad, forward, loss, backward, ``Event.AFTER_TRAIN_BATCH``) and
accepts two keyword arguments:

* ``ddp_sync=False``: run the batch inside DDP's ``no_sync`` (no gradient all-reduce);
* ``loss_dict={}``: accumulate the batch's losses into that dict instead of the one the trainer
  logs as ``loss/train/*``.

:class:`ComposerSAM` and :class:`ComposerZSharp` are the core :class:`~zsharp_algos.SAM` and
:class:`~zsharp_algos.ZSharp` with a :meth:`~TrainerClosureMixin.step` that calls that closure
with the right arguments for each pass; everything else (the perturbation, the exact restore in
a ``finally``, the skipped step on a ``None`` loss, frozen BatchNorm statistics in the second
pass) is the core optimizer's. Their class names are the key Composer files their state under
in checkpoints. They are installed by :mod:`zsharp_algos.composer.algorithm`; you do not
normally build them yourself.
"""
from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any, Callable

import torch
from torch import Tensor

from .._tensors import total_norm
from ..directions import weighted_norms
from ..optimizer import SAM, ZSharp

__all__ = ["TrainerClosureMixin", "ComposerSAM", "ComposerZSharp", "STAT_NAMES"]

#: What :attr:`TrainerClosureMixin.last_stats` holds, in order.
STAT_NAMES = ("grad_norm", "perturbation_norm", "perturbed_fraction")


class TrainerClosureMixin:
    """Adapts :meth:`SharpnessAwareOptimizer.step` to Composer's trainer closure.

    Attributes set by the algorithm that installs the optimizer:

    * ``sync_first_pass`` (bool): all-reduce the first pass's gradients across ranks on
      sharpness steps. Default False: each rank perturbs its weights along its own gradient
      (Composer's behaviour: one all-reduce less; the second pass is always synced, so the
      ranks' base steps, and weights, stay identical).
    * ``second_pass_context`` (callable returning a context manager): entered around the second
      pass, on top of the core's frozen normalisation statistics (the algorithm uses it to keep
      the perturbed pass out of the training metrics).
    * ``record_stats`` (bool): on the next sharpness step, keep the first pass's gradient norm,
      the perturbation's norm and the fraction of entries perturbed in :attr:`last_stats`
      (device tensors: reading them is the only host sync, left to whoever logs them).
    """

    sync_first_pass: bool = False
    second_pass_context: Callable[[], AbstractContextManager] = nullcontext
    record_stats: bool = False
    last_stats: Tensor | None = None

    def step(self, closure: Callable[..., Any] | None = None):
        """One step through the trainer's closure: on sharpness steps the first pass runs with
        ``ddp_sync=False`` (unless ``sync_first_pass``) and the second with ``loss_dict={}``;
        other steps call it once, plainly.

        Without a closure this is a plain base-optimizer step: that is how
        ``torch.distributed.checkpoint`` materialises optimizer state before loading a
        checkpoint into it (zero gradients, learning rate 0).
        """
        if closure is None:
            return self.base_optimizer.step()
        sharp = self.is_sharpness_step()
        calls = 0

        def trainer_pass():
            nonlocal calls
            calls += 1
            if calls == 1:
                return closure(ddp_sync=False) if sharp and not self.sync_first_pass else closure()
            with self.second_pass_context():
                return closure(loss_dict={})

        return super().step(trainer_pass)

    @torch.no_grad()
    def first_step(self, zero_grad: bool = True) -> None:
        if not self.record_stats:
            return super().first_step(zero_grad)
        params, grads = self._params_with_grad()
        if not params:
            return super().first_step(zero_grad)
        grad_norm = total_norm(weighted_norms(params, grads, adaptive=False))
        super().first_step(zero_grad=False)  # the gradients now hold the perturbation e
        e_norm = total_norm(weighted_norms(params, grads, adaptive=False))
        perturbed = sum(torch.count_nonzero(g).to(grad_norm.device) for g in grads)
        numel = sum(g.numel() for g in grads)
        self.last_stats = torch.stack([grad_norm, e_norm, perturbed.float() / numel])
        self.record_stats = False
        if zero_grad:
            self.zero_grad(set_to_none=False)


class ComposerSAM(TrainerClosureMixin, SAM):
    """:class:`~zsharp_algos.SAM` for Composer's trainer (see :class:`TrainerClosureMixin`)."""


class ComposerZSharp(TrainerClosureMixin, ZSharp):
    """:class:`~zsharp_algos.ZSharp` for Composer's trainer (see :class:`TrainerClosureMixin`)."""

