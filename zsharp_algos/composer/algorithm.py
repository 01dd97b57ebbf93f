"""Composer algorithms that turn the trainer's optimizers into SAM / ZSharp optimizers.

Differences from ``composer.algorithms.SAM`` (each one a defect of it, see the project's
reference notes):

* the optimizers are wrapped at ``Event.INIT``, before the checkpoint is loaded, so a resumed run
  loads the base optimizer's state (momentum, Adam moments) under the same checkpoint key it was
  saved with: no "not in the state_dict" warning, nothing silently reset;
* which steps are sharpness steps follows the trainer's batch counter (``state.timestamp``, given
  to the optimizer as its ``schedule``), which every rank shares and checkpoints restore, so
  ``interval > 1`` keeps its phase on resume;
* weights are restored by copy (exact) in a ``finally``, so data-parallel replicas stay bitwise
  identical and an exception or an fp16 overflow in the second pass leaves no perturbed weights;
* a loss of 0.0 is a loss, not a failure; BatchNorm statistics are not updated by the second pass;
  the second pass stays out of the logged loss and the training metrics.
"""
from __future__ import annotations

import warnings
from contextlib import contextmanager
from typing import Any, Iterator, Optional

from composer.core import Algorithm, Event, State
from composer.loggers import Logger
from composer.utils import ensure_tuple

from ..optimizer import SharpnessAwareOptimizer
from ..options import TakesOptions
from .optimizer import ComposerSAM, ComposerZSharp, TrainerClosureMixin

__all__ = ["SharpnessAwareAlgorithm", "SAMAlgorithm", "ZSharpAlgorithm"]

SUPPORTED = (
    "single-process, DDP or FSDP2 data-parallel training (CPU with gloo, GPUs with nccl), "
    "precision fp32, amp_bf16 or amp_fp16"
)


class SharpnessAwareAlgorithm(TakesOptions, Algorithm):
    """Shared machinery of :class:`SAMAlgorithm` and :class:`ZSharpAlgorithm` (see those).

    Subclasses set :attr:`optimizer_cls` (the optimizer installed); the options it takes, their
    defaults and checks come from :mod:`zsharp_algos.options` through it.
    """

    optimizer_cls: type[TrainerClosureMixin] = ComposerSAM
    _events = (Event.INIT, Event.BATCH_END)

    extra_parameters = {"sync_first_pass": False, "log_interval": 100}

    def __init__(self, *, sync_first_pass: bool = False, log_interval: int = 100, **options: Any):
        if not isinstance(sync_first_pass, bool):
            raise ValueError(f"sync_first_pass must be a bool, got {sync_first_pass!r}")
        if isinstance(log_interval, bool) or not isinstance(log_interval, int) or log_interval < 0:
            raise ValueError(f"log_interval must be an integer >= 0 (0: no metrics), got {log_interval!r}")
        # Checked now, so a bad value fails here rather than at Trainer construction.
        self._take_options(options)
        self.sync_first_pass, self.log_interval = sync_first_pass, log_interval

    # ------------------------------------------------------------------ hyper-parameters
    def hparams(self) -> dict[str, Any]:
        """All hyper-parameters, plain Python types, in a fixed order."""
        return dict(self.options, sync_first_pass=self.sync_first_pass, log_interval=self.log_interval)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.hparams().items())})"

    def state_dict(self) -> dict[str, Any]:
        """Plain types only (Composer loads checkpoints with ``weights_only=True``). The training
        progress itself lives in the optimizer state and the trainer's timestamp."""
        return {"repr": repr(self), "hparams": self.hparams()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = dict(state.get("hparams", {}))
        changed = {
            k: (saved[k], v) for k, v in self.hparams().items() if k in saved and saved[k] != v and k != "log_interval"
        }
        if changed:
            listing = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changed.items())
            warnings.warn(f"{type(self).__name__}: resuming with different hyper-parameters than saved ({listing})")

    # ------------------------------------------------------------------ Composer hooks
    def match(self, event: Event, state: State) -> bool:
        return event in self._events

    def apply(self, event: Event, state: State, logger: Logger) -> Optional[int]:
        if event == Event.INIT:
            self._install(state)
        else:
            self._log(state, logger)
        return None

    # ------------------------------------------------------------------ the work
    def _install(self, state: State) -> None:
        """Wrap the trainer's optimizers, at INIT: before any checkpoint is loaded into them, and
        before the trainer picks its grad scaler (a closure-aware one, since the wrapped
        optimizers declare ``_step_supports_amp_closure``)."""
        check_supported(state, type(self).__name__)
        wrapped = []
        for opt in ensure_tuple(state.optimizers):
            if isinstance(opt, SharpnessAwareOptimizer):
                raise TypeError(
                    f"{type(self).__name__} wraps the trainer's optimizer itself: pass a plain base optimizer "
                    f"(e.g. torch.optim.SGD), not {type(opt).__name__}"
                )
            wrapped.append(
                self.optimizer_cls(
                    opt,
                    model=state.model,
                    schedule=lambda: int(state.timestamp.batch),
                    sync_first_pass=self.sync_first_pass,
                    second_pass_context=lambda: _train_metrics_paused(state),
                    record_stats=self.log_interval > 0,
                    **self.options,
                )
            )
        state.optimizers = tuple(wrapped)

    def _log(self, state: State, logger: Logger) -> None:
        """Every ``log_interval`` batches: the ``sharpness/*`` averages since the last log (one
        host sync per log)."""
        if not self.log_interval or int(state.timestamp.batch) % self.log_interval:
            return
        optimizers = [opt for opt in ensure_tuple(state.optimizers) if isinstance(opt, TrainerClosureMixin)]
        for i, opt in enumerate(optimizers):
            suffix = f"/{i}" if len(optimizers) > 1 else ""
            stats = opt.stats.pop()
            if stats:
                logger.log_metrics({f"{k}{suffix}": v for k, v in stats.items()})


class SAMAlgorithm(SharpnessAwareAlgorithm):
    """Sharpness-Aware Minimization (`Foret et al., 2021 <https://arxiv.org/abs/2010.01412>`_):
    each sharpness step takes the gradient at ``w + e`` with ``e = rho * g / ||g||`` and steps the
    trainer's own optimizer (SGD, AdamW, ... with its momentum, weight decay and schedule) with it.

    Runs on :attr:`.Event.INIT` (wraps the optimizers, before any checkpoint is loaded) and
    :attr:`.Event.BATCH_END` (metrics).

    Args:
        rho (float): neighbourhood radius, ``>= 0``. Default ``0.05`` (the paper's, at
            ``interval=1``). Scale it with ``interval``: Composer found ``rho=0.5`` at
            ``interval=10`` to work on ResNet-50/ImageNet.
        interval (int): a sharpness step every ``interval``-th batch (batches ``interval``,
            ``2*interval``, ... of the trainer's batch count, which also counts fp16 steps skipped
            for overflow); plain steps in between. Default ``1``.
        adaptive (bool): ASAM's element-wise scaling ``|w|`` (use ``rho`` 0.5 to 2). Default ``False``.
        eps (float): added to the norm that divides ``rho``. Default ``1e-12``.
        sync_first_pass (bool): all-reduce the first pass's gradients under DDP. Default ``False``:
            each rank perturbs along its own gradient (Composer's choice: cheaper, and reported to
            help slightly); the second pass is always all-reduced, so replicas stay identical.
            Under FSDP2 the first pass is always reduce-scattered.
        log_interval (int): every ``log_interval`` batches, log the ``sharpness/*`` statistics
            (``grad_norm``, ``perturbation_norm``, ``perturbed_fraction``, ``loss_gap``; this
            rank's, averaged over the sharpness steps since the last log, see
            :mod:`zsharp_algos.stats`); ``0`` records and logs nothing. Default ``100``. Costs
            one host sync per log.

    When to use: image classifiers (ResNets, ViTs) where generalisation or robustness to label
    noise matters more than throughput; it composes with the trainer's own optimizer, schedule,
    gradient accumulation (``device_train_microbatch_size``: the perturbation uses the whole
    batch's gradient), gradient clipping, DDP and FSDP2.

    Cost: a sharpness step runs forward and backward twice, so about ``1 + 1/interval`` times
    the compute of the baseline; memory: one extra copy of the trainable weights.

    Precision: fp32 everywhere; ``amp_bf16`` on GPUs; ``amp_fp16`` on CUDA through the trainer's
    closure-aware grad scaler (a step whose passes overflow on any rank is skipped, weights
    exactly as before). Composer allows only fp32 on CPU.

    FSDP2 (``parallelism_config={"fsdp": FSDP2Config(...)}``, ``FSDP2Config`` from
    ``composer.utils.parallelism``): the optimizers work on the local shards and complete norms
    and ZSharp's thresholds across the shard group (:mod:`zsharp_algos.sharding`), so the step
    equals the unsharded one; the work buffer holds the local shard only. The first pass's
    gradient is FSDP's reduce-scattered one (``sync_first_pass`` has no effect there).

    Not supported (a clear error at Trainer construction): FSDP1 (use FSDP2), tensor
    parallelism, DeepSpeed, XLA.

    Example:
        .. code-block:: python

            from zsharp_algos.composer import SAMAlgorithm
            trainer = Trainer(model=model, train_dataloader=dl, optimizers=torch.optim.SGD(...),
                              max_duration="10ep", algorithms=[SAMAlgorithm(rho=0.05)])
    """

    optimizer_cls = ComposerSAM


class ZSharpAlgorithm(SharpnessAwareAlgorithm):
    """ZSharp (`arXiv 2505.02369 <https://arxiv.org/abs/2505.02369>`_): SAM whose perturbation
    keeps only the gradient entries with a large layer-wise z-score ``|g - mean(g)| / std(g)``,
    so the weights are pushed along the statistically significant directions only.

    Runs on the same events as :class:`SAMAlgorithm`, with the same arguments plus:

    Args:
        percentile (float): in (0, 100): the share of entries whose ``|z|`` falls below the cut.
            Default ``70`` (about 30% of the entries perturbed).
        scope (str): ``"global"`` (default): one threshold over the whole model and SAM's global
            normalisation; ``"tensor"``: the paper's official code, one threshold and one
            normalisation per weight matrix/kernel (``ndim > 1``), with ``percentile=95``
            (usually with AdamW, lr ``1e-3``, ``rho=0.05``).

    Logged every ``log_interval`` batches: the same ``sharpness/*`` statistics as SAM;
    ``sharpness/perturbed_fraction`` is about ``1 - percentile/100``.

    When to use: as SAM; ZSharp targets the same generalisation gains with a sparser, more
    selective perturbation.

    Cost: as SAM plus the exact order statistics for the thresholds, a few extra passes over the
    gradients on sharpness steps (small next to a forward/backward pass); no host sync.

    Example:
        .. code-block:: python

            from zsharp_algos import ZSharpAlgorithm
            algorithm = ZSharpAlgorithm(rho=0.05, percentile=70, interval=1)
    """

    optimizer_cls = ComposerZSharp


def check_supported(state: State, who: str) -> None:
    """Raise :class:`ValueError` naming what is supported if the trainer is set up otherwise."""
    problems = []
    fsdp = getattr(state, "fsdp_config", None)
    if fsdp is not None and not _is_fsdp2(fsdp):
        problems.append(
            "FSDP1 (FullyShardedDataParallel's flat parameters; use FSDP2 instead: "
            'parallelism_config={"fsdp": FSDP2Config(...)} with composer.utils.parallelism.FSDP2Config, '
            "or FSDP_VERSION=2 in the environment with the same fsdp dict)"
        )
    if getattr(state, "tp_config", None) is not None:
        problems.append("tensor parallelism")
    if getattr(getattr(state, "device", None), "dist_backend", None) == "xla":
        problems.append("XLA devices (the trainer steps optimizers there without a closure)")
    if getattr(state, "deepspeed_config", None):
        problems.append("DeepSpeed")
    if problems:
        raise ValueError(f"{who} supports {SUPPORTED}; this trainer uses {'; '.join(problems)}")


def _is_fsdp2(config: Any) -> bool:
    try:
        from composer.utils.parallelism import FSDP2Config
    except ImportError:  # a Composer without FSDP2
        return False
    return isinstance(config, FSDP2Config)


@contextmanager
def _train_metrics_paused(state: State) -> Iterator[None]:
    """Keep the perturbed pass out of the training metrics (the trainer skips them when empty)."""
    metrics = state.train_metrics
    state.train_metrics = {}
    try:
        yield
    finally:
        state.train_metrics = metrics
