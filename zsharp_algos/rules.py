r"""Update rules: what the base optimizer steps with, when it is not simply the gradient in ``.grad``.

A sharpness step ends with the second pass's gradient ``g_s`` (at ``w + e``) in ``.grad``; a
plain step (between sharpness steps, ``interval > 1``) with the plain gradient ``g``. A rule
may change that gradient right before the base step, using the first pass's gradient ``g``
(kept by the optimizer on sharpness steps, :class:`FirstPassGradients`) and state of its own
(in the optimizer's ``state``, so ``state_dict`` saves it and FSDP2 shards it).

* **LookSAM reuse** (Liu et al., CVPR 2022, "Towards Efficient and Scalable Sharpness-Aware
  Minimization"), ``reuse="looksam"``: on a sharpness step it stores the part of ``g_s``
  orthogonal to ``g``, ``g_v = g_s - (<g, g_s> / ||g||^2) g``, and steps with ``g_s``; on a plain
  step it steps with ``g + reuse_alpha * ||g|| / ||g_v|| * g_v`` (one forward/backward pass, a
  few multi-tensor kernels), and with ``g`` before the first sharpness step.
* **FriendlySAM's momentum** (Li et al., CVPR 2024), ``variant="friendly"``: after every step,
  ``m <- lmbda m + (1 - lmbda) g`` with the step's first-pass gradient (the kept ``g`` after a
  sharpness step, the plain gradient after a plain one; ``m = g`` for a tensor's first
  gradient), the EMA its direction ``g - sigma m`` reads (:mod:`zsharp_algos.variants`).
* **GSAM** (Zhuang et al., ICLR 2022, "Surrogate Gap Guided Sharpness-Aware Minimization"),
  ``variant="gsam"``: on a sharpness step it steps with ``g_s - alpha * g_perp``, where
  ``g_perp = g - (<g, g_s> / ||g_s||^2) g_s`` is the part of ``g`` orthogonal to ``g_s``; plain
  steps are plain. With ``D = g - g_s`` (which :func:`decompose` leaves in the kept buffer) that is
  ``(1 - alpha + alpha <g, g_s> / ||g_s||^2) g_s - alpha D``: two multi-tensor kernels.

Inner products and norms are over all tensors the rule applies to (every group with the rule),
completed across the shard group under FSDP2 in one collective. :func:`decompose` is the piece
every rule that splits one gradient against another shares: it writes ``a - b`` where asked and
returns ``<a, b>`` by the polarization identity ``(||a||^2 + ||b||^2 - ||a - b||^2) / 2``, from
three multi-tensor norms (a per-tensor dot product would be one kernel per tensor).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Sequence

import torch
from torch import Tensor

from ._tensors import group_by_device_dtype
from .options import KEY_PREFIX, OPTIONS
from .order_stats import reads_host
from .placement import WorkBuffer
from .sharding import Shards, local, shards_of
from .stats import squared_norm

__all__ = [
    "OwnState", "FirstPassGradients", "decompose", "squared_norms", "add_scaled", "Rule", "FriendlyMomentum",
    "LookSAMReuse", "GSAMUpdate",
    "REUSE_KEY", "FRIENDLY_KEY",
]

REUSE, REUSE_ALPHA = OPTIONS["reuse"].key, OPTIONS["reuse_alpha"].key
VARIANT, ALPHA, LMBDA = OPTIONS["variant"].key, OPTIONS["alpha"].key, OPTIONS["lmbda"].key
#: The optimizer-state key of FriendlySAM's ``m`` (shaped and sharded as the parameter).
FRIENDLY_KEY = "sharpness_friendly_m"
#: The optimizer-state key of LookSAM's ``g_v`` (one tensor per parameter, shaped and sharded as it).
REUSE_KEY = "sharpness_looksam_gv"


# --------------------------------------------------------------------------- shared pieces
class OwnState:
    """The optimizer's ``state`` as the rules see it at one base step: entries of their own
    (``sharpness_*`` keys) beside the base optimizer's. Torch's optimizers create their state
    lazily, when a parameter's entry is empty (Adam's ``exp_avg``): an entry of ours made
    before the base optimizer's first step must stay out of its sight for that step
    (:meth:`hidden`)."""

    def __init__(self, state: dict):
        self.state = state
        self._created: list[Tensor] = []

    def __getitem__(self, param: Tensor) -> dict:
        return self.state[param]

    def create(self, param: Tensor, key: str) -> Tensor:
        """A zero entry ``key`` for ``param``, shaped (and sharded) as it; its local tensor."""
        self.state[param][key] = torch.zeros_like(param)
        self._created.append(param)
        return local(self.state[param][key])

    @contextmanager
    def hidden(self):
        """Within the block, the entries of ours on parameters the base optimizer has no
        state for are taken out (put back after)."""
        aside = {}
        for p in self._created:
            entry = self.state[p]
            if all(k.startswith(KEY_PREFIX) for k in entry):
                aside[p] = dict(entry)
                entry.clear()
        try:
            yield
        finally:
            for p, mine in aside.items():
                self.state[p].update(mine)
            self._created = []


class FirstPassGradients:
    """The first pass's gradient ``g``, kept from the perturbation to the base step (the
    direction overwrites ``.grad``): one flat buffer per device and dtype, allocated once, a view
    per parameter. Micro-batches of one step add up (each is perturbed by its own gradient; the
    step's ``g`` is their sum, as its ``g_s`` is)."""

    def __init__(self) -> None:
        self._buffer = WorkBuffer()
        self._kept: dict[Tensor, Tensor] = {}  # local parameter -> its view, holding g

    def keep(self, params: Sequence[Tensor], grads: Sequence[Tensor], trainable, accumulate: bool) -> None:
        """``g`` of ``params`` (local tensors) from ``grads``; with ``accumulate``, added to what
        this step kept already."""
        views = self._buffer.views(params, trainable)
        fresh = [(v, g) for p, v, g in zip(params, views, grads) if not (accumulate and p in self._kept)]
        added = [(v, g) for p, v, g in zip(params, views, grads) if accumulate and p in self._kept]
        for pairs, op in ((fresh, torch._foreach_copy_), (added, torch._foreach_add_)):
            for _, (vs, gs) in group_by_device_dtype([v for v, _ in pairs], [g for _, g in pairs]):
                op(vs, gs)
        if not accumulate:
            self._kept = {}
        self._kept.update(zip(params, views))

    def of(self, params: Sequence[Tensor]) -> list[Tensor] | None:
        """The kept ``g`` of ``params`` (local tensors), or None unless every one was kept."""
        views = [self._kept.get(p) for p in params]
        return None if any(v is None for v in views) else views

    def clear(self) -> None:
        """Forget every kept gradient."""
        self._kept = {}


def squared_norms(*lists: Sequence[Tensor], shards: Shards | None = None) -> Tensor:
    """``[||l||^2 for l in lists]`` (1-D: :func:`zsharp_algos.stats.squared_norm` of each), each
    over all its tensors, completed across ``shards`` in one collective."""
    sq = torch.stack([squared_norm(ts) for ts in lists])
    return sq if shards is None else shards.sum_(sq)


def decompose(a: Sequence[Tensor], b: Sequence[Tensor], into: Sequence[Tensor], shards: Shards | None = None):
    """``into <- a - b`` (``into`` may be ``a``) and ``(||a||^2, ||b||^2, <a, b>)`` as 0-dim
    tensors, over all the tensors (whole tensors under FSDP2)."""
    ab = squared_norms(a, b)
    for _, (dst, x, y) in group_by_device_dtype(into, a, b):
        if any(d is not s for d, s in zip(dst, x)):
            torch._foreach_copy_(dst, x)
        torch._foreach_sub_(dst, y)
    sq = torch.cat([ab, squared_norms(into)])
    sq = sq if shards is None else shards.sum_(sq)
    aa, bb, dd = sq.unbind()
    return aa, bb, (aa + bb - dd) / 2


def add_scaled(dsts: Sequence[Tensor], srcs: Sequence[Tensor], coef: Tensor) -> None:
    """``dsts += coef * srcs`` (``coef`` 0-dim), ``srcs`` unchanged: on the CPU strategy one
    ``add_(alpha=...)`` per tensor from the coefficient read once; elsewhere two multi-tensor
    kernels (the scaled copy is transient)."""
    if not dsts:
        return
    if reads_host(dsts[0].device):
        c = coef.item()
        for d, s in zip(dsts, srcs):
            d.add_(s, alpha=c)
        return
    for _, (ds, ss) in group_by_device_dtype(dsts, srcs):
        torch._foreach_add_(ds, torch._foreach_mul(ss, coef.to(ds[0].device)))


def _scale(tensors: Sequence[Tensor], coef: Tensor) -> None:
    for _, (ts,) in group_by_device_dtype(tensors):
        torch._foreach_mul_(ts, coef.to(ts[0].device))


# --------------------------------------------------------------------------- the rules
class Rule:
    """An update rule: which param groups it applies to, and what it does after a sharpness step
    (where those groups were perturbed) and on a plain step. Its per-group weight is the option
    ``weight`` names (``reuse_alpha``, ``lmbda``, ``alpha``)."""

    weight: str = ""

    @staticmethod
    def applies(group: dict) -> bool:
        """Whether the rule applies to param group ``group`` (read from its options)."""
        raise NotImplementedError

    def init_state(self, groups: Sequence[dict], state: OwnState) -> None:
        """Give every tensor of ``groups`` this rule's state entries, for
        ``torch.distributed.checkpoint``'s state initialisation: a load fills only the entries a
        fresh optimizer's state already has. (A rule creates its entries with the first base step,
        so every state that can be saved has them.)"""

    def after_sharpness_step(self, groups: Sequence[dict], state: OwnState, kept: FirstPassGradients) -> None:
        """Nothing, unless the rule says otherwise."""

    def plain_step(self, groups: Sequence[dict], state: OwnState) -> None:
        """Nothing, unless the rule says otherwise."""

    def _weighted(self, groups: Sequence[dict]) -> list[tuple[Tensor, float]]:
        """The groups' tensors that have a gradient, each with its group's weight."""
        return [(p, g[self.weight]) for g in groups for p in g["params"] if p.grad is not None]

    @staticmethod
    def _by_weight(weighted: Sequence[tuple[Tensor, float]], index: Sequence[int] | None = None):
        """``(weight, indices)`` for each weight among ``weighted`` (at ``index``): groups may
        weigh differently, and each weight is a scalar of the multi-tensor kernels."""
        index = range(len(weighted)) if index is None else index
        for value in sorted({weighted[i][1] for i in index}):
            yield value, [i for i in index if weighted[i][1] == value]


class FriendlyMomentum(Rule):
    """FriendlySAM's ``m`` (module doc), an EMA of the first-pass gradients of every step: with
    the kept ``g`` after a sharpness step (read, and left for the rules after this one), with
    the step's gradient after a plain one (its only pass). A tensor's first gradient is its
    ``m``, so ``m`` exists from the first step on. Applies to the groups with
    ``variant="friendly"``."""

    weight = LMBDA

    @staticmethod
    def applies(group: dict) -> bool:
        return group.get(VARIANT) == "friendly"  # the core SharpnessAwareOptimizer has no variant

    def init_state(self, groups, state):
        """``m`` zero (the zero gradients of that step)."""
        for p in (p for g in groups for p in g["params"] if p.requires_grad):
            if FRIENDLY_KEY not in state[p]:
                state.create(p, FRIENDLY_KEY)

    @torch.no_grad()
    def after_sharpness_step(self, groups, state, kept):
        tensors = self._weighted(groups)
        g = kept.of([local(p) for p, _ in tensors])
        if g is not None:  # perturbed this step
            self._update(tensors, g, state)

    @torch.no_grad()
    def plain_step(self, groups, state):
        tensors = self._weighted(groups)
        self._update(tensors, [local(p.grad) for p, _ in tensors], state)

    def _update(self, tensors, g, state):
        """``m <- lmbda m + (1 - lmbda) g``, and ``m = g`` for a tensor without one yet."""
        fresh = [i for i, (p, _) in enumerate(tensors) if FRIENDLY_KEY not in state[p]]
        new = [state.create(tensors[i][0], FRIENDLY_KEY) for i in fresh]
        for _, (ms, gs) in group_by_device_dtype(new, [g[i] for i in fresh]):
            torch._foreach_copy_(ms, gs)
        made = set(fresh)
        old = [i for i in range(len(tensors)) if i not in made]
        for lmbda, mine in self._by_weight(tensors, old):
            ms = [local(state[tensors[i][0]][FRIENDLY_KEY]) for i in mine]
            for _, (m, gs) in group_by_device_dtype(ms, [g[i] for i in mine]):
                torch._foreach_mul_(m, lmbda)
                torch._foreach_add_(m, gs, alpha=1 - lmbda)


class LookSAMReuse(Rule):
    """LookSAM's reuse of the sharpness gradient's orthogonal part (module doc). Applies to the
    param groups with ``reuse="looksam"``; ``g_v`` lives in ``state[p][REUSE_KEY]``."""

    weight = REUSE_ALPHA

    @staticmethod
    def applies(group: dict) -> bool:
        return group[REUSE] == "looksam"

    def init_state(self, groups, state):
        """``g_v`` zero: adding ``alpha ||g|| / ||g_v|| g_v`` is then adding nothing, as before the
        first sharpness step."""
        for p in (p for g in groups for p in g["params"] if p.requires_grad):
            if REUSE_KEY not in state[p]:
                state.create(p, REUSE_KEY)

    @staticmethod
    def _g_v(params, state) -> list[Tensor]:
        """Each tensor's ``g_v``, zero where it has none yet (created with the first base step)."""
        return [local(state[p][REUSE_KEY]) if REUSE_KEY in state[p] else state.create(p, REUSE_KEY) for p in params]

    @torch.no_grad()
    def after_sharpness_step(self, groups, state, kept):
        """``g_v = g_s - (<g, g_s> / ||g||^2) g`` into the state, from ``.grad`` (``g_s``) and the
        kept ``g``, which is used up as scratch. ``.grad`` is left as it is."""
        params = [p for p, _ in self._weighted(groups)]
        g = kept.of([local(p) for p in params])
        if not params or g is None:  # not perturbed this step (no gradient at the first pass)
            return
        v = self._g_v(params, state)
        g_s = [local(p.grad) for p in params]
        _, gg, dot = decompose(g_s, g, into=v, shards=shards_of(params))  # v <- g_s - g
        projection = torch.where(gg > 0, dot / gg, torch.zeros_like(gg))
        _scale(g, 1 - projection)  # g <- (1 - <g, g_s>/||g||^2) g ...
        for _, (vs, gs) in group_by_device_dtype(v, g):
            torch._foreach_add_(vs, gs)  # ... v <- g_s - g + that = g_v
        kept.clear()

    @torch.no_grad()
    def plain_step(self, groups, state):
        """``g <- g + reuse_alpha * ||g|| / ||g_v|| * g_v`` in ``.grad`` (``g_v`` zero before the
        first sharpness step: plain ``g``)."""
        tensors = self._weighted(groups)
        if not tensors:
            return
        params = [p for p, _ in tensors]
        g = [local(p.grad) for p in params]
        v = self._g_v(params, state)
        gg, vv = squared_norms(g, v, shards=shards_of(params)).unbind()
        ratio = torch.where(vv > 0, (gg / vv).sqrt(), torch.zeros_like(gg))  # g_v = 0: nothing to add
        for alpha, mine in self._by_weight(tensors):
            add_scaled([g[i] for i in mine], [v[i] for i in mine], alpha * ratio)


class GSAMUpdate(Rule):
    """GSAM's step (module doc). Applies to the param groups with ``variant="gsam"``."""

    weight = ALPHA

    @staticmethod
    def applies(group: dict) -> bool:
        return group.get(VARIANT) == "gsam"  # the core SharpnessAwareOptimizer has no variant

    @torch.no_grad()
    def after_sharpness_step(self, groups, state, kept):
        """``.grad <- g_s - alpha * g_perp`` from ``.grad`` (``g_s``) and the kept ``g``, which is
        used up as scratch."""
        tensors = self._weighted(groups)
        params = [p for p, _ in tensors]
        g = kept.of([local(p) for p in params])
        if not params or g is None:  # not perturbed this step
            return
        g_s = [local(p.grad) for p in params]
        _, ss, dot = decompose(g, g_s, into=g, shards=shards_of(params))  # g <- D = g - g_s
        along = torch.where(ss > 0, dot / ss, torch.zeros_like(ss))  # <g, g_s> / ||g_s||^2
        for alpha, mine in self._by_weight(tensors):
            _scale([g_s[i] for i in mine], 1 - alpha + alpha * along)
            for _, (gs, ds) in group_by_device_dtype([g_s[i] for i in mine], [g[i] for i in mine]):
                torch._foreach_add_(gs, ds, alpha=-alpha)
        kept.clear()
