r"""Sharpness-aware steps inside Lightning's automatic optimization.

In automatic optimization Lightning builds, for every (micro-)batch, a closure that runs
``training_step``, ``zero_grad`` (first micro-batch of a step) and ``backward``; it calls the
closures of all micro-batches but the last itself (inside DDP's ``no_sync``), and hands the last
one to ``optimizer.step`` through the precision plugin, which adds the ``on_before_optimizer_step``
hooks and gradient clipping (``32-true``, ``bf16-mixed``) or runs the closure itself and calls
``scaler.step(optimizer)`` (``16-mixed``). :class:`SharpnessAwareDriver` takes over the precision
plugin's ``optimizer_step`` for the sharpness-aware optimizer and runs the core's
``step(closure)`` with a closure that is one whole *pass* over the step's micro-batches::

    pass 1 (at w):      micro-batches 1..k-1 ran already (Lightning's loop); micro-batch k,
                        inside no_sync on sharpness steps (each rank perturbs along its own
                        gradient); g = sum of the k gradients, the gradient of the whole batch
                        [16-mixed: unscale; inf/NaN on any rank -> SkipStep]
    core:               w <- w + e(g); gradients cleared
    pass 2 (at w + e):  micro-batches 1..k again (1..k-1 in no_sync, k all-reduced), with
                        self.log / log_dict discarded, torchmetrics states put back afterwards,
                        zero_grad not repeated, BatchNorm statistics frozen (the core)
                        [16-mixed: unscale; inf/NaN -> SkipStep]
                        on_before_optimizer_step hooks, then gradient_clip_val (once, on the
                        gradient the base optimizer uses)
    core:               w <- the kept w exactly; the base optimizer's step

so ``accumulate_grad_batches=k`` is SAM on the whole batch of ``k`` micro-batches (as a batch
``k`` times larger would be). On steps that are not sharpness steps (``interval > 1``) there is
one pass, exactly Lightning's. Which steps perturb follows ``trainer.global_step``, the step
counter every rank shares and a checkpoint restores. What ``training_step`` returned on the
first pass stays the step's output (``on_train_batch_end``'s ``outputs``).

Overflow (``16-mixed``): :class:`~zsharp_algos.lightning.scaler.LightningClosureScaler` replaces the
plugin's ``torch.amp.GradScaler`` while training runs; a pass with inf/NaN gradients raises
:class:`~zsharp_algos.SkipStep`, so the core restores the weights exactly and skips the base
step, and the scale backs off once per step.

Lightning internals used (checked at attach time; pinned by the ``lightning`` extra): the
precision plugin's ``optimizer_step`` and ``_after_closure``, the automatic-optimization loop's
``_make_closure``, its ``Closure`` (``_result``, ``_zero_grad_fn``), ``trainer._results`` and
``trainer._logger_connector.should_update_logs``.
"""
from __future__ import annotations

import weakref
from contextlib import contextmanager, nullcontext
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import Tensor

from ..optimizer import SharpnessAwareOptimizer, SkipStep
from ._framework import Framework, framework_of
from .scaler import LightningClosureScaler

__all__ = ["SharpnessAwareDriver", "GlobalStep", "check_supported", "SUPPORTED"]

SUPPORTED = (
    "automatic optimization on one device or with DDP (strategy 'auto', 'ddp', 'ddp_spawn', 'ddp_fork', "
    "'ddp_notebook'; gloo on CPU, nccl on GPUs), precision '32-true', 'bf16-mixed', '16-mixed' "
    "(also '64-true', '16-true', 'bf16-true')"
)
_SHARDED = (
    "sharded training is not supported by the Lightning integration yet (Lightning's FSDPStrategy is FSDP1, "
    "FullyShardedDataParallel's flat parameters; its ModelParallelStrategy, FSDP2 and tensor parallelism, "
    "is not supported yet; DeepSpeed neither); use strategy='ddp' here. The core optimizers support FSDP2 "
    "(torch.distributed.fsdp.fully_shard) in a plain PyTorch loop, with Accelerate, the Hugging Face "
    "Trainer and Composer"
)


class GlobalStep:
    """``schedule`` for the core optimizer: the trainer's ``global_step`` (0-based index of the
    coming optimizer step while it runs). Holds the trainer weakly."""

    def __init__(self, trainer: Any):
        self._trainer = weakref.ref(trainer)

    def __call__(self) -> int:
        trainer = self._trainer() if self._trainer is not None else None
        if trainer is None:
            raise RuntimeError(
                "this optimizer's steps follow a Lightning Trainer's global_step, and that trainer is gone; "
                "set optimizer.schedule = None to count its own steps"
            )
        return trainer.global_step

    def __getstate__(self):
        return {"_trainer": None}  # a trainer is not pickled along with an optimizer


def check_supported(trainer: Any, who: str) -> None:
    """Raise :class:`ValueError` (what is supported, what this trainer uses) for set-ups the
    two-pass step does not handle: sharded strategies, XLA, manual optimization, precision
    plugins that step the optimizer their own way."""
    fw = framework_of(trainer)
    strategy = trainer.strategy
    sharded = [fw.strategy(n) for n in ("FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy")]
    xla = [fw.strategy(n) for n in ("XLAStrategy", "SingleDeviceXLAStrategy")]
    allowed = tuple(c for c in (fw.strategy("SingleDeviceStrategy"), fw.strategy("DDPStrategy")) if c is not None)
    name = type(strategy).__name__
    if any(c is not None and isinstance(strategy, c) for c in sharded):
        raise ValueError(f"{who} supports {SUPPORTED}; this Trainer uses {name}: {_SHARDED}")
    if any(c is not None and isinstance(strategy, c) for c in xla):
        raise ValueError(
            f"{who} supports {SUPPORTED}; this Trainer uses {name} (XLA steps optimizers without a closure)"
        )
    if not isinstance(strategy, allowed):
        raise ValueError(f"{who} supports {SUPPORTED}; this Trainer uses {name}")
    plugin = strategy.precision_plugin
    stock = {fw.precision("Precision").optimizer_step, fw.precision("MixedPrecision").optimizer_step}
    if type(plugin).optimizer_step not in stock:
        raise ValueError(
            f"{who} supports {SUPPORTED}; this Trainer's precision plugin {type(plugin).__name__} steps the "
            "optimizer its own way"
        )
    module = trainer.lightning_module
    if module is not None and not module.automatic_optimization:
        raise ValueError(
            f"{who} drives Lightning's automatic optimization; with automatic_optimization = False build "
            "zsharp_algos.SAM / ZSharp yourself and call opt.step(closure) (the closure runs forward and "
            "self.manual_backward) or first_step() / second_step() in training_step"
        )


class SharpnessAwareDriver:
    """Runs the steps of the sharpness-aware optimizers of one ``Trainer.fit`` (module doc).

    Args:
        trainer: the trainer, set up (its optimizers are the sharpness-aware ones).
        who: the name used in error messages (the callback's class).
        sync_first_pass: all-reduce the first pass under DDP (default False: each rank
            perturbs along its own gradient; the second pass is always all-reduced, so the
            base step, and the weights, are the same on every rank).
    """

    def __init__(self, trainer: Any, *, who: str = "SharpnessAwareCallback", sync_first_pass: bool = False):
        self.trainer = trainer
        self.who = who
        self.sync_first_pass = bool(sync_first_pass)
        self.fw: Framework = framework_of(trainer)
        self.plugin: Any = None
        self.scaler: LightningClosureScaler | None = None
        self._torch_scaler: Any = None
        self._loop: Any = None
        self._recorded: list[Any] = []  # this step's closures so far, oldest first
        self.stepped = False  # an optimizer step ran since the last log_stats()

    # ------------------------------------------------------------------ set-up
    def attach(self) -> None:
        """Take over the precision plugin's step, swap in the closure-aware scaler (16-mixed),
        record the loop's closures, and point the optimizers at the trainer's step counter
        and LightningModule."""
        trainer = self.trainer
        check_supported(trainer, self.who)
        optimizers = [o for o in trainer.optimizers if isinstance(o, SharpnessAwareOptimizer)]
        if not optimizers:
            raise TypeError(
                f"{self.who}: the trainer has no sharpness-aware optimizer (configure_optimizers returned "
                f"{', '.join(type(o).__name__ for o in trainer.optimizers) or 'none'})"
            )
        module = trainer.lightning_module
        for opt in optimizers:
            if getattr(opt, "schedule", None) is None or isinstance(opt.schedule, GlobalStep):
                opt.schedule = GlobalStep(trainer)
            if opt.model is None:
                opt.model = module  # the second pass freezes all its norm layers (micro-batches included)
        strategy = trainer.strategy
        plugin = strategy.precision_plugin
        strategy.precision_plugin = plugin  # keep this object (the property may build a fresh one)
        scaler = getattr(plugin, "scaler", None)
        if scaler is not None:
            if isinstance(scaler, LightningClosureScaler):
                self.scaler = scaler
            elif isinstance(scaler, torch.amp.GradScaler):
                self._torch_scaler = scaler
                self.scaler = plugin.scaler = LightningClosureScaler.from_torch(scaler)
            else:
                raise ValueError(
                    f"{self.who}: the precision plugin's scaler is a {type(scaler).__name__}; 16-mixed is supported "
                    "with Lightning's own torch.amp.GradScaler"
                )
        loop = trainer.fit_loop.epoch_loop.automatic_optimization
        if not callable(getattr(type(loop), "_make_closure", None)) or not hasattr(plugin, "_after_closure"):
            raise RuntimeError(
                f"{self.who} needs Lightning 2.x internals this version does not have "
                f"({type(loop).__name__}._make_closure, Precision._after_closure); install lightning==2.6.6"
            )
        self.plugin, self._loop = plugin, loop
        plugin.optimizer_step = self.optimizer_step
        loop._make_closure = self._make_closure
        self._recorded = []

    def detach(self) -> None:
        """Undo :meth:`attach` (idempotent). The optimizers stay sharpness-aware."""
        if self.plugin is not None:
            self.plugin.__dict__.pop("optimizer_step", None)
            if self._torch_scaler is not None and self.scaler is not None:
                self.plugin.scaler = self.scaler.to_torch(self._torch_scaler)
            self.plugin = None
        if self._loop is not None:
            self._loop.__dict__.pop("_make_closure", None)
            self._loop = None
        self._recorded = []
        self.scaler = self._torch_scaler = None

    # ------------------------------------------------------------------ recording the micro-batches
    def _make_closure(self, kwargs: Any, optimizer: Any, batch_idx: int) -> Any:
        """The loop's own closure, remembered (with its first-pass loss) until the step, so the
        second pass can run the step's earlier micro-batches again."""
        loop = self._loop
        closure = type(loop)._make_closure(loop, kwargs, optimizer, batch_idx)
        if getattr(closure, "_zero_grad_fn", None) is not None:
            self._recorded = []  # the first micro-batch of a step (Lightning zeroes the gradients here)
        run = closure.closure

        def run_and_keep_loss(*args, **kw):
            result = run(*args, **kw)
            closure._zsharp_loss = result.loss
            return result

        closure.closure = run_and_keep_loss
        self._recorded.append(closure)
        return closure

    # ------------------------------------------------------------------ the step
    def optimizer_step(self, optimizer: Any, model: Any = None, closure: Callable[[], Any] | None = None, **kwargs):
        """Replaces the precision plugin's ``optimizer_step`` (same signature)."""
        recorded, self._recorded = self._recorded, []
        model = model if model is not None else self.trainer.lightning_module
        if not isinstance(optimizer, SharpnessAwareOptimizer):
            if self.scaler is not None:
                raise RuntimeError(
                    f"{self.who}: {type(optimizer).__name__} is not sharpness-aware, and 16-mixed steps here go "
                    "through the closure-aware scaler; wrap every optimizer"
                )
            return type(self.plugin).optimizer_step(self.plugin, optimizer, model=model, closure=closure, **kwargs)
        if kwargs:
            raise TypeError(
                f"{type(optimizer).__name__}.step() takes only a closure; got extra arguments {sorted(kwargs)}"
            )
        self.stepped = True
        Closure = self.fw.Closure
        current = recorded[-1] if recorded else (closure if isinstance(closure, Closure) else None)
        earlier = recorded[:-1]
        try:
            # closure_step: earlier micro-batches' backward passes have run, by design
            return optimizer.closure_step(self._pass_closure(optimizer, model, closure, current, earlier))
        finally:
            if self.scaler is not None:
                self.scaler.update()

    def _pass_closure(self, optimizer, model, closure, current, earlier: Sequence[Any]) -> Callable[[], Any]:
        """The closure the core calls once per pass (module doc)."""
        plugin, strategy = self.plugin, self.trainer.strategy
        sharp = optimizer.is_sharpness_step()
        unsynced = sharp and not (self.sync_first_pass or optimizer.first_pass_must_sync) and self.trainer.world_size > 1
        state = {"calls": 0, "first_result": None}

        def one_pass():
            state["calls"] += 1
            if state["calls"] == 1:
                with self._no_sync() if unsynced else nullcontext():
                    loss = closure()
                state["first_result"] = getattr(current, "_result", None)
                self._check_overflow(optimizer, across_ranks=unsynced)
                if not sharp:
                    plugin._after_closure(model, optimizer)
                return _total([getattr(c, "_zsharp_loss", None) for c in earlier] + [loss])
            losses = []
            with self._second_pass(model, [*earlier, current], current, state["first_result"]):
                for c in earlier:
                    with self._no_sync():
                        losses.append(c())
                losses.append(closure())
            self._check_overflow(optimizer, across_ranks=False)  # all-reduced: the same on every rank
            plugin._after_closure(model, optimizer)  # on_before_optimizer_step hooks, gradient clipping
            return _total(losses)

        return one_pass

    def _no_sync(self):
        block = getattr(self.trainer.strategy, "block_backward_sync", None)
        return block() if block is not None else nullcontext()

    def _check_overflow(self, optimizer: Any, across_ranks: bool) -> None:
        scaler = self.scaler
        if scaler is None or not scaler.enabled:
            return
        found = scaler.unscale_(optimizer)
        if across_ranks:
            found = scaler.overflow_anywhere(found, self.trainer.strategy)
        if found:
            raise SkipStep("inf/NaN gradients under 16-mixed loss scaling")

    @contextmanager
    def _second_pass(self, model: Any, closures: Sequence[Any], current: Any, first_result: Any) -> Iterator[None]:
        """Keeps the perturbed pass out of the logs, the metrics and the step's output."""
        results = self.trainer._results
        kept_zero_grad = [(c, c._zero_grad_fn) for c in closures if c is not None and hasattr(c, "_zero_grad_fn")]
        for c, _ in kept_zero_grad:
            c._zero_grad_fn = None  # the core cleared the gradients; no second zero_grad hook
        if results is not None:
            results.log = _discard_log
        try:
            with _metric_states_kept(model):
                yield
        finally:
            if results is not None:
                results.__dict__.pop("log", None)
            for c, fn in kept_zero_grad:
                c._zero_grad_fn = fn
            for c in closures:
                if c is not None and c is not current:
                    c._result = None  # consumed by the loop already, as after the first pass
            if current is not None:
                current._result = first_result

    # ------------------------------------------------------------------ logging
    def log_stats(self, module: Any) -> None:
        """Log the sharpness statistics (``sharpness/*``, :mod:`zsharp_algos.stats`) through
        ``module.log`` on the batches the trainer sends logs to its loggers, averaged since the
        last time (and over ranks). No host sync besides the trainer's own logging."""
        if not self.stepped:
            return
        self.stepped = False
        trainer = self.trainer
        if getattr(trainer, "barebones", False) or not _logging_due(trainer):
            return
        sync = trainer.world_size > 1
        for opt in trainer.optimizers:
            if isinstance(opt, SharpnessAwareOptimizer) and opt.stats.pending():
                for name, value in opt.stats.pop_tensors().items():
                    module.log(name, value, on_step=True, on_epoch=False, sync_dist=sync, batch_size=1)


def _discard_log(*args, **kwargs) -> None:
    """``_ResultCollection.log`` during the second pass."""


def _logging_due(trainer: Any) -> bool:
    connector = getattr(trainer, "_logger_connector", None)
    due = getattr(connector, "should_update_logs", None)
    if isinstance(due, bool):
        return due
    n = trainer.log_every_n_steps
    return n > 0 and trainer.global_step % n == 0


def _total(losses: Sequence[Any]) -> Tensor | None:
    """Sum of the micro-batches' (already 1/k-normalised) losses: the step's loss."""
    present = [loss for loss in losses if isinstance(loss, Tensor)]
    if not present:
        return None
    total = present[0]
    for loss in present[1:]:
        total = total + loss
    return total


@contextmanager
def _metric_states_kept(module: Any) -> Iterator[None]:
    """Put every ``torchmetrics.Metric`` of ``module`` back as it was on exit: its states
    (tensors restored in place where the update worked in place, so state shared inside a
    ``MetricCollection`` stays shared; list states cut back), update count and cached values."""
    try:
        from torchmetrics import Metric
    except ImportError:  # pragma: no cover - torchmetrics comes with Lightning
        yield
        return
    saved = []
    for m in module.modules():
        if not isinstance(m, Metric):
            continue
        states = {}
        for name, value in m.metric_state.items():
            if isinstance(value, Tensor):
                states[name] = (value, value.detach().clone())
            elif isinstance(value, list):
                states[name] = (value, list(value))
            else:
                states[name] = (value, None)
        extras = {k: getattr(m, k) for k in ("_update_count", "_computed", "_forward_cache") if hasattr(m, k)}
        saved.append((m, states, extras))
    try:
        yield
    finally:
        for m, states, extras in saved:
            for name, (obj, copy) in states.items():
                if isinstance(obj, Tensor):
                    if obj.shape == copy.shape:
                        with torch.no_grad():
                            obj.copy_(copy)
                    else:
                        obj = copy
                elif isinstance(obj, list):
                    obj[:] = copy
                setattr(m, name, obj)
            for k, v in extras.items():
                setattr(m, k, v)
