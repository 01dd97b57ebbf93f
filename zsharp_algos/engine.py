r"""The perturbation engine: ``w -> w + e`` over the param groups due this step, and back.

For the tensors of the groups due at step ``t`` (``rho > 0`` and due by their interval,
:mod:`zsharp_algos.schedule`)::

    d, nu = direction(g)               # the ascent direction and the norm that scales each tensor
    e_i   = rho_i * T_i^2 * d_i / (nu_i + eps_i)     # T = |w| for adaptive groups, else 1
    w_i  <- w_i + e_i                  # placement: re-pointed or in place (zsharp_algos.placement)

and :meth:`PerturbationEngine.restore` puts every ``w`` back bitwise. ``e`` is formed in the
gradients' memory (they are not needed afterwards: the second pass recomputes them). The formula
lives here once; SAM, ZSharp and any future variant differ only in their :class:`~zsharp_algos.directions.Direction`.

Tensors whose groups share the direction's options (ZSharp's ``percentile`` and ``scope``) form
one *pool*: thresholds and norms are computed over the pool, so the usual split into a
weight-decay group and a no-decay group still gives one threshold over the whole model. A group
with ``rho=0`` is not perturbed and does not enter any norm.

Used by :class:`~zsharp_algos.SharpnessAwareOptimizer` (``step(closure)``, ``first_step``), the
two-pass backward of framework integrations, and the single-pass Hugging Face callback.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from ._tensors import group_by_device_dtype
from .directions import Direction
from .options import OPTIONS, GroupOptions
from .placement import Placement
from .schedule import sharpness_due
from .variants import StateView
from .sharding import local, shards_of
from .stats import SharpnessStats

__all__ = ["PerturbationEngine", "group_due", "coefficients"]

# the param-group keys the engine reads (zsharp_algos.options)
RHO, INTERVAL, ADAPTIVE, EPS = (OPTIONS[n].key for n in ("rho", "interval", "adaptive", "perturb_eps"))
MODE, SEED = OPTIONS["interval_mode"].key, OPTIONS["interval_seed"].key


def group_due(group: dict, step: int) -> bool:
    """Whether param group ``group`` is perturbed at step ``step`` (0-based): ``rho > 0`` and due
    by its interval (:func:`zsharp_algos.schedule.sharpness_due`)."""
    return group[RHO] > 0 and sharpness_due(step, group[INTERVAL], group[MODE], group[SEED])


@lru_cache(maxsize=64)
def _device_floats(values: tuple[float, ...], device: torch.device, dtype: torch.dtype) -> Tensor:
    # per-tensor rho / eps, built once per layout (a pageable host-to-device copy would wait)
    return torch.tensor(values, dtype=dtype, device=device)


class PerturbationEngine:
    """Perturbs and restores the parameters of ``owner.param_groups``.

    Args:
        owner: the optimizer whose ``param_groups`` (with the option keys ``sharpness_rho``,
            ``sharpness_interval``, ``sharpness_adaptive``, ``sharpness_perturb_eps`` and the
            direction's own) say what to perturb.
        direction: ``direction(**options)`` builds the :class:`~zsharp_algos.directions.Direction` for a pool, given the
            values of ``direction_options`` its groups share.
        direction_options: names of the options the direction takes.
        options: the :class:`~zsharp_algos.options.GroupOptions` that checks the groups' values
            each time they are read (a value set mid-run is checked before it is used).
        record_stats: record :mod:`statistics <zsharp_algos.stats>` of every ``e`` into
            :attr:`stats` (a few multi-tensor reductions per perturbation; no host sync).

    Attributes:
        stats: the :class:`~zsharp_algos.SharpnessStats` the perturbations are recorded into.
    """

    def __init__(
        self,
        owner: Any,
        direction: Callable[..., Direction],
        direction_options: Sequence[str] = (),
        *,
        record_stats: bool = True,
        placement: Placement | None = None,
        options: GroupOptions,
    ):
        self.owner = owner
        self.options = options
        self._make_direction = direction
        self._direction_options = tuple(direction_options)
        self._direction_keys = tuple(OPTIONS[name].key for name in self._direction_options)
        self._directions: dict[tuple, Direction] = {}
        self.placement = placement if placement is not None else Placement()
        self.record_stats = bool(record_stats)
        self.stats = SharpnessStats()

    # ------------------------------------------------------------------ queries
    def groups_due(self, step: int) -> list[dict]:
        """The param groups perturbed at step ``step`` (every group's options checked first)."""
        groups = self.owner.param_groups
        self.options.check(groups)
        return [g for g in groups if group_due(g, step)]

    def is_due(self, step: int) -> bool:
        """Whether anything is perturbed at step ``step``."""
        return bool(self.groups_due(step))

    @property
    def perturbed(self) -> bool:
        """Whether the weights are at ``w + e`` now."""
        return self.placement.active

    def trainable(self) -> list[Tensor]:
        """The parameters of every param group that require a gradient."""
        return [p for g in self.owner.param_groups for p in g["params"] if p.requires_grad]

    def direction_for(self, group: dict) -> Direction:
        """The direction for ``group``'s options: one per distinct set of the options a
        direction reads, made on first use."""
        key = tuple(group[k] for k in self._direction_keys)
        if key not in self._directions:
            self._directions[key] = self._make_direction(**dict(zip(self._direction_options, key)))
        return self._directions[key]

    # ------------------------------------------------------------------ the work
    @torch.no_grad()
    def perturb(self, step: int, *, free_grads: bool) -> bool:
        """``w <- w + e`` for the groups due at ``step``, from the gradients in ``.grad``;
        returns whether anything was perturbed. Afterwards the gradients hold ``e``, or, with
        ``free_grads`` (the caller sets them to ``None`` right after), their memory may hold
        ``w + e``. Raises before any weight changes on bad input (sparse gradients, ...)."""
        if self.placement.active:
            raise RuntimeError(
                "the weights are already perturbed (first_step() ran): finish the step with second_step() "
                "or restore() before perturbing again"
            )
        pools: dict[int, tuple[Direction, list[Tensor], list[Tensor], list[dict]]] = {}
        for group in self.groups_due(step):
            direction = self.direction_for(group)
            _, params, grads, owners = pools.setdefault(id(direction), (direction, [], [], []))
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(
                        "sharpness-aware optimizers do not support sparse gradients "
                        "(e.g. nn.Embedding(sparse=True)); use dense gradients"
                    )
                params.append(p)
                grads.append(p.grad)
                owners.append(group)
        pools = {k: v for k, v in pools.items() if v[1]}
        if not pools:
            return False
        # FSDP2 (zsharp_algos.sharding): the math runs on the local shards, every statistic over
        # a tensor or the model is completed across the shard group, and the weights are
        # perturbed in place (FSDP all-gathers the next forward's weights from the shard itself).
        shards = shards_of([p for _, ps, _, _ in pools.values() for p in ps])
        states = {k: StateView(self.owner.state, ps) for k, (_, ps, _, _) in pools.items()}
        pools = {k: (d, [local(p) for p in ps], [local(g) for g in gs], o) for k, (d, ps, gs, o) in pools.items()}
        all_params, all_grads, all_coefs = [], [], []
        recorded = []  # per pool: grad_sq, e_sq, kept, numel
        # The weights are untouched until placement: an error in a direction leaves them as they were.
        into_buffer = False
        offset = 0
        for key, (direction, params, grads, owners) in pools.items():
            storage = None
            if direction.uses_storage:
                numel = sum(g.numel() for g in grads)
                storage = self.placement.scratch(params, self.trainable_local, numel)
                into_buffer = True
            adaptive = [o[ADAPTIVE] for o in owners]
            pool_shards = None if shards is None else shards.sub(shards.numels[offset : offset + len(params)])
            offset += len(params)
            ascent = direction(
                params, grads, adaptive=adaptive, storage=storage, shards=pool_shards, stats=self.record_stats,
                state=states[key],
            )
            coefs = coefficients(owners, ascent.norms)
            if any(adaptive):  # T^2 d: e's shape, the coefficient still to apply
                _times_weights_squared(params, grads, adaptive)
            if self.record_stats:
                recorded.append(_perturbation_stats(ascent, coefs, grads, any(adaptive), pool_shards))
            all_params += params
            all_grads += grads
            all_coefs += _per_tensor(coefs, len(params))
        if self.record_stats:
            self.stats.add_perturbation(*(sum(parts[i] for parts in recorded) for i in range(4)))
        self.placement.apply(
            all_params, all_grads, all_coefs, self.trainable_local,
            may_move=free_grads and shards is None, into_buffer=into_buffer, keep_e=not free_grads,
        )
        return True

    def trainable_local(self) -> list[Tensor]:
        """The trainable parameters as this process holds them (the local shards under FSDP2):
        what a work buffer spans."""
        return [local(p) for p in self.trainable()]

    def restore(self) -> None:
        """Put the weights back exactly (a no-op when not perturbed)."""
        self.placement.restore()


def coefficients(owners: list[dict], norms: Tensor) -> Tensor:
    """``rho_i / (nu_i + eps_i)`` for the tensors of a pool: a 0-dim tensor where one norm and
    one ``rho`` and ``eps`` serve every tensor (SAM, the global scope), else one per tensor."""
    rhos = [o[RHO] for o in owners]
    epss = [o[EPS] for o in owners]
    uniform_norm = norms.dim() == 0 or norms.stride(0) == 0
    if uniform_norm and len(set(rhos)) == 1 and len(set(epss)) == 1:
        return rhos[0] / (norms.reshape(-1)[0] + epss[0])
    device, dtype = norms.device, norms.dtype
    rho = rhos[0] if len(set(rhos)) == 1 else _device_floats(tuple(rhos), device, dtype)
    eps = epss[0] if len(set(epss)) == 1 else _device_floats(tuple(epss), device, dtype)
    return rho / (norms.expand(len(owners)) + eps)


def _per_tensor(coefs: Tensor, n: int) -> list[Tensor]:
    return [coefs] * n if coefs.dim() == 0 else list(coefs.unbind())


def _times_weights_squared(params: list[Tensor], grads: list[Tensor], adaptive: list[bool]) -> None:
    """``grads_i <- |w_i|^2 d_i`` (as ``w * w * d``) for ASAM's tensors, multi-tensor kernels."""
    a_p = [p for p, a in zip(params, adaptive) if a]
    a_g = [g for g, a in zip(grads, adaptive) if a]
    for _, (gs, ps) in group_by_device_dtype(a_g, a_p):
        torch._foreach_mul_(gs, ps)
        torch._foreach_mul_(gs, ps)


def _perturbation_stats(ascent, coefs: Tensor, grads: list[Tensor], adaptive: bool, shards) -> tuple:
    """``(||g||^2, ||e||^2, kept entries, entries)`` of a pool, from what the direction reported:
    ``||e_i|| = c_i ||d_i||``, and ``||d_i||`` is the norm that divides it unless the direction
    says otherwise. ASAM's ``||T^2 d||`` is measured (the gradients hold it now)."""
    numel = sum(g.numel() for g in grads) if shards is None else sum(shards.numels)
    kept = numel if ascent.kept is None else ascent.kept
    if adaptive:
        sq = _squares(grads, coefs.dtype, shards)
    elif ascent.d_sq is not None:
        sq = ascent.d_sq
    else:  # one norm divides every tensor and is the norm of d over them all
        sq = None
    if sq is None:
        e_sq = (coefs.reshape(-1)[0] * ascent.norms.reshape(-1)[0]).square() if coefs.dim() == 0 else None
        if e_sq is None:  # several rho / eps over one norm: ||d_i|| per tensor, from d itself
            sq = _squares(grads, coefs.dtype, shards)
    if sq is not None:
        e_sq = (coefs.square() * sq).sum() if coefs.dim() else coefs.square() * sq.sum()
    return ascent.grad_sq, e_sq, kept, numel


def _squares(tensors: list[Tensor], dtype: torch.dtype, shards) -> Tensor:
    """``||t_i||^2`` per tensor (whole tensors: completed across ``shards``), in ``dtype``."""
    out: list[Tensor] = [None] * len(tensors)  # type: ignore[list-item]
    for idx, (ts,) in group_by_device_dtype(tensors):
        for i, n in zip(idx, torch._foreach_norm(ts, 2, dtype=torch.float64 if dtype == torch.float64 else torch.float32)):
            out[i] = n
    sq = torch.stack([n.to(dtype) for n in out]).square()
    return sq if shards is None else shards.sum_(sq)
