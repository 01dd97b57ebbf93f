"""The sharpness-aware hyper-parameters, defined once.

Every entry point reads this table: the core optimizers (defaults, validation, param-group keys),
Composer's algorithms, Hugging Face's ``--rho`` / ``--percentile`` flags, the accelerate script and
``zsharp-compare``. An :class:`Option` knows its name, default, type, range and help text, so a
bad value gets the same message naming the fix wherever it comes in.

Options are keyword arguments under their own names (``rho=0.05``) and live in each param group
under a prefixed key (``group["sharpness_rho"]``), as timm's ``Lookahead`` keeps ``lookahead_*``:
a base optimizer's own keys (Adam's ``eps``, Adadelta's ``rho``, RMSprop's ``alpha``) are never
read or written as ours. They may differ between groups: ``rho=0`` leaves a group unperturbed (and
out of the norm), the usual recipe for biases and normalisation layers (see
:func:`zsharp_algos.no_perturbation_groups`). A group dict may spell an option plainly
(``{"params": ..., "rho": 0.0}``): the plain key is moved to the prefixed one, unless the base
optimizer uses that name itself. :class:`GroupOptions` does this, and checks every value each time
the optimizer reads them, so a bad value set mid-run fails before any weight changes.
"""
from __future__ import annotations

import argparse
import inspect
import math
import numbers
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

__all__ = [
    "KEY_PREFIX",
    "Option",
    "SAM_OPTIONS",
    "VARIANT_OPTIONS",
    "ZSHARP_OPTIONS",
    "fixed_variant",
    "OPTIONS",
    "check_option",
    "check_options",
    "GroupOptions",
    "keywords_of",
    "add_cli_options",
    "cli_values",
    "DefaultsHelpFormatter",
    "TakesOptions",
]

#: Prefix of the options' param-group keys (``sharpness_rho``); no optimizer uses such names.
KEY_PREFIX = "sharpness_"


def _number(value: Any) -> bool:
    # numbers.Real covers int, float and numpy scalars (np.float32(0.1)); bool is excluded on purpose
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _integer(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _finite_at_least_zero(value: Any) -> bool:
    return _number(value) and math.isfinite(value) and value >= 0


def _percentile_range(value: Any) -> bool:
    return _number(value) and 0 < value < 100


@dataclass(frozen=True)
class Option:
    """One hyper-parameter: ``check(value)`` is True for valid values; ``convert`` turns a valid
    value into the plain Python type stored in ``param_groups`` and checkpoints."""

    name: str
    default: Any
    check: Callable[[Any], bool]
    convert: Callable[[Any], Any]
    expects: str  # completes "rho must be ..."
    help: str
    choices: tuple[str, ...] | None = None  # the values of an option that names one of a few
    keyword: bool = True  # False: fixed by the optimizer class (FriendlySAM's variant), not a keyword

    @property
    def key(self) -> str:
        """The param-group key holding this option (``sharpness_<name>``)."""
        return KEY_PREFIX + self.name

    def validate(self, value: Any, owner: str, where: str | None = None) -> Any:
        """``value`` as a plain Python value, or ``ValueError`` naming ``where`` it was found
        (default: the option's keyword) and what is expected."""
        if not self.check(value):
            raise ValueError(f"{owner}: {where or self.name} must be {self.expects}, got {value!r}")
        converted = self.convert(value)
        _warn_if_suspicious(self.name, converted, owner)
        return converted


def _warn_if_suspicious(name: str, value: Any, owner: str) -> None:
    if name == "percentile" and value < 1:
        warnings.warn(
            f"{owner}: percentile={value!r} is a percent in (0, 100), not a fraction: it drops only {value}% "
            f"of the entries; for {value * 100:g}% pass percentile={value * 100:g}",
            UserWarning,
            stacklevel=5,
        )


def _one_of(*choices: str) -> Callable[[Any], bool]:
    return lambda value: isinstance(value, str) and value in choices


def _choice(name: str, default: str, choices: tuple[str, ...], help: str) -> Option:
    return Option(name, default, _one_of(*choices), str, " or ".join(map(repr, choices)), help, choices)


#: Options of every sharpness-aware optimizer.
SAM_OPTIONS: tuple[Option, ...] = (
    Option(
        "rho", 0.05, _finite_at_least_zero, float, "a finite number >= 0 (0: the group is not perturbed)",
        "perturbation radius; 0 leaves a param group unperturbed and out of the norm",
    ),
    Option(
        "interval", 1, lambda v: _integer(v) and v >= 1, int,
        "an integer >= 1 (a sharpness step every interval-th step)",
        "a sharpness step every interval-th optimizer step, plain base steps in between",
    ),
    Option(
        "adaptive", False, lambda v: isinstance(v, bool), bool, "True or False",
        "ASAM: scale the perturbation elementwise by |w| (use rho 0.5 to 2)",
    ),
    Option(
        "perturb_eps", 1e-12, _finite_at_least_zero, float, "a finite number >= 0",
        "added to the norm that divides rho (eps= is the base optimizer's)",
    ),
    _choice(
        "interval_mode", "fixed", ("fixed", "random"),
        "'fixed': every interval-th step is a sharpness step; 'random': each step is one with "
        "probability 1/interval, drawn from interval_seed and the step index (RST)",
    ),
    Option(
        "interval_seed", 0, lambda v: _integer(v) and 0 <= v < 2**63, int, "an integer in [0, 2^63)",
        "interval_mode='random': the seed of the draws (the same seed and step: the same decision)",
    ),
    _choice(
        "reuse", "none", ("none", "looksam"),
        "'looksam': steps between sharpness steps add reuse_alpha * ||g|| / ||g_v|| * g_v, the part "
        "of the last sharpness gradient orthogonal to g (LookSAM); 'none': plain base steps",
    ),
    Option(
        "reuse_alpha", 0.7, _finite_at_least_zero, float, "a finite number >= 0",
        "reuse='looksam': the weight of the reused component",
    ),
)

#: ZSharp's own options, on top of :data:`SAM_OPTIONS`.
ZSHARP_OPTIONS: tuple[Option, ...] = (
    Option(
        "percentile", 70.0, _percentile_range, float, "a number in (0, 100) (a percent, not a fraction)",
        "share (percent) of gradient entries whose |z-score| falls below the cut",
    ),
    _choice(
        "scope", "global", ("global", "tensor"),
        "'global': one threshold over the model (the bangyen/zsharp reproduction); "
        "'tensor': a threshold and a norm per weight tensor (the paper's official code)",
    ),
)

#: The variants of :mod:`zsharp_algos.variants` and their hyper-parameters, for SAM and ZSharp
#: (FriendlySAM, GSAM and GCSAM fix ``variant`` and take only their own).
VARIANT_OPTIONS: tuple[Option, ...] = (
    _choice(
        "variant", "none", ("none", "friendly", "gsam", "gcsam"),
        "the SAM variant: 'friendly' (FriendlySAM), 'gsam' (GSAM), 'gcsam' (GCSAM); with ZSharp, "
        "its filter applies to the variant's direction",
    ),
    Option("sigma", 1.0, _finite_at_least_zero, float, "a finite number >= 0",
           "variant='friendly': the weight of the gradient EMA subtracted from g"),
    Option("lmbda", 0.9, lambda v: _number(v) and 0 <= v <= 1, float, "a number in [0, 1]",
           "variant='friendly': the decay of the EMA of past first-pass gradients"),
    Option("alpha", 0.2, _finite_at_least_zero, float, "a finite number >= 0",
           "variant='gsam': the weight of the first gradient's part orthogonal to the second, subtracted"),
)


def fixed_variant(name: str) -> Option:
    """The ``variant`` option of a class that is that variant (not a keyword: always ``name``)."""
    general = VARIANT_OPTIONS[0]
    return Option(
        "variant", name, lambda v: v == name, str, f"{name!r} (this optimizer's own)", general.help,
        general.choices, keyword=False,
    )


_ZSHARP_NAMES = {o.name for o in ZSHARP_OPTIONS}

#: Every option by name.
OPTIONS: dict[str, Option] = {o.name: o for o in SAM_OPTIONS + VARIANT_OPTIONS + ZSHARP_OPTIONS}
#: Every option by param-group key.
_BY_KEY: dict[str, Option] = {o.key: o for o in OPTIONS.values()}


def check_option(name: str, value: Any, owner: str = "sharpness-aware optimizer") -> Any:
    """Validate one option; returns it as a plain Python value."""
    return OPTIONS[name].validate(value, owner)


def _foreign_error(owner: str, foreign: Sequence[str], allowed: Mapping[str, Option]) -> TypeError:
    kind = "ZSharp" if all(k in _ZSHARP_NAMES for k in foreign) else "another optimizer"
    return TypeError(
        f"{owner} does not take {', '.join(map(repr, foreign))} ({kind}'s option); "
        f"its options are {', '.join(allowed)}"
    )


def check_options(values: Mapping[str, Any], allowed: Iterable[Option], owner: str) -> dict[str, Any]:
    """Validate ``values`` (keywords) against ``allowed``; an option of another optimizer
    (``percentile`` given to SAM) is named as such, so the error does not blame the base
    optimizer."""
    allowed = tuple(allowed)
    fixed = {o.name: o for o in allowed if not o.keyword}
    for name in values:
        if name in fixed:
            raise TypeError(
                f"{owner}'s {name} is {fixed[name].default!r}, always; for another, use SAM(..., {name}=...) or "
                f"ZSharp(..., {name}=...)"
            )
    allowed = {o.name: o for o in allowed if o.keyword}
    foreign = [k for k in values if k not in allowed and k in OPTIONS]
    if foreign:
        raise _foreign_error(owner, foreign, allowed)
    unknown = [k for k in values if k not in allowed]
    if unknown:
        hint = " (eps is the base optimizer's; the norm epsilon is perturb_eps)" if "eps" in unknown else ""
        raise TypeError(
            f"{owner} got unexpected option {', '.join(map(repr, unknown))}{hint}; its options are {', '.join(allowed)}"
        )
    return {k: allowed[k].validate(v, owner) for k, v in values.items()}


def keywords_of(cls: type) -> frozenset[str] | None:
    """The keyword arguments ``cls(...)`` takes (None when it takes ``**kwargs``: any)."""
    try:
        params = inspect.signature(cls).parameters.values()
    except (TypeError, ValueError):  # a builtin without a signature
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return frozenset(p.name for p in params)


class GroupOptions:
    """An optimizer's options in ``param_groups``: filled in, checked and read under their keys.

    Args:
        options: the options the optimizer takes.
        owner: the optimizer's name, for messages.
        base_names: the group keys the base optimizer uses itself (its ``defaults``): a plain
            spelling among them (Adadelta's ``rho``) is the base's, never taken as ours.
        combination: ``combination(group, where)`` raises ``ValueError`` for values that are
            each valid but do not go together (checked with the values).
    """

    def __init__(
        self,
        options: Iterable[Option],
        owner: str,
        base_names: Iterable[str] = (),
        combination: Callable[[Mapping, str], None] | None = None,
    ):
        self.options = tuple(options)
        self.owner = owner
        self.base_names = frozenset(base_names)
        self.combination = combination
        self._allowed = {o.name: o for o in self.options}

    def fill(self, group: dict, defaults: Mapping[str, Any]) -> None:
        """Give ``group`` every option under its key: its own value (prefixed or plain, checked)
        where it sets one, else ``defaults[name]``."""
        foreign = [
            k.removeprefix(KEY_PREFIX) for k in group
            if (k in _BY_KEY and _BY_KEY[k].name not in self._allowed)
            or (k in OPTIONS and k not in self._allowed and k not in self.base_names)
        ]
        if foreign:
            raise _foreign_error(self.owner, foreign, self._allowed)
        for o in self.options:
            self._adopt_plain(group, o)
            value = group.get(o.key, defaults[o.name])
            group[o.key] = o.validate(value, self.owner, f"param group option {o.key!r}")
        if self.combination is not None:
            self.combination(group, f"{self.owner}: a param group")

    def _adopt_plain(self, group: dict, o: Option) -> None:
        if o.name in group and o.name not in self.base_names:
            if o.key in group:
                raise ValueError(
                    f"{self.owner}: a param group sets both {o.name!r} and {o.key!r}; keep one ({o.key!r})"
                )
            group[o.key] = group.pop(o.name)

    def check(self, groups: Sequence[dict]) -> None:
        """Check every option of every group as it is now (a value set in ``param_groups``
        mid-run, plainly or under its key), raising ``ValueError`` before anything uses it. Runs
        on every step: Python scalars only, no tensors."""
        for i, group in enumerate(groups):
            for o in self.options:
                if o.name in group and o.name not in self.base_names:  # set plainly since: it wins
                    if not o.check(group[o.name]):
                        raise ValueError(
                            f"{self.owner}: param_groups[{i}][{o.name!r}] must be {o.expects}, got {group[o.name]!r}"
                        )
                    group[o.key] = o.convert(group.pop(o.name))
                value = group.get(o.key, _MISSING)
                if value is _MISSING:
                    raise KeyError(
                        f"{self.owner}: param_groups[{i}] has no {o.key!r} (removed?); set it again, e.g. "
                        f"param_groups[{i}][{o.key!r}] = {o.default!r}"
                    )
                if not o.check(value):
                    raise ValueError(
                        f"{self.owner}: param_groups[{i}][{o.key!r}] must be {o.expects}, got {value!r}"
                    )
            if self.combination is not None:
                self.combination(group, f"{self.owner}: param_groups[{i}]")

    def value(self, groups: Sequence[dict], name: str) -> Any:
        """The value of option ``name`` that every group shares (``ValueError`` if they differ)."""
        o = self._allowed[name]
        self.check(groups)
        values = {repr(g[o.key]): g[o.key] for g in groups}
        if len(values) > 1:
            raise ValueError(
                f"{self.owner}: the param groups set different {name} ({', '.join(values)}): read "
                f"param_groups[i][{o.key!r}] for the group you mean"
            )
        return next(iter(values.values())) if values else None

    def set_all(self, groups: Sequence[dict], name: str, value: Any) -> Any:
        """Set option ``name`` in every group, if they all share one value now (``ValueError``
        naming ``param_groups`` otherwise); returns the checked value."""
        o = self._allowed[name]
        value = o.validate(value, self.owner)
        self.value(groups, name)  # raises if the groups differ
        for g in groups:
            g[o.key] = value
        return value


_MISSING = object()


def _cli_type(option: Option) -> Callable[[str], Any]:
    if isinstance(option.default, bool):
        return lambda text: {"true": True, "false": False, "1": True, "0": False}[text.lower()]
    return type(option.default)


def add_cli_options(parser: Any, names: Iterable[str] | None = None, **defaults: Any) -> None:
    """Add ``--rho``, ``--percentile``, ... to an ``argparse`` parser (or group) from the table:
    the same names, types, defaults (``defaults`` overrides some) and help everywhere. Boolean
    options become flags (``--adaptive``); a two-word name takes both spellings
    (``--perturb-eps`` and ``--perturb_eps``)."""
    for name in names if names is not None else OPTIONS:
        option = OPTIONS[name]
        flags = [f"--{name.replace('_', '-')}", f"--{name}"] if "_" in name else [f"--{name}"]
        common = dict(dest=name, default=defaults.get(name, option.default), help=option.help)
        if isinstance(option.default, bool):
            parser.add_argument(*flags, action="store_true", **common)
        elif option.choices:
            parser.add_argument(*flags, choices=option.choices, **common)
        else:
            parser.add_argument(*flags, type=_cli_type(option), **common)


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` shows every option's default, also for options without help text (the stock
    formatter prints nothing for those)."""

    def _format_action(self, action):
        if action.help is None and action.option_strings and action.default not in (None, argparse.SUPPRESS):
            action.help = "default: %(default)s"
        return super()._format_action(action)

    def _get_help_string(self, action):
        # "(default: None)" says nothing the help text does not
        return action.help if action.default is None else super()._get_help_string(action)


def cli_values(args: Any, allowed: Iterable[Option]) -> dict[str, Any]:
    """The values of ``allowed`` options on a parsed ``argparse`` namespace (checked; an option
    the optimizer fixes, FriendlySAM's ``variant``, is not taken from the flags)."""
    allowed = tuple(allowed)
    values = {o.name: getattr(args, o.name) for o in allowed if o.keyword and hasattr(args, o.name)}
    return check_options(values, allowed, "flags")


class TakesOptions:
    """Mixin for framework objects configured with an optimizer's options (Composer algorithms,
    Lightning callbacks): ``_take_options`` checks them against ``optimizer_cls.options``
    and fills the defaults, ``obj.rho`` reads them, and the class signature (``help()``, IDEs)
    lists them, followed by the class's own ``extra_parameters``."""

    optimizer_cls: Any = None
    extra_parameters: dict[str, Any] = {}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.optimizer_cls is not None:
            keyword = inspect.Parameter.KEYWORD_ONLY
            params = [
                inspect.Parameter(o.name, keyword, default=o.default) for o in cls.optimizer_cls.options if o.keyword
            ]
            params += [inspect.Parameter(k, keyword, default=v) for k, v in cls.extra_parameters.items()]
            cls.__signature__ = inspect.Signature(params)

    def _take_options(self, options: Mapping[str, Any]) -> None:
        allowed = self.optimizer_cls.options
        given = check_options(options, allowed, type(self).__name__)
        self.options = {**{o.name: o.default for o in allowed if o.keyword}, **given}

    def __getattr__(self, name: str) -> Any:
        options = self.__dict__.get("options", {})
        if name in options:
            return options[name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        if name in self.__dict__.get("options", {}):
            # a silent instance attribute would change nothing: the optimizer holds the options
            raise AttributeError(
                f"{type(self).__name__}'s {name} is fixed when it is built: pass {name}= to "
                f"{type(self).__name__}(...), or during training set it on the optimizer "
                f"(optimizer.{name} = ..., or its param_groups' {OPTIONS[name].key!r})"
            )
        super().__setattr__(name, value)
