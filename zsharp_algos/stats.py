"""Sharpness statistics for training logs, kept on the device until someone logs them.

Recorded per perturbed (micro-)batch, right after the perturbation ``e`` was computed:

* ``perturbation_norm``: ``||e||`` over the whole model (``rho`` for SAM; about
  ``rho * sqrt(#filtered tensors)`` for ZSharp's ``scope="tensor"``);
* ``perturbed_fraction``: the share of gradient entries that ``e`` moves (1 for SAM, about
  ``1 - percentile/100`` for ZSharp);
* ``loss_gap``: ``L(w + e) - L(w)`` from the two passes, the usual estimate of sharpness (only
  where both losses exist, i.e. two-pass training), per optimizer step, in the units of the loss
  the trainer logs.

Reading them (:meth:`SharpnessStats.pop`) is the only host synchronisation.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from ._tensors import group_by_device_dtype, total_norm

__all__ = ["SharpnessStats", "perturbation_stats"]

PREFIX = "sharpness/"


@torch.no_grad()
def perturbation_stats(perturbation: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """``(||e||, fraction of non-zero entries)`` of a perturbation given as a list of tensors,
    as float32 0-dim tensors on the first tensor's device."""
    norms: list[Tensor] = []
    for _, (es,) in group_by_device_dtype(perturbation):
        norms.extend(torch._foreach_norm(es, 2, dtype=torch.float32))
    device = perturbation[0].device
    nonzero = sum(torch.count_nonzero(e).to(device) for e in perturbation)
    numel = sum(e.numel() for e in perturbation)
    return total_norm(norms), nonzero.float() / numel


class SharpnessStats:
    """Running sums of the statistics above between two :meth:`pop` calls."""

    def __init__(self) -> None:
        self._norm: Tensor | None = None
        self._fraction: Tensor | None = None
        self._gap: Tensor | None = None
        self._perturbed = 0  # perturbed (micro-)batches
        self._steps = 0  # optimizer steps that had a loss gap recorded
        self._gap_since_step = False

    def add_perturbation(self, perturbation: Sequence[Tensor]) -> None:
        """Record ``e`` (call while the tensors hold it)."""
        if not perturbation:
            return
        norm, fraction = perturbation_stats(perturbation)
        self._norm = norm if self._norm is None else self._norm + norm
        self._fraction = fraction if self._fraction is None else self._fraction + fraction
        self._perturbed += 1

    def add_loss_gap(self, first: Tensor, second: Tensor) -> None:
        """Record one (micro-)batch's ``L(w + e) - L(w)``."""
        gap = (second.detach().float() - first.detach().float()).reshape(())
        self._gap = gap if self._gap is None else self._gap + gap.to(self._gap.device)
        self._gap_since_step = True

    def end_step(self) -> None:
        """Mark an optimizer step: the loss gap is reported per step (summed over micro-batches)."""
        if self._gap_since_step:
            self._steps += 1
            self._gap_since_step = False

    def pending(self) -> bool:
        """Whether anything was recorded since the last :meth:`pop`."""
        return self._perturbed > 0

    def pop_tensors(self) -> dict[str, Tensor]:
        """The averages as 0-dim device tensors (no host sync), keyed ``sharpness/<name>``, and
        reset. Empty if nothing was recorded."""
        out: dict[str, Tensor] = {}
        if self._perturbed:
            out[PREFIX + "perturbation_norm"] = self._norm / self._perturbed
            out[PREFIX + "perturbed_fraction"] = self._fraction / self._perturbed
        steps = self._steps + self._gap_since_step  # a step still accumulating counts as one
        if self._gap is not None and steps:
            out[PREFIX + "loss_gap"] = self._gap / steps
        self.__init__()
        return out

    def pop(self) -> dict[str, float]:
        """The averages as Python floats (one host sync), and reset."""
        return {k: float(v) for k, v in self.pop_tensors().items()}
