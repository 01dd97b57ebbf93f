"""Lightning callbacks for SAM and ZSharp (``lightning.pytorch``; the same classes for
``pytorch_lightning`` are in :mod:`zsharp_algos.lightning.pytorch_lightning`)."""
from __future__ import annotations

from lightning.pytorch import Callback

from ._hooks import FriendlySAMHooks, GCSAMHooks, GSAMHooks, SAMHooks, SharpnessAwareHooks, ZSharpHooks

__all__ = [
    "SharpnessAwareCallback", "SAMCallback", "ZSharpCallback", "FriendlySAMCallback", "GSAMCallback", "GCSAMCallback",
]

_HOW = """
    How a step runs (:mod:`zsharp_algos.lightning.driver`): Lightning's own closure
    (``training_step`` + ``backward``) runs twice on sharpness steps, the first time at ``w`` (under
    DDP's ``no_sync``, unless ``sync_first_pass``), the second at ``w + e`` with BatchNorm
    statistics frozen and every ``self.log`` / ``log_dict`` call, torchmetrics update and the
    returned loss kept out of the logs and the step's outputs; the weights are then restored
    exactly and the trainer's optimizer steps with the second pass's gradient. With
    ``accumulate_grad_batches=k`` the perturbation comes from the whole batch's gradient and the
    second pass runs all ``k`` micro-batches again (SAM on the batch of ``k`` micro-batches).
    ``gradient_clip_val`` and the ``on_before_optimizer_step`` hooks apply once, to the gradient the
    base optimizer uses; LR schedulers step as configured. Which steps perturb follows
    ``trainer.global_step`` (shared by every rank, restored by ``ckpt_path=``); checkpoints hold
    the base optimizer's state (momentum, Adam moments) and the step counters.

    Precision: ``32-true``, ``bf16-mixed``, ``16-mixed`` (the plugin's ``GradScaler`` is replaced
    by :class:`~zsharp_algos.lightning.scaler.LightningClosureScaler` during fit: inf/NaN in either
    pass, on any rank, skips the step with the weights exactly as they were). Strategies: one
    device, ``ddp`` / ``ddp_spawn`` (gloo on CPU, nccl on GPUs). FSDP, DeepSpeed, model
    parallelism, XLA and manual optimization are refused with a message when fit sets up.

    Logged at the trainer's ``log_every_n_steps`` (averaged since the last log and over ranks, no
    host sync of its own): ``sharpness/grad_norm``, ``sharpness/perturbation_norm``,
    ``sharpness/perturbed_fraction``, ``sharpness/loss_gap`` (:mod:`zsharp_algos.stats`).

    Cost: a sharpness step runs forward and backward twice (about ``1 + 1/interval`` times the
    baseline); memory: one extra copy of the trainable weights at most.

    ``training_step`` runs twice on sharpness steps: side effects other than logging and
    torchmetrics (counters, Python-side state) happen twice.
"""

_ARGS = """
        sync_first_pass (bool): all-reduce the first pass under DDP. Default ``False``: each rank
            perturbs along its own gradient (one all-reduce less; the second pass is all-reduced,
            so every rank takes the same step).
        log_stats (bool): record and log the sharpness statistics. Default ``True``.
"""


class SharpnessAwareCallback(SharpnessAwareHooks, Callback):
    __doc__ = (
        """Runs the sharpness-aware optimizer your ``configure_optimizers`` returns
    (:class:`zsharp_algos.SAM`, :class:`zsharp_algos.ZSharp`, with their param groups and options)
    in Lightning's automatic optimization.

    :class:`~zsharp_algos.lightning.LightningSAM` / :class:`~zsharp_algos.lightning.LightningZSharp`
    add this callback themselves; add it yourself when ``configure_optimizers`` returns the plain
    core classes::

        def configure_optimizers(self):
            return zsharp_algos.ZSharp(no_perturbation_groups(self), torch.optim.SGD, lr=0.1, rho=0.05)

        Trainer(callbacks=[SharpnessAwareCallback()])

    Args:"""
        + _ARGS
        + _HOW
    )


class SAMCallback(SAMHooks, SharpnessAwareCallback):
    __doc__ = (
        """Sharpness-Aware Minimization (`Foret et al., 2021 <https://arxiv.org/abs/2010.01412>`_)
    for an unchanged LightningModule: at fit start the optimizer ``configure_optimizers`` returned
    (SGD, AdamW, ..., with its schedulers) becomes the base of a :class:`zsharp_algos.SAM`, so each
    sharpness step takes the gradient at ``w + e``, ``e = rho * g / ||g||``, and steps your
    optimizer with it::

        trainer = Trainer(callbacks=[SAMCallback(rho=0.05)], precision="bf16-mixed")

    Args:
        rho (float): neighbourhood radius, ``>= 0``. Default ``0.05`` (the paper's, at
            ``interval=1``); scale it with ``interval``.
        interval (int): a sharpness step every ``interval``-th optimizer step (the trainer's
            ``global_step``: steps ``interval - 1``, ``2 * interval - 1``, ... 0-based); plain
            steps in between. Default ``1``.
        adaptive (bool): ASAM's element-wise scaling by ``|w|`` (use ``rho`` 0.5 to 2).
        perturb_eps (float): added to the norm that divides ``rho``. Default ``1e-12``. (The
            base optimizer's own ``eps``, Adam's say, is set where ``configure_optimizers``
            builds it.)"""
        + _ARGS
        + _HOW
    )


class ZSharpCallback(ZSharpHooks, SharpnessAwareCallback):
    __doc__ = (
        """ZSharp (`arXiv 2505.02369 <https://arxiv.org/abs/2505.02369>`_) for an unchanged
    LightningModule: SAM whose perturbation keeps only the gradient entries with a large
    layer-wise z-score ``|g - mean(g)| / std(g)``. The optimizer ``configure_optimizers`` returned
    becomes the base of a :class:`zsharp_algos.ZSharp` at fit start::

        trainer = Trainer(callbacks=[ZSharpCallback(rho=0.05, percentile=70)])
        # the paper's official setting: Adam (lr 1e-3) from configure_optimizers and
        ZSharpCallback(rho=0.05, percentile=95, scope="tensor")

    Args:
        rho (float): neighbourhood radius, ``>= 0``. Default ``0.05``.
        percentile (float): in (0, 100): the share of entries whose ``|z|`` falls below the cut.
            Default ``70`` (about 30% of the entries perturbed).
        scope (str): ``"global"`` (default; one threshold over the model, SAM's global norm) or
            ``"tensor"`` (the paper's official code: a threshold and a normalisation per weight
            tensor with ``ndim > 1``).
        interval, adaptive, perturb_eps: as :class:`SAMCallback`."""
        + _ARGS
        + _HOW
    )


_VARIANT = """{name} for an unchanged LightningModule: at fit start the optimizer
    ``configure_optimizers`` returned becomes the base of a :class:`zsharp_algos.{name}`
    ({what}); it runs as :class:`SAMCallback` does, with the same arguments plus {own}.

    ``SAMCallback(variant=...)`` and ``ZSharpCallback(variant=...)`` give the same variants, the
    second with ZSharp's filter over the variant's direction.
"""


class FriendlySAMCallback(FriendlySAMHooks, SharpnessAwareCallback):
    __doc__ = _VARIANT.format(name="FriendlySAM", what="SAM along g - sigma * m, m an EMA of past gradients",
                              own="``sigma`` (1.0) and ``lmbda`` (0.9)")


class GSAMCallback(GSAMHooks, SharpnessAwareCallback):
    __doc__ = _VARIANT.format(name="GSAM", what="SAM's perturbation, a step with g_s - alpha * g_perp",
                              own="``alpha`` (0.2)")


class GCSAMCallback(GCSAMHooks, SharpnessAwareCallback):
    __doc__ = _VARIANT.format(name="GCSAM", what="SAM along the gradient centred per output channel",
                              own="nothing")
