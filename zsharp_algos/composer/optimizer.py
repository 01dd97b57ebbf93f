"""The core sharpness-aware optimizers, speaking the Composer Trainer's closure protocol.

Composer's trainer steps every optimizer as ``optimizer.step(closure=...)`` (fp32 and bf16, and
fp16 when the optimizer sets ``_step_supports_amp_closure``), where the closure runs the whole
batch (every micro-batch: zero_grad, forward, loss, backward, ``Event.AFTER_TRAIN_BATCH``),
returns ``None`` when Composer's closure-aware grad scaler saw inf/NaN on any rank, and accepts
two keyword arguments:

* ``ddp_sync=False``: run the batch inside DDP's ``no_sync`` (no gradient all-reduce);
* ``loss_dict={}``: accumulate the batch's losses into that dict instead of the one the trainer
  logs as ``loss/train/*``.

:class:`ComposerSAM` and :class:`ComposerZSharp` are the core :class:`~zsharp_algos.SAM` and
:class:`~zsharp_algos.ZSharp` with a :meth:`~TrainerClosureMixin.step` that calls that closure
with the right arguments for each pass (and turns the scaler's ``None`` into
:class:`~zsharp_algos.SkipStep`); everything else (the perturbation, the exact restore in a
``finally``, frozen BatchNorm statistics in the second pass, the statistics) is the core's. Their
class names are the key Composer files their state under in checkpoints. They are installed by
:mod:`zsharp_algos.composer.algorithm`; you do not normally build them yourself.
"""
from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any, Callable

from ..optimizer import SAM, SkipStep, ZSharp

__all__ = ["TrainerClosureMixin", "ComposerSAM", "ComposerZSharp"]


class TrainerClosureMixin:
    """Adapts :meth:`~zsharp_algos.SharpnessAwareOptimizer.step` to Composer's trainer closure.

    Args (on top of the core optimizer's):
        sync_first_pass: all-reduce the first pass's gradients across ranks on sharpness
            steps. Default False: each rank perturbs its weights along its own gradient
            (Composer's behaviour: one all-reduce less; the second pass is always synced, so the
            ranks' base steps, and weights, stay identical). Always synced where a rule steps
            with the first pass's gradient (``reuse="looksam"``: :attr:`~zsharp_algos.SharpnessAwareOptimizer.first_pass_must_sync`).
        second_pass_context: context-manager factory entered around the second pass, on top of
            the core's frozen normalisation statistics (the algorithm keeps the perturbed pass
            out of the training metrics with it).
    """

    def __init__(
        self,
        *args,
        sync_first_pass: bool = False,
        second_pass_context: Callable[[], AbstractContextManager] = nullcontext,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.sync_first_pass = bool(sync_first_pass)
        self._second_pass_context = second_pass_context

    def step(self, closure: Callable[..., Any] | None = None):
        """One step through the trainer's closure: on sharpness steps the first pass runs with
        ``ddp_sync=False`` (unless ``sync_first_pass``) and the second with ``loss_dict={}``;
        other steps call it once, plainly.

        Without a closure this is a plain base-optimizer step: that is how
        ``torch.distributed.checkpoint`` materialises optimizer state before loading a
        checkpoint into it (zero gradients, learning rate 0).
        """
        if closure is None:
            return self.base_step()
        sharp = self.is_sharpness_step()
        calls = 0

        def trainer_pass():
            nonlocal calls
            calls += 1
            if calls == 1:
                unsynced = sharp and not (self.sync_first_pass or self.first_pass_must_sync)
                loss = closure(ddp_sync=False) if unsynced else closure()
            else:
                with self._second_pass_context():
                    loss = closure(loss_dict={})
            if loss is None:  # Composer's closure-aware scaler saw inf/NaN on some rank
                raise SkipStep("inf/NaN gradients under Composer's grad scaler")
            return loss

        return super().step(trainer_pass)


class ComposerSAM(TrainerClosureMixin, SAM):
    """:class:`~zsharp_algos.SAM` for Composer's trainer (see :class:`TrainerClosureMixin`)."""


class ComposerZSharp(TrainerClosureMixin, ZSharp):
    """:class:`~zsharp_algos.ZSharp` for Composer's trainer (see :class:`TrainerClosureMixin`)."""
