"""Sharpness statistics for training logs, kept on the device until someone logs them.

One implementation and one namespace (``sharpness/*``) for every entry point: the plain loop
(``opt.stats``), Composer, Hugging Face, Accelerate and Lightning. Recorded by the engine on
perturbed (micro-)batches from what the step computes anyway (the direction's norms, its mask,
the coefficients that scale it), so recording them costs a few operations on 0-dim tensors, not
passes over the gradients (ZSharp's count of kept entries excepted: one pass over ``d``):

* ``sharpness/grad_norm``: ``||g||`` of the first-pass gradient over the perturbed tensors (for
  SAM the norm that scales ``e``; ZSharp has it from the per-tensor statistics of its filter);
* ``sharpness/perturbation_norm``: ``||e||`` over the whole model, from the coefficients and the
  direction's norms (``rho`` for SAM and the global scope; about ``rho * sqrt(#filtered
  tensors)`` for ZSharp's ``scope="tensor"``; ASAM's is measured);
* ``sharpness/perturbed_fraction``: the share of the perturbed tensors' entries the direction
  keeps: 1 for SAM and its variants (they filter nothing); for ZSharp the share of entries its
  filtered direction leaves nonzero (a count over ``d``, which ZSharp has just written), about
  ``1 - percentile/100``. Far below that where many gradient entries are exact zeros: timm
  initialises the last BatchNorm of each residual block to zero, so early in training most
  entries of those blocks' gradients are 0; a threshold may keep them (their ``|z|`` all tie),
  but ``e`` moves none of them and they are not counted;
* ``sharpness/loss_gap``: ``L(w + e) - L(w)`` from the two passes, the usual estimate of sharpness,
  per optimizer step (summed over micro-batches), in the units of the loss the trainer logs.

Reading them (:meth:`SharpnessStats.pop`) is the only host synchronisation.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from ._tensors import group_by_device_dtype
from .order_stats import reads_host

__all__ = ["SharpnessStats", "PREFIX", "NAMES", "squared_norm", "nonzero_count"]

#: The prefix of every statistic's name.
PREFIX = "sharpness/"
#: The statistics, without the prefix (``sharpness/grad_norm``, ...).
NAMES = ("grad_norm", "perturbation_norm", "perturbed_fraction", "loss_gap")


def _foreach_sum(tensors: Sequence[Tensor], ord: float) -> Tensor:
    """Sum over the tensors of ``||t||_ord ** (2 if ord == 2 else 1)`` as a 0-dim tensor on the
    first tensor's device, in float32 (float64 for float64 tensors; MPS has no float64): one
    multi-tensor kernel per device/dtype group."""
    device = tensors[0].device
    wide = _stat_dtype(tensors)
    total = torch.zeros((), dtype=wide, device=device)
    for _, (ts,) in group_by_device_dtype(tensors):
        dtype = torch.float64 if ts[0].dtype == torch.float64 else torch.float32
        norms = torch.stack(torch._foreach_norm(ts, ord, dtype=dtype)).to(device, wide)
        total = total + (norms.square().sum() if ord == 2 else norms.sum())
    return total


def _stat_dtype(tensors: Sequence[Tensor]) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def squared_norm(tensors: Sequence[Tensor]) -> Tensor:
    """``sum ||t||^2`` (0-dim)."""
    return _foreach_sum(tensors, 2)


# Entries counted per piece on the CPU: a piece's count is exact in float32 (< 2^24), and its
# scratch stays in cache (at most 1 MiB in float32) and small beside the tensors counted (at
# most 1/32 of their entries, or 4096).
COUNT_PIECE = 1 << 18


def nonzero_count(tensors: Sequence[Tensor]) -> Tensor:
    """Number of non-zero entries (0-dim). On accelerators one multi-tensor kernel per
    device/dtype group (``_foreach_norm`` with ord 0: exact below 2^24 per tensor in float32).
    Under the CPU strategy of :mod:`zsharp_algos.order_stats`, where that kernel loops over the
    tensors anyway and its branchy count slows down as the share of zeros grows (docs/filter.md
    has the before and after), ``|sign(t)|`` is summed piece by piece,
    each piece's count exact in float32. ``sign`` maps NaN to 0, so a piece whose plain sum is
    NaN (it holds a NaN, or infinities of both signs) is counted by ``count_nonzero`` instead: a
    host read, free on CPU tensors."""
    if not reads_host(tensors[0].device):
        return _foreach_sum(tensors, 0)
    step = min(COUNT_PIECE, max(1 << 12, -(-sum(t.numel() for t in tensors) // 32)))
    count = 0
    scratch: dict[torch.dtype, Tensor] = {}  # one piece's |sign| per dtype
    for t in tensors:
        flat = t.detach().reshape(-1)
        if flat.dtype not in scratch:
            scratch[flat.dtype] = torch.empty(step, dtype=flat.dtype)
        buf = scratch[flat.dtype]
        for start in range(0, flat.numel(), step):
            piece = flat[start : start + step]
            if piece.sum().isnan():
                count += int(torch.count_nonzero(piece))
            else:
                count += int(torch.sign(piece, out=buf[: piece.numel()]).abs_().sum(dtype=torch.float32))
    return torch.tensor(float(count), dtype=_stat_dtype(tensors))


class SharpnessStats:
    """Running sums of the statistics above between two :meth:`pop` calls."""

    def __init__(self) -> None:
        self._sums: dict[str, Tensor] = {}
        self._perturbed = 0  # perturbed (micro-)batches
        self._steps = 0  # optimizer steps that had a loss gap recorded
        self._gap_since_step = False

    def _add(self, name: str, value: Tensor) -> None:  # sums stay on the device: no sync
        value = value.detach().reshape(())
        old = self._sums.get(name)
        self._sums[name] = value if old is None else old + value.to(old.device)

    def add_perturbation(self, grad_sq: Tensor, e_sq: Tensor, kept, numel: int) -> None:
        """Record one perturbation: ``||g||^2`` of the gradient it came from, ``||e||^2``, and
        how many of the ``numel`` entries the direction kept (a 0-dim tensor, or a number when
        it kept them all), whole tensors (completed across shards by the caller)."""
        self._add("grad_norm", grad_sq.sqrt())
        self._add("perturbation_norm", e_sq.sqrt())
        fraction = kept / numel if isinstance(kept, Tensor) else torch.ones((), device=grad_sq.device)
        self._add("perturbed_fraction", fraction)
        self._perturbed += 1

    def add_loss_gap(self, first: Tensor, second: Tensor) -> None:
        """Record one (micro-)batch's ``L(w + e) - L(w)``."""
        self._add("loss_gap", second.detach().float() - first.detach().float())
        self._gap_since_step = True

    def end_step(self) -> None:
        """Mark an optimizer step: the loss gap is reported per step (summed over micro-batches)."""
        if self._gap_since_step:
            self._steps += 1
            self._gap_since_step = False

    def pending(self) -> bool:
        """Whether anything was recorded since the last :meth:`pop`."""
        return self._perturbed > 0 or "loss_gap" in self._sums

    def pop_tensors(self) -> dict[str, Tensor]:
        """The averages as float32 0-dim device tensors (no host sync), keyed
        ``sharpness/<name>``, and reset. Empty if nothing was recorded."""
        out: dict[str, Tensor] = {}
        for name in NAMES[:3]:
            if self._perturbed and name in self._sums:
                out[PREFIX + name] = (self._sums[name] / self._perturbed).float()
        steps = self._steps + self._gap_since_step  # a step still accumulating counts as one
        if "loss_gap" in self._sums and steps:
            out[PREFIX + "loss_gap"] = (self._sums["loss_gap"] / steps).float()
        self.__init__()
        return out

    def pop(self) -> dict[str, float]:
        """The averages as Python floats (one host sync), and reset."""
        return {k: float(v) for k, v in self.pop_tensors().items()}
