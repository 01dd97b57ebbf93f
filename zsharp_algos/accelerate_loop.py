"""SAM / ZSharp in your own ``accelerate`` training loop.

Two changed lines turn a plain loop into sharpness-aware training::

    from zsharp_algos import ZSharp
    from zsharp_algos.accelerate_loop import TwoPassBackward

    sharp = TwoPassBackward(accelerator, ZSharp(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), rho=0.05))
    model, optimizer, loader, scheduler = accelerator.prepare(model, sharp.optimizer, loader, scheduler)
    for x, y in loader:
        with accelerator.accumulate(model):                                  # once per micro-batch
            loss = sharp.backward(model, lambda: F.cross_entropy(model(x), y))  # was: accelerator.backward(loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(model.parameters(), 1.0)         # optional, as usual
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()

``sharp.backward`` runs the forward (your ``loss_fn``) and ``accelerator.backward`` twice on
sharpness steps (:func:`zsharp_algos.two_pass.two_pass_backward`): the first pass inside
``accelerator.no_sync(model)`` (forward included, so DDP does not all-reduce it), the second at
the perturbed weights through ``accelerator.backward`` as usual, then the weights are restored
by copy. Everything after it is accelerate's stock path, so:

* gradient accumulation: ``accelerator.accumulate`` is entered once per micro-batch, by you, as
  in any loop; every micro-batch is perturbed by its own gradient;
* fp16: no closure ever goes through accelerate's optimizer (its closure path would apply
  still-scaled gradients); the prepared optimizer unscales, checks and steps as usual, and an
  overflow in either pass skips the step and the prepared scheduler;
* bf16: nothing special (autocast comes from ``accelerator.prepare``);
* clipping: ``accelerator.clip_grad_norm_`` (or the optimizer's ``max_grad_norm``) acts once,
  on the second pass's gradient, the one the base optimizer uses.

``loss_fn`` must compute the loss from scratch each call (it is called twice) and use the
*prepared* model. A plain optimizer (``--optim sgd``) is accepted too: ``backward`` is then a
single ``accelerator.backward``, so one loop serves every ``--optim``.

FSDP2 (``fsdp_version: 2`` in the accelerate config, or
``Accelerator(fsdp_plugin=FullyShardedDataParallelPlugin(fsdp_version=2))``): the same loop.
``accelerator.prepare`` shards the model and the optimizer works on the local shards
(:mod:`zsharp_algos.sharding`); the first pass is *not* run under ``no_sync`` but
reduce-scattered, so every rank perturbs along the global batch's gradient (under DDP each rank
uses its own), and a micro-batch that ``accelerator.accumulate`` put under ``no_sync`` is
reduce-scattered anyway on sharpness steps (both passes), so that its first-pass gradient never
mixes into the accumulated one.

Not supported (refused at construction, with the way out named): FSDP1 (use FSDP2), FSDP2 with
CPU offload, DeepSpeed, Megatron-LM and XLA, whose optimizers or sharded gradients do not fit
the perturbation.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import torch
from torch import Tensor, nn

from .optimizer import SharpnessAwareOptimizer
from .two_pass import two_pass_backward

__all__ = ["TwoPassBackward", "mean_over_processes", "UNSUPPORTED_DISTRIBUTED_TYPES"]

#: accelerate modes refused outright; FSDP is accepted as FSDP2 only (``unsupported_setup()``).
UNSUPPORTED_DISTRIBUTED_TYPES = ("DEEPSPEED", "MEGATRON_LM", "XLA")

FSDP2_HINT = (
    "use FSDP2: `fsdp_version: 2` in the accelerate config (accelerate config / --config_file), or "
    "Accelerator(fsdp_plugin=FullyShardedDataParallelPlugin(fsdp_version=2))"
)


class TwoPassBackward:
    """Sharpness-aware backward passes for an ``accelerate.Accelerator`` loop.

    Args:
        accelerator: the loop's ``Accelerator``.
        optimizer: a :class:`~zsharp_algos.SharpnessAwareOptimizer` (SAM, ZSharp), or any other
            optimizer (then :meth:`backward` is plain ``accelerator.backward``).

    Attributes:
        optimizer: what to pass to ``accelerator.prepare`` (the optimizer itself: its ``step()``
            without a closure is the base step after the two passes).
    """

    def __init__(self, accelerator: Any, optimizer: torch.optim.Optimizer):
        problem = unsupported_setup(accelerator)
        if problem is not None:
            raise ValueError(problem)
        self.accelerator = accelerator
        self.optimizer = optimizer

    @property
    def sharpness(self) -> SharpnessAwareOptimizer | None:
        """The sharpness-aware optimizer, or None for a plain one."""
        return self.optimizer if isinstance(self.optimizer, SharpnessAwareOptimizer) else None

    def backward(self, model: nn.Module, loss_fn: Callable[[], Tensor]) -> Tensor:
        """``loss = loss_fn(); accelerator.backward(loss)``, twice on sharpness steps.

        Args:
            model: the prepared model (``loss_fn`` must call it).
            loss_fn: computes the (micro-)batch's loss from scratch.

        Returns the loss at the unperturbed weights (detached), as ``loss_fn`` computed it.
        """
        accelerator = self.accelerator
        if self.sharpness is None:
            loss = loss_fn()
            accelerator.backward(loss)
            return loss.detach()
        losses: list[Tensor] = []

        def run_pass() -> Tensor:
            loss = loss_fn()
            accelerator.backward(loss)
            losses.append(loss.detach())
            # In the units of one optimizer step's loss, like the loss an accumulating loop logs.
            return losses[-1] / accelerator.gradient_accumulation_steps

        two_pass_backward(
            self.sharpness, run_pass, model, no_sync=functools.partial(accelerator.no_sync, model), scaler=accelerator.scaler
        )
        return losses[0]

    def pop_stats(self) -> dict[str, float]:
        """Sharpness statistics since the last call (see :mod:`zsharp_algos.stats`), averaged
        over processes: call it on every process (it is a collective when there are several)."""
        if self.sharpness is None:
            return {}
        return mean_over_processes(self.accelerator, self.sharpness.stats.pop_tensors())


def unsupported_setup(accelerator: Any) -> str | None:
    """Why sharpness-aware training cannot run in ``accelerator``'s mode, or None (single
    device, DDP on CPUs or GPUs, FSDP2 without CPU offload)."""
    kind = getattr(accelerator.distributed_type, "name", str(accelerator.distributed_type))
    if kind == "FSDP" or getattr(accelerator, "is_fsdp2", False):
        plugin = getattr(getattr(accelerator, "state", None), "fsdp_plugin", None)
        version = getattr(plugin, "fsdp_version", 2 if getattr(accelerator, "is_fsdp2", False) else 1)
        if version != 2:
            return (
                f"sharpness-aware training (SAM / ZSharp) does not support FSDP version {version} "
                f"(FullyShardedDataParallel wraps the parameters in flat buffers); {FSDP2_HINT}"
            )
        offload = getattr(plugin, "cpu_offload", None)
        if offload is not None and type(offload).__name__ == "CPUOffloadPolicy":
            return (
                "sharpness-aware training (SAM / ZSharp) does not support FSDP2 with CPU offload "
                "(fsdp_offload_params / CPUOffloadPolicy); use FSDP2 without offload"
            )
        return None
    if kind in UNSUPPORTED_DISTRIBUTED_TYPES:
        return (
            f"sharpness-aware training (SAM / ZSharp) does not support accelerate's {kind} mode; "
            f"supported: single device, multi-CPU / multi-GPU DDP, and FSDP2 ({FSDP2_HINT})"
        )
    return None


def mean_over_processes(accelerator: Any, stats: dict[str, Tensor]) -> dict[str, float]:
    """``stats`` (0-dim tensors) averaged over the accelerator's processes, as floats (one
    collective when there are several processes: call it on all of them)."""
    if not stats:
        return {}
    values = torch.stack([v.to(accelerator.device) for v in stats.values()])
    if accelerator.num_processes > 1:
        values = accelerator.reduce(values, reduction="mean")
    return dict(zip(stats, values.tolist()))
