r"""Sharpness-aware optimizers: a base-optimizer wrapper shared by SAM and ZSharp.

One sharpness step, for a base optimizer ``base`` and an ascent direction ``d(g)``
(:mod:`zsharp_algos.directions`)::

    g  = grad L(w)                      # first pass (closure call 1)
    e  = rho * T^2 d(g) / ||T d(g)||    # T = |w| if adaptive else 1
    w' = w + e                          # w itself is kept aside, untouched
    g' = grad L(w')                     # second pass (closure call 2)
    w  = the kept w                     # exact restore (never w' - e), in a finally
    base.step() with g'                 # momentum, weight decay, LR: all the base optimizer's

With ``interval=k`` only every k-th step is a sharpness step; the others are plain base steps
that call the closure once.

Where ``w'`` lives: in :meth:`~SharpnessAwareOptimizer.step` the first-pass gradient is dead once
``e`` is formed, so ``w' = e + w`` is built in the gradient's own memory (SAM) or in the
parameter-sized buffer the direction keeps anyway (ZSharp's |z|, dead by then; the gradients are
freed) and the parameter is pointed at it (``p.data = w'``); restoring points it back. SAM then
keeps no buffer between steps, and neither pays the copy back. A parameter whose storage
anything else can see (a view, or a tensor other tensors view, such as a flat buffer behind the
model's weights) or whose gradient is not its own plain tensor (DDP's
``gradient_as_bucket_view``) is never re-pointed: its weights are saved to a persistent flat
buffer, perturbed in place and copied back.
The direction's own work is streamed in chunks (ZSharp keeps |z| in that flat buffer).
"""
from __future__ import annotations

from contextlib import nullcontext
from functools import lru_cache
from typing import Any, Callable, Iterable

import torch
from torch import Tensor, nn

from ._tensors import group_by_device_dtype
from .batchnorm import frozen_norm_stats
from .directions import Direction, GradientDirection, ZScoreDirection

__all__ = ["SharpnessAwareOptimizer", "SAM", "ZSharp"]

Closure = Callable[[], Any]


class SharpnessAwareOptimizer(torch.optim.Optimizer):
    """Wraps a base optimizer and perturbs the weights along ``direction`` before its step.

    Two ways to build one (both used in the wild)::

        SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)  # class + kwargs
        SAM(torch.optim.AdamW(model.parameters(), lr=1e-3), rho=0.05)            # an instance

    Args:
        params_or_optimizer: parameters (or param groups) together with ``base_optimizer``, or
            an already constructed ``torch.optim.Optimizer`` to wrap.
        base_optimizer: optimizer class, when ``params_or_optimizer`` holds parameters.
        direction: the ascent direction (see :mod:`zsharp_algos.directions`).
        rho: radius of the perturbation, ``>= 0`` (0 makes every step a plain base step's
            equivalent, at twice the cost).
        interval: a sharpness step every ``interval``-th step (steps ``interval``,
            ``2*interval``, ... counting from 1); the others call the closure once.
        adaptive: ASAM-style element-wise scaling ``T = |w|``; use a larger ``rho`` (0.5 to 2).
        eps: added to the norm that divides ``rho``.
        max_grad_norm: if set, clip the gradient the base optimizer uses (the second pass's on
            sharpness steps) to this global norm right before the base step.
        model: if given, BatchNorm running statistics are not updated by the second pass of
            :meth:`step` (see :func:`zsharp_algos.frozen_norm_stats`).
        **base_kwargs: passed to ``base_optimizer``.
    """

    # Composer's trainer passes closures under fp16 only to optimizers that set this.
    _step_supports_amp_closure = True

    def __init__(
        self,
        params_or_optimizer: Iterable | torch.optim.Optimizer,
        base_optimizer: type[torch.optim.Optimizer] | None = None,
        *,
        direction: Direction | None = None,
        rho: float = 0.05,
        interval: int = 1,
        adaptive: bool = False,
        eps: float = 1e-12,
        max_grad_norm: float | None = None,
        model: nn.Module | None = None,
        **base_kwargs,
    ):
        _check_hparams(rho=rho, interval=interval, eps=eps, max_grad_norm=max_grad_norm)
        if isinstance(params_or_optimizer, SharpnessAwareOptimizer):
            raise TypeError("cannot wrap a sharpness-aware optimizer in another one")
        if isinstance(params_or_optimizer, torch.optim.Optimizer):
            if base_optimizer is not None or base_kwargs:
                raise TypeError(
                    "pass either an optimizer instance, or parameters + base_optimizer class + its kwargs, not both"
                )
            base = params_or_optimizer
        else:
            if not (isinstance(base_optimizer, type) and issubclass(base_optimizer, torch.optim.Optimizer)):
                raise TypeError(
                    "base_optimizer must be a torch.optim.Optimizer subclass such as torch.optim.SGD, "
                    f"got {base_optimizer!r} (or pass an optimizer instance instead of parameters)"
                )
            base = base_optimizer(params_or_optimizer, **base_kwargs)
        self.base_optimizer = base
        self.direction = direction if direction is not None else GradientDirection()
        self.rho, self.interval, self.adaptive, self.eps = float(rho), int(interval), bool(adaptive), float(eps)
        self.max_grad_norm = max_grad_norm
        self.model = model
        # Base steps taken (host-side int: the interval phase; saved in state_dict). Steps skipped
        # for overflow are not counted; frameworks with their own step counter set it from that.
        self.step_count = 0
        self._backup: dict[Tensor, Tensor] = {}  # param -> saved weights (views of flat buffers)
        self._flat_backups: dict[tuple[torch.device, torch.dtype], Tensor] = {}  # the flat buffers
        self._perturbed: list[Tensor] = []  # perturbed in place: restored by copying from _backup
        self._kept: list[tuple[Tensor, Tensor]] = []  # (param, its own weights) while it points at w'
        # Share param_groups and state with the base: LR schedulers, grad clipping and
        # framework code that inspects the optimizer see (and change) the base's. The base's
        # groups are passed to Optimizer.__init__ only to set up its hooks and profiling.
        super().__init__([dict(g) for g in base.param_groups], {})
        self.defaults = dict(base.defaults, rho=self.rho, interval=self.interval, adaptive=self.adaptive)
        self.param_groups = base.param_groups
        self.state = base.state

    # ------------------------------------------------------------------ the step
    def is_sharpness_step(self) -> bool:
        """Whether the next :meth:`step` perturbs (``interval``-th steps, counting from 1)."""
        return (self.step_count + 1) % self.interval == 0

    @torch.no_grad()
    def step(self, closure: Closure | None = None):
        """One optimization step. ``closure`` must zero the gradients, run forward and backward,
        and return the loss; it is called twice on sharpness steps (once otherwise). A closure
        returning ``None`` (a grad scaler saw inf/NaN) skips the step, weights untouched.
        Returns the first pass's loss."""
        if closure is None:
            raise TypeError(
                f"{type(self).__name__}.step() needs a closure (zero_grad + forward + backward + return loss) "
                "because it evaluates the loss twice; or call first_step() and second_step() around your "
                "second forward/backward"
            )
        closure = torch.enable_grad()(closure)
        sharp = self.is_sharpness_step()
        loss = closure()
        if loss is None:
            return None
        if sharp:
            self.first_step(zero_grad=True)
            try:
                with frozen_norm_stats(self.model) if self.model is not None else nullcontext():
                    second = closure()
            finally:
                self.restore()
            if second is None:
                return None
        self._base_step()
        return loss

    @torch.no_grad()
    def first_step(self, zero_grad: bool = True) -> None:
        """Move the weights to ``w + e``, keeping ``w`` for :meth:`restore`. With ``zero_grad``
        (the default: the second backward must not add to them) the gradients are set to
        ``None`` and their memory may hold ``w + e``; otherwise they hold ``e`` afterwards."""
        if self._perturbed or self._kept:
            raise RuntimeError("first_step() called twice without second_step() or restore() in between")
        params, grads = self._params_with_grad()
        if params:
            storage = None
            if self.direction.uses_storage:
                # Until the weights are saved, the float32 flat buffer is free working memory.
                self._backup_buffers(params)
                storage = self._flat_backups.get((grads[0].device, torch.float32))
                if storage is not None and storage.numel() < sum(g.numel() for g in grads):
                    storage = None
            norms = self.direction(params, grads, adaptive=[self.adaptive] * len(grads), storage=storage)
            coefs = list((self.rho / (norms + self.eps)).unbind())
            try:
                self._perturb(params, grads, coefs, repoint=zero_grad)
            except BaseException:
                self.restore()  # never leave some weights perturbed
                raise
        if zero_grad:
            self.zero_grad(set_to_none=True)

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """Restore the saved weights exactly and take the base optimizer's step."""
        self.restore()
        self._base_step()
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def restore(self) -> None:
        """Put the weights back exactly as they were before :meth:`first_step` (a no-op when
        not perturbed)."""
        for p, own in reversed(self._kept):
            p.data = own
        self._kept = []
        _foreach_grouped(torch._foreach_copy_, self._perturbed, [self._backup[p] for p in self._perturbed])
        self._perturbed = []

    def _base_step(self) -> None:
        self.step_count += 1
        if self.max_grad_norm is not None:
            params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
            torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm, foreach=True)
        self.base_optimizer.step()

    def _params_with_grad(self) -> tuple[list[Tensor], list[Tensor]]:
        params, grads = [], []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(
                        f"{type(self).__name__} does not support sparse gradients (e.g. nn.Embedding(sparse=True)); "
                        "use dense gradients"
                    )
                params.append(p)
                grads.append(p.grad)
        return params, grads

    def _perturb(self, params: list[Tensor], grads: list[Tensor], coefs: list[Tensor], repoint: bool) -> None:
        """grads <- e = c * T^2 * d, then w' = w + e in new memory with the parameter re-pointed
        at it, where ``repoint`` allows and nothing else shares the parameter's storage: the
        gradient's own memory, or the flat buffer's when the direction keeps one anyway (ZSharp's
        |z|, dead by now: the gradients are then freed before the second backward, so the peak
        stays one parameter-sized buffer above SGD's). Otherwise w is saved to the flat buffer
        and perturbed in place. Multi-tensor kernels per device/dtype. (Forming e first costs a
        pass over the gradients, but keeps ``w' = w + e`` exact for every caller; a fused
        ``w + c * d`` rounds differently.)"""
        for idx, (ps, gs) in group_by_device_dtype(params, grads):
            if self.adaptive:
                torch._foreach_mul_(gs, ps)
                torch._foreach_mul_(gs, ps)
            cs = [coefs[i] for i in idx]
            if all(c is cs[0] for c in cs):
                torch._foreach_mul_(gs, cs[0])
            else:
                torch._foreach_mul_(gs, cs)
        into_buffer = self.direction.uses_storage
        movable = [repoint and _may_repoint(p, None if into_buffer else g) for p, g in zip(params, grads)]
        in_place = [(p, g) for p, g, m in zip(params, grads, movable) if not m]
        moved = [(p, g) for p, g, m in zip(params, grads, movable) if m]
        # w goes to the flat buffer: to be restored from (in place), or as the base of w' (into_buffer)
        saved = in_place + (moved if into_buffer else [])
        buffers = self._backup_buffers([p for p, _ in saved]) if saved else []
        _foreach_grouped(torch._foreach_copy_, buffers[: len(in_place)], [p for p, _ in in_place])
        _foreach_grouped(torch._foreach_add_, [p for p, _ in in_place], [g for _, g in in_place])
        self._perturbed = [p for p, _ in in_place]
        if into_buffer:  # w' = w + e in the buffer
            targets = buffers[len(in_place) :]
            _sum_into(targets, [p for p, _ in moved], [g for _, g in moved])
        else:  # w' = e + w (the same float) in the gradient
            targets = [g for _, g in moved]
            _foreach_grouped(torch._foreach_add_, targets, [p for p, _ in moved])
        for (p, _), w_prime in zip(moved, targets):
            self._kept.append((p, p.data))
            p.data = w_prime

    def _backup_buffers(self, params: list[Tensor]) -> list[Tensor]:
        """The persistent save buffer: one flat tensor per device/dtype, views per parameter.
        Allocated once for every trainable parameter (so the set of parameters with gradients
        may change between steps without reallocation)."""
        if any(p not in self._backup for p in params):
            trainable = [p for g in self.param_groups for p in g["params"] if p.requires_grad]
            known = set(trainable)
            trainable += [p for p in params if p not in known]
            self._backup, self._flat_backups = {}, {}
            for _, (ps,) in group_by_device_dtype(trainable):
                flat = torch.empty(sum(p.numel() for p in ps), dtype=ps[0].dtype, device=ps[0].device)
                self._flat_backups[(flat.device, flat.dtype)] = flat
                offset = 0
                for p in ps:
                    # the view takes p's strides (channels_last too): _foreach_copy_ is a straight copy
                    view = flat[offset : offset + p.numel()]
                    self._backup[p] = view.view(p.shape) if p.is_contiguous() else view.as_strided(p.shape, p.stride())
                    offset += p.numel()
        return [self._backup[p] for p in params]

    # ------------------------------------------------------------------ plumbing
    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base_optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict) -> None:
        if self.param_groups is not self.base_optimizer.param_groups:  # inside Optimizer.__init__
            return super().add_param_group(param_group)
        self.base_optimizer.add_param_group(param_group)

    def hparams(self) -> dict[str, Any]:
        """The sharpness hyper-parameters (plain Python types)."""
        return {"rho": self.rho, "interval": self.interval, "adaptive": self.adaptive, "eps": self.eps}

    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state dict (momentum etc.) plus a ``"sharpness"`` entry with the
        hyper-parameters and the step counter (so ``interval`` keeps its phase on resume)."""
        sd = self.base_optimizer.state_dict()
        sd["sharpness"] = dict(self.hparams(), direction=self.direction.name, step_count=self.step_count)
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        extra = state_dict.pop("sharpness", None)
        self.base_optimizer.load_state_dict(state_dict)
        if extra is not None:
            if extra.get("direction", self.direction.name) != self.direction.name:
                raise ValueError(
                    f"state dict is from a {extra['direction']!r} optimizer, this one is {self.direction.name!r}"
                )
            self.step_count = int(extra["step_count"])
        # The base may have replaced its state/groups containers: keep sharing them.
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state

    def __getstate__(self):
        return self.__dict__

    def __setstate__(self, state):
        self.__dict__.update(state)

    def __repr__(self) -> str:
        hp = ", ".join(f"{k}={v!r}" for k, v in self.hparams().items())
        return f"{type(self).__name__}({hp}, base={type(self.base_optimizer).__name__})"


def _foreach_grouped(op, dsts: list[Tensor], srcs: list[Tensor]) -> None:
    """``op(dsts, srcs)`` as one multi-tensor kernel per device/dtype group."""
    for _, (ds, ss) in group_by_device_dtype(dsts, srcs):
        op(ds, ss)


def _sum_into(dsts: list[Tensor], xs: list[Tensor], ys: list[Tensor]) -> None:
    """``dsts[i] = xs[i] + ys[i]`` per device/dtype group. On the CPU, whose multi-tensor kernels
    loop over the tensors anyway, one ``out=`` add per tensor reads each operand once; elsewhere
    two multi-tensor kernels (copy, then add) beat a launch per tensor."""
    for _, (ds, a, b) in group_by_device_dtype(dsts, xs, ys):
        if ds[0].device.type == "cpu":
            for d, x, y in zip(ds, a, b):
                torch.add(x, y, out=d)
        else:
            torch._foreach_copy_(ds, a)
            torch._foreach_add_(ds, b)


def _may_repoint(param: Tensor, grad: Tensor | None) -> bool:
    """Whether ``param`` may be pointed at new memory holding ``w'``: it is a plain tensor that
    owns its storage alone (not a view, not a flat buffer the model's weights view). If ``w'`` is
    to be built in ``grad``'s memory, the same holds for ``grad`` (not a DDP bucket view) and it
    has the parameter's layout."""
    if type(param) not in (Tensor, nn.Parameter) or not _sole_owner(param):
        return False
    return grad is None or (type(grad) is Tensor and grad.stride() == param.stride() and _sole_owner(grad))


def _sole_owner(t: Tensor) -> bool:
    if t._base is not None or t.storage_offset() != 0:
        return False
    storage = t.untyped_storage()
    if storage.nbytes() != t.numel() * t.element_size():
        return False
    count = _storage_use_count(storage)
    return count is not None and count == _lone_use_count()


def _storage_use_count(storage) -> int | None:
    """How many tensors share ``storage`` (None where torch does not say)."""
    counter = getattr(torch._C, "_storage_Use_Count", None)
    return None if counter is None else counter(storage._cdata)


@lru_cache(maxsize=None)
def _lone_use_count() -> int | None:
    # what _sole_owner reads for a tensor nothing else refers to (torch versions differ)
    alone = torch.empty(1)
    storage = alone.untyped_storage()
    return _storage_use_count(storage)


def _check_hparams(*, rho, interval, eps, max_grad_norm) -> None:
    if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not rho >= 0:
        raise ValueError(f"rho must be a number >= 0, got {rho!r}")
    if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
        raise ValueError(f"interval must be an integer >= 1 (a sharpness step every interval-th step), got {interval!r}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
        raise ValueError(f"eps must be a number >= 0, got {eps!r}")
    if max_grad_norm is not None and not (isinstance(max_grad_norm, (int, float)) and max_grad_norm > 0):
        raise ValueError(f"max_grad_norm must be a positive number or None, got {max_grad_norm!r}")


class SAM(SharpnessAwareOptimizer):
    """Sharpness-Aware Minimization (Foret et al., 2021): ``e = rho * g / ||g||``.

    ``adaptive=True`` gives ASAM (Kwon et al., 2021): ``e = rho * |w|^2 g / || |w| g ||``.
    See :class:`SharpnessAwareOptimizer` for the arguments.
    """

    def __init__(self, params_or_optimizer, base_optimizer=None, **kwargs):
        if "direction" in kwargs:
            raise TypeError("SAM always ascends along the gradient; use SharpnessAwareOptimizer for other directions")
        super().__init__(params_or_optimizer, base_optimizer, direction=GradientDirection(), **kwargs)


class ZSharp(SharpnessAwareOptimizer):
    """ZSharp (arXiv 2505.02369): SAM whose ascent direction keeps only the gradient entries with
    significant layer-wise z-scores.

    Args:
        percentile: in (0, 100), default 70: the share of entries whose |z| falls below the cut.
        scope: ``"global"`` (default; one threshold over all tensors, then SAM's global-norm
            scaling, as the seed README implementation) or ``"tensor"`` (the paper's official code:
            a threshold and a normalisation per tensor with ``ndim > 1``). The paper's settings are
            ``ZSharp(params, torch.optim.Adam, rho=0.05, percentile=95, scope="tensor", lr=1e-3)``.
        other arguments: as :class:`SharpnessAwareOptimizer`.

    See :mod:`zsharp_algos.directions` for the exact definitions.
    """

    def __init__(self, params_or_optimizer, base_optimizer=None, *, percentile: float = 70.0, scope: str = "global", **kwargs):
        if "direction" in kwargs:
            raise TypeError("ZSharp's direction is set by percentile and scope")
        super().__init__(
            params_or_optimizer, base_optimizer, direction=ZScoreDirection(percentile, scope), **kwargs
        )

    @property
    def percentile(self) -> float:
        return self.direction.percentile

    @property
    def scope(self) -> str:
        return self.direction.scope

    def hparams(self) -> dict[str, Any]:
        return dict(super().hparams(), percentile=self.percentile, scope=self.scope)
