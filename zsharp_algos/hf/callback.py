r"""Single-pass ("lookahead") SAM / ZSharp for a *stock* transformers ``Trainer``.

A ``TrainerCallback`` never sees the batch or the loss, so it cannot run the second forward and
backward pass that true SAM needs. :class:`SAMCallback` / :class:`ZSharpCallback` implement the
variant a callback *can* do, at the cost of one pass per step (about 1x, plus a copy of the
gradient and of the weights)::

    step t begins:          w <- w_t + e_{t-1}, e_{t-1} = e(g_{t-1})   (on_step_begin)
    forward/backward:       g_t = grad L(w_t + e_{t-1})                 (the Trainer's own step)
    before optimizer.step:  w <- w_t exactly (copy); keep g_t           (on_pre_optimizer_step)
    optimizer.step:         w_{t+1} = base step from g_t

where ``e(g)`` is the core's SAM / ZSharp perturbation of ``g`` (the synchronised, unscaled,
clipped gradient the optimizer used; the same on every rank). It differs from two-pass SAM in
that the ascent direction comes from the *previous* step's gradient (measured at the previous
perturbed point and another batch), not from the current batch at the current weights; and the
first step after the start (or a resume, or a skipped fp16 step) is a plain step. BatchNorm
running statistics are updated at the perturbed weights (its one pass). Weights are perturbed
only between ``on_step_begin`` and ``on_pre_optimizer_step``, so evaluation, logging and saved
checkpoints always see the unperturbed weights.

For true two-pass training use ``--optim sam`` / ``--optim zsharp`` with
:mod:`zsharp_algos.hf.trainer` (or the ``zsharp-hf`` launcher); with that trainer these
callbacks do nothing (the trainer logs the statistics itself).

Logs: ``sharpness/perturbation_norm`` and ``sharpness/perturbed_fraction``
(:mod:`zsharp_algos.stats`) are added to the training logs in ``on_log``. Callbacks added with
``callbacks=[...]`` run after transformers' reporting integrations (TensorBoard, W&B, ...), so
there they show in ``trainer.state.log_history`` (so in ``trainer_state.json``) and the console
log, not in those reports.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from transformers import TrainerCallback

from .._tensors import group_by_device_dtype
from ..stats import SharpnessStats
from .arguments import build_sharpness_optimizer, check_sharpness_hparams, unsupported_setup
from .trainer import find_two_pass

__all__ = ["SharpnessCallback", "SAMCallback", "ZSharpCallback"]


class SharpnessCallback(TrainerCallback):
    """Single-pass sharpness-aware training along the previous step's gradient (module doc).

    Args:
        optimizer: ``"sam"`` or ``"zsharp"`` (:data:`zsharp_algos.registry.SHARPNESS_OPTIMIZERS`).
        **hparams: its hyper-parameters (``rho``, ``interval``, ``adaptive``, and for ZSharp
            ``percentile``, ``scope``).
    """

    def __init__(self, optimizer: str, **hparams: Any):
        check_sharpness_hparams(optimizer, **hparams)
        self.optimizer_name = optimizer
        self.hparams = hparams
        self.interval = int(hparams.get("interval", 1))
        self.stats = SharpnessStats()
        self._sharpness = None  # the core optimizer around the Trainer's base optimizer
        self._params: list[Tensor] = []
        self._grads: dict[Tensor, Tensor] = {}  # the kept gradient, one buffer per parameter
        self._kept = False

    # -------------------------------------------------------------- set-up
    def on_init_end(self, args, state, control, **kwargs):
        what = unsupported_setup(args)
        if what is not None:
            raise ValueError(f"{type(self).__name__} does not support {what} yet; use DDP instead")

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        self._kept = False
        if optimizer is None or find_two_pass(optimizer) is not None:
            self._sharpness = None  # a two-pass trainer already does the real thing
            return
        base = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper
        self._sharpness = build_sharpness_optimizer(self.optimizer_name, base, **self.hparams)

    def _is_sharpness_step(self, step: int) -> bool:
        """Optimizer step number ``step`` (counting from 1) perturbs: as the core's interval."""
        return step % self.interval == 0

    # -------------------------------------------------------------- the step
    @torch.no_grad()
    def on_step_begin(self, args, state, control, **kwargs):
        sharpness = self._sharpness
        if sharpness is None or not self._kept or not self._is_sharpness_step(state.global_step + 1):
            return
        params = [p for g in sharpness.param_groups for p in g["params"]]
        held = [p.grad for p in params]
        kept = set(self._params)
        for p in params:
            p.grad = self._grads[p] if p in kept else None
        try:
            sharpness.first_step(zero_grad=False)  # the kept gradient becomes e; w saved, w += e
            self.stats.add_perturbation([self._grads[p] for p in self._params])
        finally:
            for p, g in zip(params, held):
                p.grad = g
        self._kept = False

    @torch.no_grad()
    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        sharpness = self._sharpness
        if sharpness is None:
            return
        sharpness.restore()  # exact: the optimizer steps from the unperturbed weights
        if not self._is_sharpness_step(state.global_step + 2):
            return
        params = [p for g in sharpness.param_groups for p in g["params"] if p.grad is not None]
        for p in params:
            if p not in self._grads:
                self._grads[p] = torch.empty_like(p.grad)
        for _, (kept, grads) in group_by_device_dtype([self._grads[p] for p in params], [p.grad for p in params]):
            torch._foreach_copy_(kept, grads)
        self._params, self._kept = params, bool(params)

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        if getattr(optimizer, "step_was_skipped", False):
            self._kept = False  # an fp16 overflow: the kept gradient is not finite

    def on_train_end(self, args, state, control, **kwargs):
        if self._sharpness is not None:
            self._sharpness.restore()  # a no-op unless training stopped inside a step

    # -------------------------------------------------------------- logging
    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None and "loss" in logs and self.stats.pending():
            stats = {k: round(v, 6) for k, v in self.stats.pop().items()}
            logs.update(stats)
            if state.log_history:  # the Trainer recorded this log (a copy) just before on_log
                state.log_history[-1].update(stats)


class SAMCallback(SharpnessCallback):
    """Single-pass SAM along the previous step's gradient (see :mod:`zsharp_algos.hf.callback`)."""

    def __init__(self, rho: float = 0.05, interval: int = 1, adaptive: bool = False):
        super().__init__("sam", rho=rho, interval=interval, adaptive=adaptive)


class ZSharpCallback(SharpnessCallback):
    """Single-pass ZSharp along the previous step's filtered gradient (see
    :mod:`zsharp_algos.hf.callback`)."""

    def __init__(
        self,
        rho: float = 0.05,
        percentile: float = 70.0,
        scope: str = "global",
        interval: int = 1,
        adaptive: bool = False,
    ):
        super().__init__("zsharp", rho=rho, percentile=percentile, scope=scope, interval=interval, adaptive=adaptive)
