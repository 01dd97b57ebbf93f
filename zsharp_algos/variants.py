r"""The SAM family as variants of one engine: each is its direction, and where it has them, its
update rule and its state.

A variant changes one or both ends of the sharpness step:

* its **transform** rewrites the first-pass gradient ``g`` into the ascent direction ``d``
  before the scaling of the chosen direction (SAM's global norm, or ZSharp's z-score filter,
  :mod:`zsharp_algos.directions`), in place;
* its **update rule** (:mod:`zsharp_algos.rules`) changes the gradient the base optimizer steps
  with after the second pass.

==============  ========================================================  ========================
``variant``     direction                                                 step with
==============  ========================================================  ========================
``"none"``      ``d = g``                                                 ``g_s``
``"friendly"``  FriendlySAM (Li et al., CVPR 2024): ``d = g - sigma m``   ``g_s``
``"gsam"``      ``d = g`` (GSAM, Zhuang et al., ICLR 2022)                ``g_s - alpha g_perp``
``"gcsam"``     GCSAM (Hassan et al., 2025): ``g`` centred per output     ``g_s``
                channel
==============  ========================================================  ========================

* FriendlySAM: ``m`` is an exponential moving average of past first-pass gradients, updated
  after the direction is formed, ``m <- lmbda m + (1 - lmbda) g``, with the raw ``g``; a tensor's
  first gradient is its ``m``, so on the first sharpness step ``d = g`` (the authors' code, which
  has no plain steps; here the plain steps of ``interval > 1`` update ``m`` with their gradient
  too: it is a first pass). ``m`` lives in the optimizer state (``sharpness_friendly_m``), shaped
  and sharded as the parameter. The transform only reads it; the update is a rule
  (:class:`zsharp_algos.rules.FriendlyMomentum`) run with the base step, from the first pass's
  gradient kept through the step, so that a step skipped after the perturbation (an fp16
  overflow in the second pass) leaves ``m`` exactly as it was.
* GSAM: ``g_perp = g - (<g, g_s> / ||g_s||^2) g_s``, the part of the first gradient orthogonal to
  the second (inner products over all tensors of the ``gsam`` groups); its rho schedule tied to
  the learning rate is the user's (``rho`` is a param-group option).
* GCSAM: for each tensor with ``ndim > 1``, ``d = g - mean(g)`` over every dimension but the
  first (one mean per output channel); other tensors keep ``g``. SAM's scaling then gives
  ``||e|| = rho``.

Composition: ``ZSharp(..., variant="friendly")`` filters FriendlySAM's direction,
``variant="gcsam"`` the centred gradient, ``variant="gsam"`` steps GSAM's way from ZSharp's
perturbation; ``adaptive=True`` is ASAM's scaling for any of them.

State kept from the first pass (FriendlySAM's ``m``, the ``g`` that GSAM and LookSAM step with)
must be the same on every data-parallel rank for a resumed run to continue as the uninterrupted
one: a group that has a rule (:mod:`zsharp_algos.rules`) makes
:attr:`~zsharp_algos.SharpnessAwareOptimizer.first_pass_must_sync` true, and the integrations
all-reduce the first pass then.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
from torch import Tensor

from ._tensors import group_by_device_dtype
from .options import OPTIONS
from .rules import FRIENDLY_KEY
from .sharding import local

__all__ = ["VARIANTS", "Variant", "Transform", "FriendlyTransform", "CentredTransform", "StateView",
           "transform_for", "check_combination"]

VARIANT, REUSE = OPTIONS["variant"].key, OPTIONS["reuse"].key


@dataclass(frozen=True)
class Variant:
    """A variant's record: its options (besides ``variant``). What it keeps from the first pass
    is its rule's (:mod:`zsharp_algos.rules`)."""

    name: str
    summary: str
    options: tuple[str, ...] = ()  # the options it reads


#: Every variant's record by its ``variant`` value.
VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant("none", "the direction's own gradient"),
        Variant("friendly", "FriendlySAM: g - sigma * m, m an EMA of past first-pass gradients",
                ("sigma", "lmbda")),
        Variant("gsam", "GSAM: perturb as the direction, step with g_s - alpha * g_perp",
                ("alpha",)),
        Variant("gcsam", "GCSAM: the gradient centred per output channel"),
    )
}


def check_combination(group: Mapping, where: str) -> None:
    """Refuse a variant with LookSAM reuse where both would step with the first pass's gradient
    after the second pass (GSAM): each uses it up; one or the other."""
    if group[VARIANT] == "gsam" and group[REUSE] == "looksam":
        raise ValueError(
            f"{where} combines variant='gsam' with reuse='looksam': both rewrite the step's gradient from the first "
            "pass's; choose one (GSAM every sharpness step, or LookSAM's cheaper reuse between them)"
        )


@dataclass(frozen=True)
class StateView:
    """The optimizer state of a pool's tensors: ``state[originals[i]]``, the originals being the
    param-group tensors (DTensors under FSDP2, whose state is sharded as they are)."""

    state: Mapping
    originals: Sequence[Tensor]

    def get(self, key: str) -> list[Tensor | None]:
        """Each tensor's ``key`` entry as this process holds it (None where absent)."""
        return [None if key not in self.state[p] else local(self.state[p][key]) for p in self.originals]


class Transform:
    """Rewrites ``g`` into the direction, in place, before the direction's scaling."""

    def __call__(self, params: Sequence[Tensor], grads: Sequence[Tensor], state: StateView) -> None:
        raise NotImplementedError


class FriendlyTransform(Transform):
    """``d = g - sigma * m`` where ``m`` exists (module doc; before a tensor's first sharpness
    step, ``d = g``): one multi-tensor kernel. ``m`` is updated by the rule, after the step."""

    def __init__(self, sigma: float):
        self.sigma = sigma

    def __call__(self, params, grads, state):
        ms = state.get(FRIENDLY_KEY)
        old = [i for i, m in enumerate(ms) if m is not None]
        for _, (gs, m) in group_by_device_dtype([grads[i] for i in old], [ms[i] for i in old]):
            torch._foreach_add_(gs, m, alpha=-self.sigma)


class CentredTransform(Transform):
    """``g <- g - mean(g)`` over every dimension but the first, for tensors with ``ndim > 1``
    (each output channel centred). Under FSDP2 each process holds whole rows of a tensor
    (``Shard(0)``), so the means need no communication."""

    def __call__(self, params, grads, state):
        for g in grads:
            if g.dim() > 1 and g.numel():
                g.sub_(g.mean(dim=tuple(range(1, g.dim())), keepdim=True))


def transform_for(variant: str, sigma: float = 1.0, lmbda: float = 0.9) -> Transform | None:
    """The transform of ``variant`` (None where the direction takes ``g`` as it is)."""
    if variant == "friendly":
        return FriendlyTransform(sigma)
    if variant == "gcsam":
        return CentredTransform()
    return None
