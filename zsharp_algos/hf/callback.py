r"""Single-pass ("lookahead") SAM / ZSharp for a *stock* transformers ``Trainer``.

A ``TrainerCallback`` never sees the batch or the loss, so it cannot run the second forward and
backward pass that true SAM needs. :class:`SAMCallback` / :class:`ZSharpCallback` implement the
variant a callback *can* do, at the cost of one pass per step (about 1x, plus a copy of the
gradient and of the weights)::

    step t begins:          w <- w_t + e_{t-1}, e_{t-1} = e(g_{t-1})   (on_step_begin)
    forward/backward:       g_t = grad L(w_t + e_{t-1})                 (the Trainer's own step)
    before optimizer.step:  w <- w_t exactly (copy); keep g_t           (on_pre_optimizer_step)
    optimizer.step:         w_{t+1} = base step from g_t

where ``e(g)`` is the core's SAM / ZSharp perturbation of ``g`` (:mod:`zsharp_algos.engine`) (the synchronised, unscaled,
clipped gradient the optimizer used; the same on every rank). It differs from two-pass SAM in
that the ascent direction comes from the *previous* step's gradient (measured at the previous
perturbed point and another batch), not from the current batch at the current weights; and the
first step after the start (or a resume, or a skipped fp16 step) is a plain step. BatchNorm
running statistics are updated at the perturbed weights (its one pass). Weights are perturbed
only between ``on_step_begin`` and ``on_pre_optimizer_step``, so evaluation, logging and saved
checkpoints always see the unperturbed weights.

For true two-pass training use ``--optim sam`` / ``--optim zsharp`` with
:mod:`zsharp_algos.hf.trainer` (or the ``zsharp-hf`` launcher); these callbacks refuse to run
together with it (both would perturb).

Sharded training: the callbacks refuse DeepSpeed and any FSDP (the ``--fsdp`` arguments, an
accelerate FSDP config, or DTensor parameters met at ``on_train_begin``): they keep a copy of
the gradient across steps, which under FSDP2 is not tested; ``--optim sam/zsharp`` with
:mod:`zsharp_algos.hf.trainer` supports FSDP2.

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
from ..capabilities import entry_point
from ..engine import PerturbationEngine
from ..options import GroupOptions
from ..registry import optimizer_info
from ..sharding import is_sharded
from ..two_pass import find_sharpness_optimizer
from .arguments import check_sharpness_hparams, is_sharpness_optim, unsupported_setup

__all__ = ["SharpnessCallback", "SAMCallback", "ZSharpCallback"]


class SharpnessCallback(TrainerCallback):
    """Single-pass sharpness-aware training along the previous step's gradient (module doc).

    Args:
        optimizer: ``"sam"`` or ``"zsharp"`` (:data:`zsharp_algos.registry.SHARPNESS_OPTIMIZERS`).
        **hparams: its options (``rho``, ``interval``, ``adaptive``, and for ZSharp
            ``percentile``, ``scope``); the trainer's optimizer groups get them as keys.
    """

    def __init__(self, optimizer: str, **hparams: Any):
        self.info = optimizer_info(optimizer)
        given = check_sharpness_hparams(self.info.name, **hparams)
        self.hparams = {**{o.name: o.default for o in self.info.options}, **given}
        entry_point("hf-callback").check_options(type(self).__name__, self.hparams)
        self.engine: PerturbationEngine | None = None  # over the Trainer's base optimizer
        self._params: list[Tensor] = []
        self._grads: dict[Tensor, Tensor] = {}  # the kept gradient, one buffer per parameter
        self._kept = False

    @property
    def stats(self):
        """The perturbation's ``sharpness/*`` statistics (:class:`~zsharp_algos.SharpnessStats`),
        None before training starts."""
        return self.engine.stats if self.engine is not None else None

    # -------------------------------------------------------------- set-up
    def _refuse_double(self, where: str) -> None:
        raise ValueError(
            f"{type(self).__name__} with {where}: that trainer already runs two-pass sharpness-aware steps; "
            "use one or the other (drop the callback, or use --optim with a base optimizer name)"
        )

    def _refuse_sharded(self, what: str) -> None:
        raise ValueError(
            f"{type(self).__name__} does not support {what}; use DDP, or for sharded training two-pass "
            "--optim sam / --optim zsharp (zsharp_algos.hf.Trainer, the zsharp-hf launcher), which supports FSDP2"
        )

    def on_init_end(self, args, state, control, **kwargs):
        what = unsupported_setup(args)
        if what is None and getattr(args, "fsdp", None):
            what = "FSDP"
        if what is not None:
            self._refuse_sharded(what)
        if is_sharpness_optim(args):
            self._refuse_double(f"--optim {args.optim}")

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        self._kept = False
        if optimizer is None:
            return
        if find_sharpness_optimizer(optimizer) is not None:
            self._refuse_double(f"a {type(find_sharpness_optimizer(optimizer)).__name__} optimizer")
        base = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper
        if any(is_sharded(p) for g in base.param_groups for p in g["params"]):
            self._refuse_sharded("FSDP (the parameters are sharded DTensors)")
        options = GroupOptions(self.info.options, type(self).__name__, base_names=base.defaults)
        for group in base.param_groups:
            options.fill(group, self.hparams)
        self.engine = PerturbationEngine(
            base, self.info.cls.make_direction, self.info.cls.direction_options, options=options
        )

    # -------------------------------------------------------------- the step
    @torch.no_grad()
    def on_step_begin(self, args, state, control, **kwargs):
        engine = self.engine
        if engine is None or not self._kept or not engine.is_due(state.global_step):
            return
        params = [p for g in engine.owner.param_groups for p in g["params"]]
        held = [p.grad for p in params]
        kept = set(self._params)
        for p in params:
            p.grad = self._grads[p] if p in kept else None
        try:
            engine.perturb(state.global_step, free_grads=False)  # the kept gradient becomes e; w kept
        finally:
            for p, g in zip(params, held):
                p.grad = g
        self._kept = False

    @torch.no_grad()
    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        engine = self.engine
        if engine is None:
            return
        engine.restore()  # exact: the optimizer steps from the unperturbed weights
        if not engine.is_due(state.global_step + 1):
            return
        params = [p for g in engine.owner.param_groups for p in g["params"] if p.grad is not None]
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
        if self.engine is not None:
            self.engine.restore()  # a no-op unless training stopped inside a step

    # -------------------------------------------------------------- logging
    def on_log(self, args, state, control, logs=None, **kwargs):
        stats = self.stats
        if logs is not None and "loss" in logs and stats is not None and stats.pending():
            values = {k: round(v, 6) for k, v in stats.pop().items()}
            logs.update(values)
            if state.log_history:  # the Trainer recorded this log (a copy) just before on_log
                state.log_history[-1].update(values)


class SAMCallback(SharpnessCallback):
    """Single-pass SAM along the previous step's gradient (see :mod:`zsharp_algos.hf.callback`)."""

    def __init__(self, **hparams: Any):
        super().__init__("sam", **hparams)


class ZSharpCallback(SharpnessCallback):
    """Single-pass ZSharp along the previous step's filtered gradient (see
    :mod:`zsharp_algos.hf.callback`)."""

    def __init__(self, **hparams: Any):
        super().__init__("zsharp", **hparams)
