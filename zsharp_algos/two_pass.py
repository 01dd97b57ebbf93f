r"""Sharpness-aware steps inside a training framework that owns backward and ``step()``.

The core :class:`~zsharp_algos.SharpnessAwareOptimizer` runs both passes itself through a
closure. Frameworks such as the Hugging Face ``Trainer`` and ``accelerate`` loops own the
backward pass instead (loss scaling, gradient accumulation, DDP all-reduce, autocast) and then
call ``optimizer.step()`` without a closure, through their own wrappers (loss-scaler checks,
scheduler skipping). :class:`TwoPassOptimizer` is the one implementation that serves them all:

* :meth:`TwoPassOptimizer.backward` takes the framework's *own* "forward + backward" for a
  (micro-)batch as ``run_pass`` and, on sharpness steps, runs::

      held = gradients accumulated so far (earlier micro-batches); .grad <- None
      with no_sync(model): run_pass()      # first pass: local to this rank, forward inside
      unscale, and check for inf/NaN       # under fp16 loss scaling only
      w <- w + e(g)                        # the core's direction and perturbation; w saved
      .grad <- held                        # the first pass's gradient is dropped
      with frozen BatchNorm stats: run_pass()  # second pass: the framework's stock path
      w <- saved copy                      # exact restore, in a finally

  so each micro-batch is perturbed by its own gradient, the second pass's gradient is
  accumulated, all-reduced, unscaled and clipped exactly as the framework would do for plain
  training, and the first pass never all-reduces (each rank perturbs with its own gradient, as
  Composer and the SAM paper's data-parallel variant do).
* :meth:`TwoPassOptimizer.step` is then the base optimizer's step (the framework calls it, or
  skips it on overflow, as for any optimizer).

Overflow: if the first pass's gradient has inf/NaN under a loss scaler, no perturbation is made
and the gradient is poisoned (set to inf) *before* the second backward, so the poison travels
through the all-reduce and every rank's scaler skips the step and backs off (and a prepared
scheduler does not step). An overflow in the second pass is caught by the scaler as usual.
Either way the weights are the restored, unperturbed ones.

Memory: the core optimizer's saved-weights buffer, plus, while the first pass runs during
gradient accumulation, the gradient accumulated so far next to the first pass's own.
"""
from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any, Callable

import torch
from torch import Tensor, nn

from ._tensors import group_by_device_dtype
from .batchnorm import frozen_norm_stats
from .optimizer import SharpnessAwareOptimizer
from .stats import SharpnessStats

__all__ = ["TwoPassOptimizer"]


class TwoPassOptimizer(torch.optim.Optimizer):
    """A sharpness-aware optimizer whose passes are run by :meth:`backward` and whose
    :meth:`step` is the base optimizer's step.

    Shares ``param_groups`` and ``state`` with the wrapped optimizer (and so with its base), so
    LR schedulers and gradient clipping built on it act on the base optimizer. Its
    ``state_dict()`` is the wrapped optimizer's (base state plus the interval counter).

    Args:
        sharpness: the :class:`~zsharp_algos.SAM` / :class:`~zsharp_algos.ZSharp` (or any
            :class:`~zsharp_algos.SharpnessAwareOptimizer`) that defines the perturbation, the
            interval and the base optimizer. Its ``max_grad_norm``, if set, clips the gradient
            right before the base step (leave it unset where the framework clips).
        record_stats: keep :mod:`sharpness statistics <zsharp_algos.stats>` in :attr:`stats`.
    """

    def __init__(self, sharpness: SharpnessAwareOptimizer, *, record_stats: bool = True):
        if not isinstance(sharpness, SharpnessAwareOptimizer):
            raise TypeError(
                f"TwoPassOptimizer wraps a sharpness-aware optimizer (SAM, ZSharp), got {type(sharpness).__name__}"
            )
        self.sharpness = sharpness
        self.record_stats = record_stats
        self.stats = SharpnessStats()
        self._passes_done = False
        # Optimizer.__init__ sets up hooks; the groups it is given are replaced by the shared ones.
        super().__init__([dict(g) for g in sharpness.param_groups], {})
        self._share()

    def _share(self) -> None:
        self.param_groups = self.sharpness.param_groups
        self.state = self.sharpness.state
        self.defaults = self.sharpness.defaults

    # ------------------------------------------------------------------ the passes
    def is_sharpness_step(self) -> bool:
        """Whether the coming optimizer step perturbs (see ``interval``)."""
        return self.sharpness.is_sharpness_step()

    def backward(
        self,
        run_pass: Callable[[], Any],
        model: nn.Module,
        *,
        no_sync: Callable[[], AbstractContextManager] | None = None,
        scaler: Any = None,
    ) -> Any:
        """Forward and backward for one (micro-)batch: twice on sharpness steps, else once.

        Args:
            run_pass: runs the forward pass and the framework's backward (adding to ``.grad``)
                and returns the loss; called inside ``no_sync`` for the first pass.
            model: the model as the framework runs it (the DDP wrapper, if any): its BatchNorm
                statistics are frozen during the second pass.
            no_sync: context-manager factory that disables the gradient all-reduce; default
                ``model.no_sync`` where the model has one (DDP), else nothing.
            scaler: the framework's loss scaler (``torch.amp.GradScaler``-like: ``get_scale()``
                and ``is_enabled()``), if any: the first pass's gradient is unscaled and checked.

        Returns the first pass's loss (what ``run_pass`` returned at the unperturbed weights).
        """
        sam = self.sharpness
        if not sam.is_sharpness_step():
            return run_pass()
        if no_sync is None:
            no_sync = getattr(model, "no_sync", nullcontext)
        params = [p for g in self.param_groups for p in g["params"]]
        held = [p.grad for p in params]
        for p in params:
            p.grad = None
        try:
            try:
                with no_sync():
                    first = run_pass()
                first_params = [p for p in params if p.grad is not None]
                first_grads = [p.grad for p in first_params]
                scaled = scaler is not None and _is_enabled(scaler)
                overflow = scaled and bool(first_grads) and _unscale_and_check(first_grads, scaler)
                if not overflow:
                    sam.first_step(zero_grad=False)  # first_grads now hold e
                    if self.record_stats:
                        self.stats.add_perturbation(first_grads)
            finally:
                for p, g in zip(params, held):
                    p.grad = g
            if overflow:
                _poison(first_params[0])
            with frozen_norm_stats(model):
                second = run_pass()
        finally:
            sam.restore()  # exact, whatever happened (a no-op if nothing was perturbed)
        self._passes_done = True
        if self.record_stats and not overflow and isinstance(first, Tensor) and isinstance(second, Tensor):
            self.stats.add_loss_gap(first, second)
        return first

    # ------------------------------------------------------------------ the step
    def step(self, closure: None = None) -> None:
        """The base optimizer's step on the current (second-pass) gradients, clipped first if
        the wrapped optimizer has ``max_grad_norm``."""
        if closure is not None:
            raise TypeError(
                "TwoPassOptimizer.step() takes no closure: run the passes with backward(), or use the "
                "wrapped optimizer's step(closure) directly"
            )
        if self.sharpness.is_sharpness_step() and not self._passes_done:
            raise RuntimeError(
                "this is a sharpness step but TwoPassOptimizer.backward() did not run since the last step: "
                "the gradient would be a plain one (did a custom training_step / loop bypass it?)"
            )
        self._passes_done = False
        self.stats.end_step()
        self.sharpness._base_step()

    # ------------------------------------------------------------------ plumbing
    def zero_grad(self, set_to_none: bool = True) -> None:
        self.sharpness.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict) -> None:
        if self.param_groups is not self.sharpness.param_groups:
            return super().add_param_group(param_group)  # inside Optimizer.__init__
        self.sharpness.add_param_group(param_group)

    def state_dict(self) -> dict[str, Any]:
        return self.sharpness.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.sharpness.load_state_dict(state_dict)
        self._share()  # the base may have replaced its containers

    def __getstate__(self):
        return self.__dict__

    def __setstate__(self, state):
        self.__dict__.update(state)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.sharpness!r})"


def _is_enabled(scaler: Any) -> bool:
    is_enabled = getattr(scaler, "is_enabled", None)
    return bool(is_enabled()) if callable(is_enabled) else True


@torch.no_grad()
def _unscale_and_check(grads: list[Tensor], scaler: Any) -> bool:
    """Divide ``grads`` by the scaler's current scale in place; True if any is inf/NaN."""
    inv_scale = 1.0 / float(scaler.get_scale())
    found_any = False
    for _, (gs,) in group_by_device_dtype(grads):
        device = gs[0].device
        found = torch.zeros(1, dtype=torch.float32, device=device)
        inv = torch.full((1,), inv_scale, dtype=torch.float32, device=device)
        torch._amp_foreach_non_finite_check_and_unscale_(gs, found, inv)
        found_any = found_any or bool(found)
    return found_any


@torch.no_grad()
def _poison(param: Tensor) -> None:
    """Make ``param``'s gradient inf so that the step's gradient is non-finite on every rank
    (the second backward adds to it and all-reduces it)."""
    if param.grad is None:
        param.grad = torch.zeros_like(param)
    param.grad.fill_(float("inf"))
