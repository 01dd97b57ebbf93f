"""SAM and ZSharp to return from ``configure_optimizers``, Lightning-aware.

The core :class:`zsharp_algos.SAM` / :class:`zsharp_algos.ZSharp` step through a closure that
they call twice; Lightning's closure also logs, clips gradients and, under ``16-mixed``, is not
passed to the optimizer at all. :class:`LightningSAM` and :class:`LightningZSharp` are the core
classes plus one thing: built inside ``configure_optimizers`` with ``model=self``, they add a
:class:`~zsharp_algos.lightning.SharpnessAwareCallback` to the trainer (unless one is there), which
runs their steps properly (:mod:`zsharp_algos.lightning.driver`)::

    def configure_optimizers(self):
        opt = LightningZSharp(self.parameters(), torch.optim.SGD, model=self, lr=0.1, momentum=0.9,
                              rho=0.05, percentile=70)
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.CosineAnnealingLR(opt, 100)}

Everything else (options, param groups with their own ``rho``, checkpoints) is the core's.
"""
from __future__ import annotations

from functools import partial
from typing import Any

from ..optimizer import SAM, ZSharp
from ._framework import framework_of
from .driver import GlobalStep, check_supported

__all__ = ["LightningSAM", "LightningZSharp"]


class _LightningAttached:
    """Adds the callback that runs this optimizer to ``model``'s trainer (module doc)."""

    def __init__(
        self,
        params=None,
        base_optimizer=None,
        *,
        model: Any = None,
        sync_first_pass: bool = False,
        log_stats: bool = True,
        **kwargs,
    ):
        owner = type(self).__name__
        try:
            fw = framework_of(model)
        except TypeError:
            fw = None
        if fw is None or not isinstance(model, fw.LightningModule):
            raise TypeError(
                f"{owner} needs model=self, the LightningModule (build it in configure_optimizers); got "
                f"{type(model).__name__}. Outside Lightning use zsharp_algos.{owner.removeprefix('Lightning')}"
            )
        trainer = getattr(model, "_trainer", None)
        if trainer is not None and kwargs.get("schedule") is None:
            kwargs["schedule"] = GlobalStep(trainer)
        kwargs.setdefault("record_stats", log_stats)
        super().__init__(params, base_optimizer, model=model, **kwargs)
        if trainer is not None:
            _add_callback(trainer, fw, owner, sync_first_pass=sync_first_pass, log_stats=log_stats)

    def step(self, closure=None):
        if isinstance(closure, partial) and getattr(closure.func, "__name__", "") == "_wrap_closure":
            # Lightning's precision plugin called us directly: no callback took over the step.
            raise RuntimeError(
                f"{type(self).__name__} was built without a trainer attached to its model (outside "
                "Trainer.fit): build it in configure_optimizers with model=self, or add "
                "zsharp_algos.lightning.SharpnessAwareCallback() to Trainer(callbacks=...)"
            )
        return super().step(closure)


def _add_callback(trainer: Any, fw: Any, owner: str, **kwargs) -> None:
    from ._hooks import SharpnessAwareHooks

    check_supported(trainer, owner)
    if any(isinstance(cb, SharpnessAwareHooks) for cb in trainer.callbacks):
        return
    if fw.root == "pytorch_lightning":
        from .pytorch_lightning import SharpnessAwareCallback
    else:
        from .callback import SharpnessAwareCallback
    trainer.callbacks.append(SharpnessAwareCallback(**kwargs))


class LightningSAM(_LightningAttached, SAM):
    """:class:`zsharp_algos.SAM` for ``configure_optimizers`` (module doc).

    Args:
        model: ``self``, the LightningModule (required).
        sync_first_pass, log_stats: as :class:`~zsharp_algos.lightning.SAMCallback`.

    The other arguments are :class:`zsharp_algos.SAM`'s.
    """


class LightningZSharp(_LightningAttached, ZSharp):
    """:class:`zsharp_algos.ZSharp` for ``configure_optimizers`` (module doc). The paper's
    official setting: ``LightningZSharp(self.parameters(), torch.optim.Adam, model=self, lr=1e-3,
    rho=0.05, percentile=95, scope="tensor")``.

    Args:
        model: ``self``, the LightningModule (required).
        sync_first_pass, log_stats: as :class:`~zsharp_algos.lightning.ZSharpCallback`.

    The other arguments are :class:`zsharp_algos.ZSharp`'s.
    """
