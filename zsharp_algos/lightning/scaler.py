"""The loss scaler Lightning's ``16-mixed`` plugin gets while a sharpness-aware optimizer trains.

Lightning's :class:`~lightning.pytorch.plugins.precision.MixedPrecision` runs the closure
itself, unscales once and calls ``scaler.step(optimizer)`` without a closure, which cannot drive
a second pass; ``torch.amp.GradScaler`` also refuses a second ``unscale_`` before ``update()``.
:class:`LightningClosureScaler` is :class:`~zsharp_algos.ClosureGradScaler` (unscale after
*every* pass, one ``update()`` per optimizer step, overflow in any pass skips the step) with
what Lightning needs around it:

* it is built from the plugin's ``torch.amp.GradScaler`` (same scale and growth settings), and
  :meth:`to_torch` hands its state back to that scaler when training ends;
* :meth:`load_state_dict` also reads a ``torch.amp.GradScaler`` state, so a run saved without
  sharpness-aware training resumes with its scale;
* :meth:`overflow_anywhere` makes every process agree on an overflow seen in a pass that was not
  all-reduced (the unsynced first pass under DDP), so that all ranks skip the same steps and back
  off to the same scale.
"""
from __future__ import annotations

from typing import Any

import torch

from ..grad_scaler import ClosureGradScaler

__all__ = ["LightningClosureScaler"]


class LightningClosureScaler(ClosureGradScaler):
    """:class:`~zsharp_algos.ClosureGradScaler` for Lightning's ``16-mixed`` plugin (module doc)."""

    @classmethod
    def from_torch(cls, scaler: torch.amp.GradScaler) -> "LightningClosureScaler":
        """A scaler with ``scaler``'s current scale and its growth settings."""
        return cls(
            init_scale=scaler.get_scale(),
            growth_factor=scaler.get_growth_factor(),
            backoff_factor=scaler.get_backoff_factor(),
            growth_interval=scaler.get_growth_interval(),
            enabled=scaler.is_enabled(),
        )

    def to_torch(self, scaler: torch.amp.GradScaler) -> torch.amp.GradScaler:
        """Load this scaler's scale and growth state into ``scaler`` (``torch.amp.GradScaler``)."""
        state = self.state_dict()
        scaler.load_state_dict(
            {
                "scale": state["scale"],
                "growth_factor": state["growth_factor"],
                "backoff_factor": state["backoff_factor"],
                "growth_interval": state["growth_interval"],
                "_growth_tracker": state["growth_tracker"],
            }
        )
        return scaler

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state dict of this scaler or of ``torch.amp.GradScaler`` (an empty one, saved
        by a disabled scaler, restores nothing)."""
        if not state:  # saved by a disabled torch.amp.GradScaler: nothing to restore
            return
        if "_growth_tracker" in state and "growth_tracker" not in state:  # saved by torch.amp.GradScaler
            state = dict(state, growth_tracker=state["_growth_tracker"])
        super().load_state_dict(state)

    def overflow_anywhere(self, found_here: bool, strategy: Any) -> bool:
        """Whether any process found inf/NaN in its (unsynced) pass; a process that found
        none but learns of one elsewhere records it too, so every ``update()`` backs off alike.
        One all-reduce of a flag (and a host read)."""
        flag = torch.tensor(float(found_here), device=strategy.root_device)
        anywhere = bool(strategy.reduce(flag, reduce_op="sum") > 0)
        if anywhere and not found_here:
            self.record_overflow()
        return anywhere
