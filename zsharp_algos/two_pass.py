r"""Sharpness-aware steps inside a training framework that owns backward and ``step()``.

The core :class:`~zsharp_algos.SharpnessAwareOptimizer` runs both passes itself through a
closure. Frameworks such as the Hugging Face ``Trainer`` and ``accelerate`` loops own the
backward pass instead (loss scaling, gradient accumulation, DDP all-reduce, autocast) and then
call ``optimizer.step()`` without a closure, through their own wrappers (loss-scaler checks,
scheduler skipping). :func:`two_pass_backward` serves them all, through the optimizer's public
methods only: it takes the framework's *own* "forward + backward" for a (micro-)batch as
``run_pass`` and, on sharpness steps, runs::

    held = gradients accumulated so far (earlier micro-batches); .grad <- None
    with no_sync(model): run_pass()          # first pass: local to this rank, forward inside
    unscale, and check for inf/NaN           # under fp16 loss scaling only
    optimizer.first_step()                   # w <- w + e(g); w kept; the first gradient dropped
    .grad <- held
    with frozen BatchNorm stats: run_pass()  # second pass: the framework's stock path
    optimizer.restore()                      # exact, in a finally

so each micro-batch is perturbed by its own gradient, the second pass's gradient is accumulated,
all-reduced, unscaled and clipped exactly as the framework would do for plain training, and the
first pass never all-reduces (each rank perturbs with its own gradient, as Composer and the SAM
paper's data-parallel variant do), except where a rule steps with the first pass's gradient
(LookSAM's ``reuse="looksam"``, :attr:`~zsharp_algos.SharpnessAwareOptimizer.first_pass_must_sync`):
then DDP all-reduces every micro-batch's first pass, even inside the framework's ``no_sync``,
so that every rank keeps the same gradient. The framework's ``optimizer.step()`` is then the
optimizer's step without a closure: the base step (with the rules, :mod:`zsharp_algos.rules`).

Under FSDP2 (the parameters are DTensors) the first pass is not ``no_sync``-ed: a rank holds
only its shard of the gradient, which FSDP produces by reduce-scattering the global batch's, so
every rank perturbs along the same, global gradient (:mod:`zsharp_algos.sharding`), and an
overflow seen on any rank skips the perturbation on all of them. A micro-batch the framework runs
under FSDP2's ``no_sync`` (``set_requires_gradient_sync(False)``, what accelerate's and the
Trainer's gradient accumulation do) is reduce-scattered anyway on sharpness steps, both passes:
unsynced, FSDP2 would leave the sharded ``.grad`` empty and keep the first pass's gradient in
its unsharded accumulator, to be reduced into the step's gradient later.

Overflow: if the first pass's gradient has inf/NaN under a loss scaler, no perturbation is made
and the gradient is poisoned (set to inf) *before* the second backward, so the poison travels
through the all-reduce and every rank's scaler skips the step and backs off (and a prepared
scheduler does not step). An overflow in the second pass is caught by the scaler as usual.
Either way the weights are the restored, unperturbed ones.

Memory: the optimizer's work buffer (ZSharp), plus, while the first pass runs during gradient
accumulation, the gradient accumulated so far next to the first pass's own.
"""
from __future__ import annotations

import functools
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any, Callable

import torch
from torch import Tensor, nn

from ._tensors import group_by_device_dtype
from .batchnorm import frozen_norm_stats
from .optimizer import SharpnessAwareOptimizer
from .sharding import is_sharded, local

__all__ = ["two_pass_backward", "find_sharpness_optimizer"]


def find_sharpness_optimizer(optimizer: Any) -> SharpnessAwareOptimizer | None:
    """The :class:`~zsharp_algos.SharpnessAwareOptimizer` in ``optimizer`` (possibly wrapped by a
    framework, e.g. accelerate's ``AcceleratedOptimizer``), or None."""
    for candidate in (optimizer, getattr(optimizer, "optimizer", None)):
        if isinstance(candidate, SharpnessAwareOptimizer):
            return candidate
    return None


def two_pass_backward(
    optimizer: SharpnessAwareOptimizer,
    run_pass: Callable[[], Any],
    model: nn.Module,
    *,
    no_sync: Callable[[], AbstractContextManager] | None = None,
    scaler: Any = None,
) -> Any:
    """Forward and backward for one (micro-)batch: twice on sharpness steps, else once.

    Args:
        optimizer: the sharpness-aware optimizer the framework steps (its ``step()`` without a
            closure is then the base step).
        run_pass: runs the forward pass and the framework's backward (adding to ``.grad``) and
            returns the loss; called inside ``no_sync`` for the first pass.
        model: the model as the framework runs it (the DDP wrapper, if any): its BatchNorm
            statistics are frozen during the second pass.
        no_sync: context-manager factory that disables the gradient all-reduce; default
            ``model.no_sync`` where the model has one (DDP), else nothing.
        scaler: the framework's loss scaler (``torch.amp.GradScaler``-like: ``get_scale()`` and
            ``is_enabled()``), if any: the first pass's gradient is unscaled and checked.

    Returns the first pass's loss (what ``run_pass`` returned at the unperturbed weights).
    """
    if not optimizer.is_sharpness_step():
        return run_pass()
    params = [p for g in optimizer.param_groups for p in g["params"]]
    sharded = any(is_sharded(p) for p in params)
    if sharded:  # FSDP2: only the reduce-scattered first pass gives each rank its shard
        with _fsdp2_gradient_sync(model):
            return _two_passes(optimizer, run_pass, model, params, nullcontext, scaler, sharded)
    if optimizer.first_pass_must_sync:  # a rule steps with g (LookSAM): the same on every rank
        no_sync = functools.partial(_gradient_sync_forced, model)
    elif no_sync is None:
        no_sync = getattr(model, "no_sync", nullcontext)
    return _two_passes(optimizer, run_pass, model, params, no_sync, scaler, sharded)


@contextmanager
def _gradient_sync_forced(model: nn.Module):
    """DDP all-reduces the pass run in the block, also inside an outer ``no_sync`` (the
    micro-batches a framework's gradient accumulation does not sync): the first pass of each
    micro-batch starts from ``.grad = None``, so each is averaged over the ranks on its own and
    the step's first-pass gradient, their sum, is the same on every rank. DDP reads the flag when
    the forward pass starts."""
    flag = getattr(model, "require_backward_grad_sync", None)
    if flag is None:  # not DDP: nothing is skipped
        yield
        return
    model.require_backward_grad_sync = True
    try:
        yield
    finally:
        model.require_backward_grad_sync = flag


@contextmanager
def _fsdp2_gradient_sync(model: nn.Module):
    """FSDP2's gradient reduction on for every ``fully_shard``-ed module of ``model`` during the
    block (as ``set_requires_gradient_sync(True)``), then each put back as it was."""
    groups = []
    for module in model.modules():
        get_state = getattr(module, "_get_fsdp_state", None)
        if not callable(get_state):
            continue  # not a fully_shard-ed module
        group = getattr(get_state(), "_fsdp_param_group", None)
        if group is None:
            continue  # fully_shard-ed without parameters of its own
        if not (hasattr(group, "reduce_grads") and hasattr(group, "all_reduce_grads")):
            # FSDP2's state is read through its (private) param-group flags, which torch 2.7
            # to 2.14 have; without them a no_sync-ed micro-batch would be perturbed wrongly
            raise RuntimeError(
                f"this torch ({torch.__version__}) does not expose FSDP2's gradient-sync flags that sharpness-aware "
                "steps under FSDP2 need; use torch 2.7 to 2.14, or report it to zsharp-algos"
            )
        groups.append((group, group.reduce_grads, group.all_reduce_grads))
    for group, _, _ in groups:
        group.reduce_grads = group.all_reduce_grads = True
    try:
        yield
    finally:
        for group, reduce_grads, all_reduce_grads in groups:
            group.reduce_grads, group.all_reduce_grads = reduce_grads, all_reduce_grads


def _two_passes(optimizer, run_pass, model, params, no_sync, scaler, sharded):
    held = [p.grad for p in params]
    for p in params:
        p.grad = None
    try:
        try:
            with no_sync():
                first = run_pass()
            first_grads = [p.grad for p in params if p.grad is not None]
            scaled = scaler is not None and _is_enabled(scaler)
            overflow = scaled and bool(first_grads) and _unscale_and_check(first_grads, scaler, sharded)
            if not overflow:
                # The first pass's gradient is dead once e is formed: its memory may hold w + e.
                # Earlier micro-batches of this step left gradients: this one's g adds to theirs.
                optimizer.first_step(zero_grad=True, accumulate=any(g is not None for g in held))
        finally:
            for p, g in zip(params, held):
                p.grad = g
        if overflow:
            _poison([p for p in params if p.requires_grad][0])
        with frozen_norm_stats(model):
            second = run_pass()
    finally:
        optimizer.restore()  # exact, whatever happened (a no-op if nothing was perturbed)
    if not overflow:
        optimizer.record_loss_gap(first, second)
    return first


def _is_enabled(scaler: Any) -> bool:
    is_enabled = getattr(scaler, "is_enabled", None)
    return bool(is_enabled()) if callable(is_enabled) else True


@torch.no_grad()
def _unscale_and_check(grads: list[Tensor], scaler: Any, sharded: bool = False) -> bool:
    """Divide ``grads`` by the scaler's current scale in place; True if any is inf/NaN (on
    any rank, when ``sharded``: every rank must then skip the perturbation together)."""
    inv_scale = 1.0 / float(scaler.get_scale())
    grads = [local(g) for g in grads]
    found_any = torch.zeros((), dtype=torch.float32, device=grads[0].device)
    for _, (gs,) in group_by_device_dtype(grads):
        device = gs[0].device
        found = torch.zeros(1, dtype=torch.float32, device=device)
        inv = torch.full((1,), inv_scale, dtype=torch.float32, device=device)
        torch._amp_foreach_non_finite_check_and_unscale_(gs, found, inv)
        found_any = torch.maximum(found_any, found.to(found_any.device).reshape(()))
    if sharded:
        import torch.distributed as dist

        dist.all_reduce(found_any, op=dist.ReduceOp.MAX)
    return bool(found_any)


@torch.no_grad()
def _poison(param: Tensor) -> None:
    """Make ``param``'s gradient inf so that the step's gradient is non-finite on every rank
    (the second backward adds to it and all-reduces it)."""
    if param.grad is None:
        param.grad = torch.zeros_like(param)
    param.grad.fill_(float("inf"))
