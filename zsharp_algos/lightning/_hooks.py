"""What the Lightning callbacks do, independent of which Lightning package they subclass.

:mod:`zsharp_algos.lightning.callback` (``lightning.pytorch``) and
:mod:`zsharp_algos.lightning.pytorch_lightning` put these hooks on their package's ``Callback``.
"""
from __future__ import annotations

from typing import Any

from ..optimizer import GCSAM, GSAM, SAM, FriendlySAM, SharpnessAwareOptimizer, ZSharp
from ..options import TakesOptions
from .driver import GlobalStep, SharpnessAwareDriver, check_supported

__all__ = ["SharpnessAwareHooks", "SAMHooks", "ZSharpHooks", "FriendlySAMHooks", "GSAMHooks", "GCSAMHooks"]


class SharpnessAwareHooks:
    """Runs the sharpness-aware optimizers that ``configure_optimizers`` returns (see
    :class:`zsharp_algos.lightning.SharpnessAwareCallback`)."""

    #: The optimizer the callback builds around the trainer's; None: use the module's own.
    optimizer_cls: type[SharpnessAwareOptimizer] | None = None

    def __init__(self, *, sync_first_pass: bool = False, log_stats: bool = True):
        if not isinstance(sync_first_pass, bool):
            raise ValueError(f"sync_first_pass must be a bool, got {sync_first_pass!r}")
        if not isinstance(log_stats, bool):
            raise ValueError(f"log_stats must be a bool, got {log_stats!r}")
        self.sync_first_pass, self.log_stats = sync_first_pass, log_stats
        self._driver: SharpnessAwareDriver | None = None

    # ------------------------------------------------------------------ hyper-parameters
    def _options(self) -> dict[str, Any]:
        return {}

    def hparams(self) -> dict[str, Any]:
        """All arguments, plain Python types."""
        return dict(self._options(), sync_first_pass=self.sync_first_pass, log_stats=self.log_stats)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.hparams().items())})"

    # ------------------------------------------------------------------ Lightning hooks
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage == "fit":
            check_supported(trainer, type(self).__name__)  # before the model is wrapped or anything runs

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        # After the optimizers exist, before a checkpoint is loaded into them (ckpt_path=).
        optimizers = list(trainer.optimizers)
        installed = [self._install(opt, trainer, pl_module) for opt in optimizers]
        if any(new is not old for new, old in zip(installed, optimizers)):
            trainer.optimizers = installed
        self._detach()
        self._driver = SharpnessAwareDriver(trainer, who=type(self).__name__, sync_first_pass=self.sync_first_pass)
        self._driver.attach()

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._driver is not None and self.log_stats:
            self._driver.log_stats(pl_module)

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage == "fit":
            self._detach()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._detach()

    # ------------------------------------------------------------------ the work
    def _install(self, optimizer: Any, trainer: Any, pl_module: Any) -> SharpnessAwareOptimizer:
        who = type(self).__name__
        if self.optimizer_cls is None:
            if not isinstance(optimizer, SharpnessAwareOptimizer):
                raise TypeError(
                    f"{who} runs the sharpness-aware optimizer configure_optimizers returns, got "
                    f"{type(optimizer).__name__}: return zsharp_algos.lightning.LightningSAM / LightningZSharp "
                    "(or zsharp_algos.SAM / ZSharp), or use SAMCallback(...) / ZSharpCallback(...), which wrap "
                    "the optimizer you return"
                )
            return optimizer
        if isinstance(optimizer, SharpnessAwareOptimizer):
            raise TypeError(
                f"{who} wraps the optimizer configure_optimizers returns, and that is already sharpness-aware "
                f"({type(optimizer).__name__}): return a plain base optimizer (torch.optim.SGD, AdamW, ...), or "
                "drop the callback (LightningSAM / LightningZSharp attach themselves)"
            )
        return self.optimizer_cls(
            optimizer, model=pl_module, schedule=GlobalStep(trainer), record_stats=self.log_stats, **self._options()
        )

    def _detach(self) -> None:
        if self._driver is not None:
            self._driver.detach()
            self._driver = None


class _WrappingHooks(TakesOptions, SharpnessAwareHooks):
    """Builds :attr:`optimizer_cls` around the trainer's optimizer with the given options (the
    option table of :mod:`zsharp_algos.options` gives their names, defaults and checks)."""

    extra_parameters = {"sync_first_pass": False, "log_stats": True}

    def __init__(self, *, sync_first_pass: bool = False, log_stats: bool = True, **options: Any):
        super().__init__(sync_first_pass=sync_first_pass, log_stats=log_stats)
        self._take_options(options)  # now, so a bad value fails where the callback is built

    def _options(self) -> dict[str, Any]:
        return dict(self.options)


class SAMHooks(_WrappingHooks):
    """Wraps the trainer's optimizer in :class:`zsharp_algos.SAM` (see
    :class:`zsharp_algos.lightning.SAMCallback`)."""

    optimizer_cls = SAM


class ZSharpHooks(_WrappingHooks):
    """Wraps the trainer's optimizer in :class:`zsharp_algos.ZSharp` (see
    :class:`zsharp_algos.lightning.ZSharpCallback`)."""

    optimizer_cls = ZSharp


class FriendlySAMHooks(_WrappingHooks):
    """Wraps the trainer's optimizer in :class:`zsharp_algos.FriendlySAM`."""

    optimizer_cls = FriendlySAM


class GSAMHooks(_WrappingHooks):
    """Wraps the trainer's optimizer in :class:`zsharp_algos.GSAM`."""

    optimizer_cls = GSAM


class GCSAMHooks(_WrappingHooks):
    """Wraps the trainer's optimizer in :class:`zsharp_algos.GCSAM`."""

    optimizer_cls = GCSAM
