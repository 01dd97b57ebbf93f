r"""Sharpness-aware optimizers: a base-optimizer wrapper shared by SAM and ZSharp.

One sharpness step, for a base optimizer ``base`` and an ascent direction ``d(g)``
(:mod:`zsharp_algos.directions`)::

    g  = grad L(w)                          # first pass (closure call 1)
    e  = rho * T^2 d(g) / (||T d(g)|| + eps) # T = |w| if adaptive else 1 (zsharp_algos.engine)
    w' = w + e                              # w itself is kept aside, untouched (zsharp_algos.placement)
    g' = grad L(w')                         # second pass (closure call 2), BatchNorm statistics frozen
    w  = the kept w                         # exact restore (never w' - e), in a finally
    base.step() with g'                     # momentum, weight decay, LR: all the base optimizer's

With ``interval=k`` only every k-th step is a sharpness step; the others are plain base steps
that call the closure once. ``rho``, ``interval``, ``adaptive``, ``eps`` (and ZSharp's
``percentile``, ``scope``) are param-group keys, as ``lr`` is: each group may set its own, and
``rho=0`` leaves a group unperturbed (see :func:`zsharp_algos.no_perturbation_groups`).

The class does the bookkeeping (param groups shared with the base optimizer, the closure
protocol, the step counter, checkpoints); the math is in :mod:`zsharp_algos.engine`.
"""
from __future__ import annotations

import functools
import numbers
import warnings
import weakref
from contextlib import nullcontext
from typing import Any, Callable, Iterable

import torch
from torch import nn

from .batchnorm import frozen_norm_stats, norm_layers_seen
from .directions import Direction, GradientDirection, ZScoreDirection
from .engine import PerturbationEngine, group_due
from .sharding import local
from .options import (
    OPTIONS,
    SAM_OPTIONS,
    VARIANT_OPTIONS,
    ZSHARP_OPTIONS,
    GroupOptions,
    Option,
    check_options,
    fixed_variant,
    keywords_of,
)
from .rules import FirstPassGradients, FriendlyMomentum, GSAMUpdate, LookSAMReuse, OwnState
from .variants import VARIANTS, check_combination, transform_for

__all__ = ["SharpnessAwareOptimizer", "SAM", "ZSharp", "FriendlySAM", "GSAM", "GCSAM", "SkipStep"]

Closure = Callable[[], Any]
RHO_KEY = OPTIONS["rho"].key


def _option_attribute(name: str) -> property:
    def get(self):
        return self.group_options.value(self.param_groups, name)

    def set(self, value):
        value = self.group_options.set_all(self.param_groups, name, value)
        self._options_defaults[name] = value  # groups added later get it too
        self.defaults[OPTIONS[name].key] = value

    get.__name__ = name
    return property(
        get,
        set,
        doc=f"The {name} of every param group (``param_groups[i][{OPTIONS[name].key!r}]``). Setting it sets it in "
        "every group; reading or setting raises ``ValueError`` while the groups differ (then use param_groups).",
    )


def _add_option_attributes(cls: type) -> None:
    for option in cls.options:
        if not isinstance(getattr(cls, option.name, None), property):
            setattr(cls, option.name, _option_attribute(option.name))


class SkipStep(Exception):
    """Raise from a closure to skip this optimizer step (a grad scaler saw inf/NaN, say): the
    weights are restored exactly, the base optimizer does not step, and
    :attr:`SharpnessAwareOptimizer.skipped_steps` counts it. ``step()`` returns ``None``."""


class SharpnessAwareOptimizer(torch.optim.Optimizer):
    """Wraps a base optimizer and perturbs the weights along a direction before its step.

    Three ways to build one (all common in the wild)::

        SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)  # class + kwargs
        SAM(params=model.parameters(), base_optimizer=torch.optim.SGD, lr=0.1)   # by keyword
        SAM(torch.optim.AdamW(model.parameters(), lr=1e-3), rho=0.05)            # an instance

    Args:
        params: parameters or param groups (together with ``base_optimizer``), or an already
            constructed ``torch.optim.Optimizer`` to wrap. Groups may carry their own options.
        base_optimizer: optimizer class, when ``params`` holds parameters.
        rho: radius of the perturbation, ``>= 0``, default 0.05; ``0`` for a group leaves it
            unperturbed and out of the norm (no second pass at all if no group is perturbed).
        interval: a sharpness step every ``interval``-th step (steps ``interval``, ``2*interval``,
            ... counting from 1); the others call the closure once. Default 1.
        adaptive: ASAM-style element-wise scaling ``T = |w|``; use a larger ``rho`` (0.5 to 2).
        eps: added to the norm that divides ``rho``. Default 1e-12.
        max_grad_norm: if set, clip the gradient the base optimizer uses (the second pass's on
            sharpness steps) to this global norm right before the base step.
        model: the model; its BatchNorm running statistics are frozen in the second pass of
            :meth:`step`. Without it, the layers that updated them in the first pass are frozen
            (found with a forward pre-hook during that pass).
        schedule: a callable returning the 0-based index of the coming step, for frameworks with
            their own step counter (``lambda: trainer.global_step``); default :attr:`step_count`.
        record_stats: record :mod:`sharpness statistics <zsharp_algos.stats>` in :attr:`stats`.
        direction: (:class:`SharpnessAwareOptimizer` only) the :class:`~zsharp_algos.directions.Direction`.
        **base_kwargs: passed to ``base_optimizer``.

    Attributes:
        step_count: base steps taken (skipped steps not counted); saved in ``state_dict``.
        skipped_steps: steps skipped through :class:`SkipStep` (overflow), also saved.
    """

    #: The options this optimizer takes (param-group keys), in :mod:`zsharp_algos.options`.
    options: tuple[Option, ...] = SAM_OPTIONS
    #: The update rules (:mod:`zsharp_algos.rules`) that may change the gradient the base steps with.
    #: FriendlyMomentum reads the kept first-pass gradient; the others use it up: it runs first.
    rules: tuple = (FriendlyMomentum(), LookSAMReuse(), GSAMUpdate())
    #: The options the direction takes (a subset of :attr:`options`).
    direction_options: tuple[str, ...] = ()
    #: Composer's trainer passes closures under fp16 only to optimizers that set this.
    _step_supports_amp_closure = True

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        _add_option_attributes(cls)  # opt.percentile for ZSharp, and each subclass's own options

    def __init__(
        self,
        params: Iterable | torch.optim.Optimizer | None = None,
        base_optimizer: type[torch.optim.Optimizer] | None = None,
        *,
        max_grad_norm: float | None = None,
        model: nn.Module | None = None,
        schedule: Callable[[], int] | None = None,
        record_stats: bool = True,
        direction: Direction | None = None,
        **kwargs,
    ):
        owner = type(self).__name__
        if "params_or_optimizer" in kwargs:  # the keyword name of earlier versions
            if params is not None:
                raise TypeError(f"{owner}: pass params or params_or_optimizer, not both")
            params = kwargs.pop("params_or_optimizer")
        if params is None:
            raise TypeError(f"{owner} needs params (parameters or param groups, or an optimizer instance to wrap)")
        # Our options are checked here, before the base optimizer sees the rest: one this
        # optimizer does not take (percentile for SAM) is named as such, not blamed on SGD.
        ours = {k: kwargs.pop(k) for k in list(kwargs) if k in OPTIONS}
        _refuse_shared_keywords(ours, params, base_optimizer, kwargs, owner)
        given = check_options(ours, self.options, owner)
        options = {**{o.name: o.default for o in self.options}, **given}
        _refuse_other_variants_options(given, options.get("variant"), owner)
        if max_grad_norm is not None and not (
            isinstance(max_grad_norm, (int, float)) and not isinstance(max_grad_norm, bool) and max_grad_norm > 0
        ):
            raise ValueError(f"{owner}: max_grad_norm must be a positive number or None, got {max_grad_norm!r}")
        if schedule is not None and not callable(schedule):
            raise TypeError(f"{owner}: schedule must be a callable returning the coming step's index, got {schedule!r}")
        base = _base_optimizer(params, base_optimizer, kwargs, owner)
        self.base_optimizer = base
        self._options_defaults = options
        has_variant = any(o.name == "variant" for o in self.options)
        self.group_options = GroupOptions(
            self.options, owner, base_names=base.defaults, combination=check_combination if has_variant else None
        )
        self.max_grad_norm = max_grad_norm
        self.model = model
        self.schedule = schedule
        self.step_count = 0
        self.skipped_steps = 0
        self._first_step_done = False  # first_step() ran since the last base step
        self._left_grad: tuple[Any, int] | None = None  # (weakref to a gradient, its version) after step(closure)
        self._warned_ported_loop = False
        # Share param_groups and state with the base: LR schedulers, grad clipping and framework
        # code that inspects the optimizer see (and change) the base's. Optimizer.__init__ gets
        # copies of the groups only to set up its hooks; add_param_group below tells it apart.
        super().__init__([dict(g) for g in base.param_groups], {})
        self.param_groups = base.param_groups
        self.state = base.state
        for group in self.param_groups:
            self._fill_options(group)
        self.defaults = dict(base.defaults, **{OPTIONS[k].key: v for k, v in options.items()})
        self.first_gradients = FirstPassGradients()
        make_direction = (lambda: direction) if direction is not None else self.make_direction
        self.engine = PerturbationEngine(
            self, make_direction, self.direction_options, record_stats=record_stats, options=self.group_options
        )

    # ------------------------------------------------------------------ options
    @staticmethod
    def make_direction(**options) -> Direction:
        """The direction for a pool of groups sharing ``options`` (the :attr:`direction_options`)."""
        return GradientDirection()

    def _fill_options(self, group: dict) -> None:
        """Give ``group`` every option under its key (the constructor's values where it sets
        none), validated."""
        self.group_options.fill(group, self._options_defaults)

    def add_param_group(self, param_group: dict) -> None:
        if not hasattr(self, "engine"):
            return super().add_param_group(param_group)  # inside Optimizer.__init__: its own copies
        self.base_optimizer.add_param_group(param_group)
        self._fill_options(self.param_groups[-1])

    @property
    def stats(self):
        """The ``sharpness/*`` statistics recorded so far (:class:`~zsharp_algos.SharpnessStats`):
        ``opt.stats.pop()`` reads and resets them."""
        return self.engine.stats

    def record_loss_gap(self, first: Any, second: Any) -> None:
        """Record ``L(w + e) - L(w)`` of one (micro-)batch, if both passes returned a loss (a
        tensor, or a number: Composer's closure returns floats) and statistics are recorded."""
        if not self.engine.record_stats:
            return
        first, second = _loss_tensor(first), _loss_tensor(second)
        if first is not None and second is not None:
            self.stats.add_loss_gap(first, second)

    def hparams(self) -> dict[str, Any]:
        """The option values new param groups get (the constructor's, or what was last set
        through the attributes), plain Python types; groups may override them."""
        return dict(self._options_defaults)

    # ------------------------------------------------------------------ the step
    def _coming_step(self) -> int:
        return int(self.schedule()) if self.schedule is not None else self.step_count

    def is_sharpness_step(self) -> bool:
        """Whether the coming step perturbs: some group has ``rho > 0`` and is due by its
        ``interval`` and ``interval_mode`` (:func:`zsharp_algos.schedule.sharpness_due`)."""
        return self.engine.is_due(self._coming_step())

    @property
    def first_pass_must_sync(self) -> bool:
        """Whether the first pass's gradient must be the same on every data-parallel rank (a
        rule steps with it, LookSAM's ``g_v``, and ranks that used their own would drift apart).
        Integrations that skip the first pass's all-reduce (Composer, Lightning, the HF Trainer,
        accelerate) run it synchronised then."""
        return any(g[RHO_KEY] > 0 and self._has_rule(g) for g in self.param_groups)

    def _has_rule(self, group: dict) -> bool:
        """Whether a rule applies to ``group``: every rule steps with, or keeps state from, the
        first pass's gradient."""
        return any(r.applies(group) for r in self.rules)

    def _rule_groups(self, rule) -> list[dict]:
        """The param groups ``rule`` applies to that are ever perturbed (``rho > 0``)."""
        return [g for g in self.param_groups if rule.applies(g) and g[RHO_KEY] > 0]

    @torch.no_grad()
    def step(self, closure: Closure | None = None):
        """One optimization step.

        With a closure (zero_grad + forward + backward, returning the loss or ``None``): calls it
        twice on sharpness steps (the second time at ``w + e`` with BatchNorm statistics frozen),
        once otherwise, then takes the base step. A closure may raise :class:`SkipStep` to skip
        the step with the weights exactly as they were. Returns the first pass's result.

        Without a closure: the base step after a two-pass backward driven from outside
        (:meth:`first_step` and :meth:`restore` ran since the last step), or on a step that is
        not a sharpness step.
        """
        if self.engine.perturbed:
            raise RuntimeError(
                f"{type(self).__name__}.step() called while the weights are perturbed (first_step() ran): "
                "finish a manual step with second_step(), or use step(closure) alone"
            )
        if closure is None:
            if self._is_state_initialisation():
                self.base_optimizer.step()  # creates the base's state (momentum...); lr is 0
                self._init_rule_state(OwnState(self.state))  # and ours, so that a load fills it
                return None
            if self.is_sharpness_step() and not self._first_step_done:
                raise RuntimeError(
                    f"{type(self).__name__}.step() without a closure on a sharpness step, and no first_step() ran: "
                    "pass a closure (zero_grad + forward + backward + return loss), or call first_step() and "
                    "second_step() around your second forward/backward. A framework that owns backward needs our "
                    "integration: zsharp_algos.hf.Trainer (or the zsharp-hf launcher) for the Hugging Face Trainer, "
                    "zsharp_algos.accelerate_loop.TwoPassBackward for accelerate loops, the Composer algorithms, "
                    "and for Lightning zsharp_algos.lightning.SharpnessAwareCallback (or LightningSAM / LightningZSharp)"
                )
            self.base_step()
            return None
        _refuse_lightning_closure(self, closure)
        self._warn_if_ported_loop()
        loss = self.closure_step(closure)
        self._remember_gradients()
        return loss

    def closure_step(self, closure: Closure) -> Any:
        """:meth:`step` with a closure, without its checks of how it is called (a framework's
        driver that has run micro-batches' backward passes before the step calls this)."""
        closure = torch.enable_grad()(closure)
        try:
            if not self.is_sharpness_step():
                loss = closure()
            else:
                with nullcontext([]) if self.model is not None else norm_layers_seen() as seen:
                    loss = closure()
                self.first_step(zero_grad=True)
                try:
                    with frozen_norm_stats(self.model if self.model is not None else seen):
                        second = closure()
                finally:
                    self.restore()
                self.record_loss_gap(loss, second)
        except SkipStep:
            self.restore()  # already done unless the first pass raised
            self._first_step_done = False
            self.skipped_steps += 1
            return None
        self.base_step()
        return loss

    def _warn_if_ported_loop(self) -> None:
        """Warn once if ``step(closure)`` finds gradients that it did not leave: a backward ran
        outside the closure, as in loops written for SAM implementations whose closure runs only
        the second pass (here that is a third forward and backward)."""
        if self._warned_ported_loop:
            return
        grad = next((p.grad for g in self.param_groups for p in g["params"] if p.grad is not None), None)
        if grad is None:
            return
        left = self._left_grad
        if left is not None and left[0]() is grad and left[1] == grad._version:
            return
        self._warned_ported_loop = True
        warnings.warn(
            f"{type(self).__name__}.step(closure) found gradients already computed: our closure runs a whole pass "
            "(zero_grad, forward, backward) and step() calls it twice, so a backward before step(closure), as in "
            "loops written for other SAM implementations, costs a third forward and backward. Drop it and call "
            "opt.zero_grad() at the top of the closure (docs/loop.md, 'Coming from other SAM code')",
            UserWarning,
            stacklevel=3,
        )

    def _remember_gradients(self) -> None:
        grad = next((p.grad for g in self.param_groups for p in g["params"] if p.grad is not None), None)
        self._left_grad = None if grad is None else (weakref.ref(grad), grad._version)

    def _is_state_initialisation(self) -> bool:
        """Whether this closure-less ``step()`` is ``torch.distributed.checkpoint``'s (and
        frameworks' that use it) state initialisation before a load: a fresh optimizer, every
        ``lr`` 0 and every gradient zero. It is passed to the base optimizer and not counted.
        (The one host read is on this rare path only.)"""
        if self.step_count or self.state or self._first_step_done:
            return False
        groups = self.param_groups
        if not all("lr" in g and float(g["lr"]) == 0.0 for g in groups):
            return False
        grads = [local(p.grad) for g in groups for p in g["params"] if p.grad is not None]
        return bool(grads) and all(not bool(g.count_nonzero()) for g in grads)

    @torch.no_grad()
    def first_step(self, zero_grad: bool = True, *, accumulate: bool = False) -> None:
        """Move the weights to ``w + e`` (the groups due at this step), keeping ``w`` for
        :meth:`restore`. With ``zero_grad`` (the default: the second backward must not add to
        them) the gradients are set to ``None`` and their memory may hold ``w + e``; otherwise
        they hold ``e`` afterwards. ``accumulate``: this is a later micro-batch of the step (each
        is perturbed by its own gradient): the first-pass gradient that rules step with
        (:mod:`zsharp_algos.rules`) is the sum of the micro-batches'."""
        if self.engine.perturbed:
            raise RuntimeError(
                "first_step() called twice without second_step() or restore() in between: finish the step first"
            )
        step = self._coming_step()
        self._keep_first_gradients(step, accumulate=accumulate)
        self.engine.perturb(step, free_grads=zero_grad)
        self._first_step_done = True
        if zero_grad:
            self.zero_grad(set_to_none=True)

    def _keep_first_gradients(self, step: int, accumulate: bool) -> None:
        """Keep ``g`` of the groups due at ``step`` whose rule steps with it (before the
        direction overwrites it); micro-batches of one step add up."""
        keep = [g for g in self.engine.groups_due(step) if self._has_rule(g)]
        params = [p for g in keep for p in g["params"] if p.grad is not None]
        if params:
            self.first_gradients.keep(
                [local(p) for p in params], [local(p.grad) for p in params], self.engine.trainable_local, accumulate
            )

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """Restore the saved weights exactly and take the base optimizer's step."""
        if not self._first_step_done:
            raise RuntimeError(
                "second_step() without first_step(): the gradient is a plain one; call first_step() after the "
                "first backward, or use step(closure)"
            )
        self.restore()
        self.base_step()
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def restore(self) -> None:
        """Put the weights back exactly as they were before :meth:`first_step` (a no-op when
        not perturbed)."""
        self.engine.restore()

    @torch.no_grad()
    def base_step(self) -> None:
        """The base optimizer's step on the current gradients (clipped first if
        ``max_grad_norm``), counted in :attr:`step_count`."""
        if self.engine.perturbed:
            raise RuntimeError("base_step() while the weights are perturbed: restore() first")
        state = OwnState(self.state)
        self._apply_rules(self._coming_step(), self._first_step_done, state)
        self._first_step_done = False
        self.step_count += 1
        self.stats.end_step()
        if self.max_grad_norm is not None:
            params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
            torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm, foreach=True)
        with state.hidden():
            self.base_optimizer.step()

    def _init_rule_state(self, state: OwnState) -> None:
        """Each rule's state entries for the tensors of its perturbed groups (``rho > 0``), where
        they are still missing (:meth:`zsharp_algos.rules.Rule.init_state`)."""
        for rule in self.rules:
            groups = self._rule_groups(rule)
            if groups:
                rule.init_state(groups, state)

    def _apply_rules(self, step: int, perturbed: bool, state: OwnState) -> None:
        """Each rule (:mod:`zsharp_algos.rules`) on its groups: after the sharpness step where
        the group was perturbed, on the plain step otherwise."""
        for rule in self.rules:
            groups = self._rule_groups(rule)
            if not groups:
                continue
            due = [perturbed and group_due(g, step) for g in groups]
            sharp = [g for g, d in zip(groups, due) if d]
            if sharp:
                rule.after_sharpness_step(sharp, state, self.first_gradients)
            plain = [g for g, d in zip(groups, due) if not d]
            if plain:
                rule.plain_step(plain, state)

    # ------------------------------------------------------------------ plumbing
    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base_optimizer.zero_grad(set_to_none=set_to_none)
        self._remember_gradients()  # zeroed in place by us: not a backward run outside the closure

    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state dict (momentum etc.; the options ride in its
        ``param_groups``) plus a ``"sharpness"`` entry with the step counters (so ``interval``
        keeps its phase on resume)."""
        sd = self.base_optimizer.state_dict()
        sd["sharpness"] = {
            "optimizer": type(self).__name__,
            "format": STATE_FORMAT,
            "step_count": self.step_count,
            "skipped_steps": self.skipped_steps,
        }
        # The counters ride in the (copied) groups too: torch.distributed.checkpoint's
        # get_state_dict, which FSDP2 frameworks save through, keeps only "state" and
        # "param_groups".
        for group in sd["param_groups"]:
            group.update({_GROUP_KEYS[k]: v for k, v in sd["sharpness"].items() if k in _GROUP_KEYS})
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Loads the base optimizer's state and the saved options of each group (as
        ``torch.optim`` restores ``lr``), and the step counters."""
        state_dict = dict(state_dict)
        extra = state_dict.pop("sharpness", None) or {}
        saved_kind = _kind(extra.get("optimizer", ""))
        if saved_kind and saved_kind != _kind(type(self).__name__):
            raise ValueError(
                f"state dict is from a {extra['optimizer']} optimizer, this one is {type(self).__name__}: "
                "load it into the same kind of optimizer"
            )
        self.base_optimizer.load_state_dict(state_dict)
        # The base may have replaced its state/groups containers: keep sharing them.
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state
        for group in self.param_groups:
            for name, key in _GROUP_KEYS.items():
                if key in group:
                    extra.setdefault(name, group.pop(key))
            if extra.get("format", 1) < 2:
                self._migrate_format_1(group)
            self._fill_options(group)
        self.step_count = int(extra.get("step_count", self.step_count))
        self.skipped_steps = int(extra.get("skipped_steps", self.skipped_steps))

    def _migrate_format_1(self, group: dict) -> None:
        """A group saved before the options had keys of their own: the plain ``rho``, ``interval``,
        ... are moved by :meth:`_fill_options` (unless the base owns the name); the norm epsilon
        was ``eps``: it becomes ``perturb_eps`` where the base takes no ``eps`` (SGD), and stays the
        base's where it does (Adam's ``eps`` was then read as both)."""
        if "eps" in group and "eps" not in self.base_optimizer.defaults:
            group.setdefault(OPTIONS["perturb_eps"].key, group.pop("eps"))

    def __getstate__(self):
        return self.__dict__

    def __setstate__(self, state):
        self.__dict__.update(state)

    def __repr__(self) -> str:
        # rho, and the options set away from their defaults
        defaults = {o.name: o.default for o in self.options}
        hp = ", ".join(f"{k}={v!r}" for k, v in self.hparams().items() if k == "rho" or v != defaults[k])
        return f"{type(self).__name__}({hp}, base={type(self.base_optimizer).__name__})"


#: The counters' keys in the saved param groups (see state_dict).
_GROUP_KEYS = {"step_count": "sharpness_step_count", "skipped_steps": "sharpness_skipped_steps"}
#: The checkpoint layout: 2 keeps the options under prefixed group keys (1, before: plain keys,
#: the norm epsilon as ``eps``).
STATE_FORMAT = 2
_LIGHTNING_ROOTS = ("lightning", "pytorch_lightning")


def _refuse_lightning_closure(opt: "SharpnessAwareOptimizer", closure: Any) -> None:
    """Lightning's precision plugin steps optimizers with a ``partial`` of its ``_wrap_closure``,
    which runs the hooks and clipping after every call: our calling it twice would log the
    perturbed loss and run ``on_before_optimizer_step`` twice. Only our callback's driver steps
    correctly there."""
    if not isinstance(closure, functools.partial):
        return
    module = getattr(closure.func, "__module__", None) or ""
    if module.split(".")[0] not in _LIGHTNING_ROOTS:
        return
    name = type(opt).__name__
    raise RuntimeError(
        f"{name} is being stepped by Lightning without zsharp_algos' callback, which runs its two passes: add "
        "zsharp_algos.lightning.SharpnessAwareCallback() to Trainer(callbacks=...), or return "
        f"zsharp_algos.lightning.Lightning{name.removeprefix('Lightning')}(..., model=self) from configure_optimizers "
        "(it adds the callback), or return a plain optimizer and use SAMCallback(...) / ZSharpCallback(...). "
        "In manual optimization, drive first_step() / second_step() on self.optimizers().optimizer"
    )


def _loss_tensor(loss: Any) -> torch.Tensor | None:
    if isinstance(loss, torch.Tensor):
        return loss
    if isinstance(loss, numbers.Real) and not isinstance(loss, bool):
        return torch.tensor(float(loss))  # already on the host: no sync
    return None


def _kind(class_name: str) -> str:
    # ZSharp and a framework's ZSharp subclass (ComposerZSharp) load each other's state
    for kind in ("ZSharp", "FriendlySAM", "GCSAM", "GSAM", "SAM"):
        if class_name.endswith(kind):
            return kind
    return class_name


def _refuse_other_variants_options(given: dict, variant: str | None, owner: str) -> None:
    """A variant's hyper-parameter set (away from its default) without that variant would change
    nothing: refuse it."""
    if variant is None:
        return
    for name, value in given.items():
        takers = [v.name for v in VARIANTS.values() if name in v.options]
        if takers and variant not in takers and value != OPTIONS[name].default:
            raise TypeError(
                f"{owner}: {name} is the option of variant={takers[0]!r}, and this optimizer's variant is {variant!r}; "
                f"pass variant={takers[0]!r} too, or drop {name}"
            )


def _refuse_shared_keywords(ours: dict, params, base_optimizer, base_kwargs: dict, owner: str) -> None:
    """Refuse a keyword that both we and the base optimizer class take (Adadelta's ``rho``):
    which one it was meant for cannot be told, and a radius of 0.9 or a decay of 0.05 would each
    train silently. Also name ``perturb_eps`` when ``eps`` reaches a base that takes none."""
    if not isinstance(base_optimizer, type) or isinstance(params, torch.optim.Optimizer):
        return
    taken = keywords_of(base_optimizer)
    if taken is None:  # the base takes **kwargs: nothing to tell
        return
    base_name = base_optimizer.__name__
    shared = [k for k in ours if k in taken]
    if shared:
        k = shared[0]
        raise TypeError(
            f"{owner}: {base_name} takes {k}= itself, so {k}= here could mean either; build the base optimizer "
            f"yourself and wrap it: {owner}({base_name}(params, {k}=...), {k}=...) (the instance keeps its own "
            f"{k}; the value given to {owner} is the sharpness option)"
        )
    if "eps" in base_kwargs and "eps" not in taken:
        raise TypeError(
            f"{owner}: eps= is passed to the base optimizer, and {base_name} takes none; the epsilon added to "
            "the norm that divides rho is perturb_eps="
        )


def _base_optimizer(params, base_optimizer, base_kwargs: dict, owner: str) -> torch.optim.Optimizer:
    if isinstance(params, SharpnessAwareOptimizer):
        raise TypeError(f"cannot wrap a sharpness-aware optimizer ({type(params).__name__}) in {owner}")
    if isinstance(params, torch.optim.Optimizer):
        if base_optimizer is not None or base_kwargs:
            hint = (
                " (eps= belongs to the optimizer you built; the norm epsilon is perturb_eps=)"
                if "eps" in base_kwargs else ""
            )
            raise TypeError(
                f"{owner}: pass either an optimizer instance, or parameters + base_optimizer class + its kwargs, "
                f"not both (got extra {sorted(base_kwargs) or 'base_optimizer'}){hint}"
            )
        return params
    if not (isinstance(base_optimizer, type) and issubclass(base_optimizer, torch.optim.Optimizer)):
        raise TypeError(
            f"{owner}: base_optimizer must be a torch.optim.Optimizer subclass such as torch.optim.SGD, "
            f"got {base_optimizer!r} (or pass an optimizer instance instead of parameters)"
        )
    return base_optimizer(params, **base_kwargs)


_add_option_attributes(SharpnessAwareOptimizer)


class SAM(SharpnessAwareOptimizer):
    """Sharpness-Aware Minimization (Foret et al., 2021): ``e = rho * g / ||g||``.

    ``adaptive=True`` gives ASAM (Kwon et al., 2021): ``e = rho * |w|^2 g / || |w| g ||``.
    ``variant`` picks a member of the SAM family (:mod:`zsharp_algos.variants`): ``"friendly"``
    (FriendlySAM, with ``sigma`` and ``lmbda``), ``"gsam"`` (GSAM, with ``alpha``),
    ``"gcsam"`` (GCSAM); :class:`FriendlySAM`, :class:`GSAM` and :class:`GCSAM` are the same
    with the variant fixed. See :class:`SharpnessAwareOptimizer` for the other arguments.
    """

    options = SAM_OPTIONS + VARIANT_OPTIONS
    direction_options = ("variant", "sigma", "lmbda")

    def __init__(self, params=None, base_optimizer=None, **kwargs):
        if "direction" in kwargs:
            raise TypeError(
                f"{type(self).__name__}'s direction is set by variant; use SharpnessAwareOptimizer for other directions"
            )
        super().__init__(params, base_optimizer, **kwargs)

    @staticmethod
    def make_direction(variant: str = "none", sigma: float = 1.0, lmbda: float = 0.9) -> Direction:
        return GradientDirection(transform_for(variant, sigma, lmbda))


class ZSharp(SharpnessAwareOptimizer):
    """ZSharp (arXiv 2505.02369): SAM whose ascent direction keeps only the gradient entries with
    significant layer-wise z-scores.

    Args:
        percentile: in (0, 100), default 70: the share (a percent) of entries whose ``|z|`` falls
            below the cut.
        scope: ``"global"`` (default; one threshold over all tensors, then SAM's global-norm
            scaling, as the bangyen/zsharp reproduction) or ``"tensor"`` (the paper's official
            code: a threshold and a normalisation per tensor with ``ndim > 1``). The paper's
            settings are ``ZSharp(params, torch.optim.Adam, rho=0.05, percentile=95,
            scope="tensor", lr=1e-3)``.
        variant: the filter applied to a SAM variant's direction (:mod:`zsharp_algos.variants`):
            ``"friendly"`` (FriendlySAM's ``g - sigma m``, with ``sigma``, ``lmbda``),
            ``"gcsam"`` (the centred gradient), ``"gsam"`` (ZSharp's perturbation, GSAM's step,
            with ``alpha``); ``adaptive=True`` is ASAM's scaling.

    The other arguments are :class:`SharpnessAwareOptimizer`'s.

    Groups sharing ``percentile``, ``scope`` and the variant's direction are filtered together
    (one threshold over all of them in the global scope). ZSharp's thresholds are over tensors
    on one device. See :mod:`zsharp_algos.directions` for the exact definitions.
    """

    options = SAM_OPTIONS + VARIANT_OPTIONS + ZSHARP_OPTIONS
    direction_options = ("percentile", "scope", "variant", "sigma", "lmbda")

    def __init__(self, params=None, base_optimizer=None, **kwargs):
        if "direction" in kwargs:
            raise TypeError("ZSharp's direction is set by percentile, scope and variant")
        super().__init__(params, base_optimizer, **kwargs)

    @staticmethod
    def make_direction(
        percentile: float, scope: str, variant: str = "none", sigma: float = 1.0, lmbda: float = 0.9
    ) -> Direction:
        return ZScoreDirection(percentile, scope, transform_for(variant, sigma, lmbda))


class FriendlySAM(SAM):
    """FriendlySAM (Li et al., CVPR 2024, "Friendly Sharpness-Aware Minimization"): SAM along
    ``g - sigma * m``, ``m`` an exponential moving average of past first-pass gradients
    (:mod:`zsharp_algos.variants`); ``m`` is optimizer state, one parameter-sized buffer.

    Args:
        sigma: the weight of ``m``, default 1.0 (the authors').
        lmbda: the decay of ``m``, default 0.9 (the authors').

    The other arguments are :class:`SharpnessAwareOptimizer`'s.
    """

    options = SAM_OPTIONS + (fixed_variant("friendly"), OPTIONS["sigma"], OPTIONS["lmbda"])


class GSAM(SAM):
    """GSAM (Zhuang et al., ICLR 2022, "Surrogate Gap Guided Sharpness-Aware Minimization"):
    perturb as SAM, step with ``g_s - alpha * g_perp``, the part of the first gradient
    orthogonal to the second taken out (:mod:`zsharp_algos.rules`). Keeps the first pass's
    gradient through the step: one parameter-sized buffer. Its rho schedule tied to the learning
    rate is yours: ``rho`` is a param-group option (``param_groups[i]["sharpness_rho"]``, or
    ``opt.rho = ...``).

    Args:
        alpha: the weight of ``g_perp``, default 0.2 (GSAM's official PyTorch example).

    The other arguments are :class:`SharpnessAwareOptimizer`'s.
    """

    options = SAM_OPTIONS + (fixed_variant("gsam"), OPTIONS["alpha"])
    direction_options = ("variant",)


class GCSAM(SAM):
    """GCSAM (Hassan et al., 2025, "Gradient Centralized Sharpness Aware Minimization"): SAM
    along the gradient centred per output channel (tensors with ``ndim > 1``), scaled to
    ``||e|| = rho``. No state. See :class:`SharpnessAwareOptimizer` for the arguments."""

    options = SAM_OPTIONS + (fixed_variant("gcsam"),)
    direction_options = ("variant",)
