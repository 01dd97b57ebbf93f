"""Loss scaling for fp16 that works with closure-based (two-pass) steps.

``torch.amp.GradScaler.step`` refuses closures, and routing a SAM closure through it (as
accelerate does) steps with gradients that are still scaled. :class:`ClosureGradScaler` instead
unscales *inside* each closure call, so the perturbation and the base step both see true
gradients, and reports overflow by raising :class:`~zsharp_algos.SkipStep` from the closure: the
optimizer then skips the step, with the weights restored exactly
(:class:`~zsharp_algos.SharpnessAwareOptimizer`), and counts it.

Usage::

    scaler = ClosureGradScaler()
    def closure():
        opt.zero_grad()
        with torch.autocast("cuda", dtype=torch.float16):
            loss = loss_fn(model(x), y)
        scaler.scale(loss).backward()
        return loss
    loss = scaler.step(opt, closure)   # None when the step was skipped
    scaler.update()

Clipping belongs to the optimizer (``max_grad_norm=``), which applies it to the unscaled
gradient the base optimizer uses. Like ``torch.amp.GradScaler``, the overflow decision costs one
device-to-host read per pass; bf16 needs no scaler at all. Under FSDP2 the gradients are DTensor
shards, and DTensor's inf check all-reduces its flag over the mesh, so an overflow in any rank's
shard skips the step on every rank (tested in ``tests/test_fsdp.py``).
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from ._tensors import group_by_device_dtype
from .optimizer import SharpnessAwareOptimizer, SkipStep

__all__ = ["ClosureGradScaler"]


class ClosureGradScaler:
    """Dynamic loss scaler for closure-based optimizers (CPU, CUDA, MPS).

    Args:
        init_scale: initial scale factor.
        growth_factor: scale multiplier after ``growth_interval`` overflow-free steps.
        backoff_factor: scale multiplier after a step with inf/NaN gradients in any pass.
        growth_interval: overflow-free steps between growths.
        enabled: if False every method is a pass-through (so one code path serves fp32/bf16).

    Attributes:
        skipped_steps: steps skipped for inf/NaN gradients in either pass (saved in
            :meth:`state_dict`).
    """

    def __init__(
        self,
        init_scale: float = 2.0**16,
        growth_factor: float = 2.0,
        backoff_factor: float = 0.5,
        growth_interval: int = 2000,
        enabled: bool = True,
    ):
        if not init_scale > 0:
            raise ValueError(f"init_scale must be > 0, got {init_scale!r}")
        if not growth_factor > 1.0:
            raise ValueError(f"growth_factor must be > 1, got {growth_factor!r}")
        if not 0.0 < backoff_factor < 1.0:
            raise ValueError(f"backoff_factor must be in (0, 1), got {backoff_factor!r}")
        if not (isinstance(growth_interval, int) and growth_interval >= 1):
            raise ValueError(f"growth_interval must be an integer >= 1, got {growth_interval!r}")
        self.enabled = enabled
        self.growth_factor, self.backoff_factor, self.growth_interval = growth_factor, backoff_factor, growth_interval
        self._init_scale = float(init_scale)
        self._init_growth_tracker = 0
        self._scale: Tensor | None = None
        self._growth_tracker: Tensor | None = None
        self._found_inf: Tensor | None = None  # any overflow since the last update()
        self.skipped_steps = 0

    # ------------------------------------------------------------------ scaling
    def scale(self, loss: Tensor) -> Tensor:
        """``loss * scale`` (call ``.backward()`` on the result inside the closure)."""
        if not self.enabled:
            return loss
        if self._scale is None:
            self._scale = torch.full((), self._init_scale, dtype=torch.float32, device=loss.device)
            self._growth_tracker = torch.full((), self._init_growth_tracker, dtype=torch.int32, device=loss.device)
        return loss * self._scale.to(loss.dtype)

    def get_scale(self) -> float:
        """Current scale as a Python float (a host read; for logging)."""
        return float(self._scale) if self._scale is not None else self._init_scale

    def unscale_(self, optimizer: torch.optim.Optimizer) -> bool:
        """Divide the gradients by the scale in place; True if any is inf/NaN (one host read)."""
        if not self.enabled or self._scale is None:
            return False
        found = torch.zeros((), dtype=torch.float32, device=self._scale.device)
        inv_scale = self._scale.double().reciprocal().float()
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        for _, (gs,) in group_by_device_dtype(grads):
            dev = gs[0].device
            found_dev = torch.zeros(1, dtype=torch.float32, device=dev)
            torch._amp_foreach_non_finite_check_and_unscale_(gs, found_dev, inv_scale.to(dev).reshape(1))
            found += found_dev.to(found.device)[0]
        self._found_inf = found if self._found_inf is None else self._found_inf + found
        return bool(found)

    def record_overflow(self) -> None:
        """Count an overflow seen elsewhere (another process's unsynced pass), so the next
        :meth:`update` backs off as on the processes that saw it."""
        if not self.enabled or self._scale is None:
            return
        one = torch.ones((), dtype=torch.float32, device=self._scale.device)
        self._found_inf = one if self._found_inf is None else self._found_inf + one

    # ------------------------------------------------------------------ stepping
    def step(self, optimizer: torch.optim.Optimizer, closure: Callable[[], Any]):
        """Run ``optimizer.step`` with a closure whose gradients are unscaled after every call.

        Sharpness-aware optimizers call it once or twice; a pass that overflows raises
        :class:`~zsharp_algos.SkipStep` from the closure and the optimizer skips the step with its
        weights untouched (the perturbation, if any, undone exactly). Other optimizers: one
        call, then their step unless the pass overflowed. Returns the loss, or ``None`` for a
        skipped step (counted in :attr:`skipped_steps`).
        """
        if not self.enabled:
            return optimizer.step(closure)
        overflowed = False

        def unscaled_closure():
            nonlocal overflowed
            loss = closure()
            if self.unscale_(optimizer):
                overflowed = True
                raise SkipStep("inf/NaN gradients under fp16 loss scaling")
            return loss

        if isinstance(optimizer, SharpnessAwareOptimizer):
            loss = optimizer.step(unscaled_closure)
        else:
            try:
                loss = unscaled_closure()
                optimizer.step()
            except SkipStep:
                loss = None
        if overflowed:
            self.skipped_steps += 1
            return None
        return loss

    def update(self) -> None:
        """Back off the scale after an overflow, grow it after ``growth_interval`` clean steps."""
        if not self.enabled or self._scale is None:
            return
        found = self._found_inf if self._found_inf is not None else torch.zeros((), device=self._scale.device)
        found = found.reshape(1).to(self._scale.device, torch.float32)
        scale, tracker = self._scale.reshape(1), self._growth_tracker.reshape(1)
        torch._amp_update_scale_(scale, tracker, found, self.growth_factor, self.backoff_factor, self.growth_interval)
        self._found_inf = None

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        """Plain Python values (safe for ``torch.load(weights_only=True)``)."""
        return {
            "scale": self.get_scale(),
            "growth_tracker": int(self._growth_tracker) if self._growth_tracker is not None else self._init_growth_tracker,
            "growth_factor": self.growth_factor,
            "backoff_factor": self.backoff_factor,
            "growth_interval": self.growth_interval,
            "skipped_steps": self.skipped_steps,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self._init_scale = float(state["scale"])
        self._init_growth_tracker = int(state["growth_tracker"])
        self.growth_factor = float(state["growth_factor"])
        self.backoff_factor = float(state["backoff_factor"])
        self.growth_interval = int(state["growth_interval"])
        self.skipped_steps = int(state.get("skipped_steps", 0))
        if self._scale is not None:
            self._scale.fill_(self._init_scale)
            self._growth_tracker.fill_(self._init_growth_tracker)
