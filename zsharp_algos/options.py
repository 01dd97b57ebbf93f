"""The sharpness-aware hyper-parameters, defined once.

Every entry point reads this table: the core optimizers (defaults, validation, param-group keys),
Composer's algorithms, Hugging Face's ``--rho`` / ``--percentile`` flags, the accelerate script and
``zsharp-compare``. An :class:`Option` knows its name, default, type, range and help text, so a
bad value gets the same message naming the fix wherever it comes in.

The options that live in ``param_groups`` (as ``lr`` does for ``torch.optim``) may differ between
groups: ``rho=0`` leaves a group unperturbed (and out of the norm), the usual recipe for biases and
normalisation layers (see :func:`zsharp_algos.no_perturbation_groups`).
"""
from __future__ import annotations

import inspect
import math
import numbers
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

__all__ = [
    "Option",
    "SAM_OPTIONS",
    "ZSHARP_OPTIONS",
    "OPTIONS",
    "check_option",
    "check_options",
    "fill_group",
    "add_cli_options",
    "cli_values",
    "TakesOptions",
]


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

    def validate(self, value: Any, owner: str) -> Any:
        if not self.check(value):
            raise ValueError(f"{owner}: {self.name} must be {self.expects}, got {value!r}")
        converted = self.convert(value)
        _warn_if_suspicious(self.name, converted, owner)
        return converted


def _warn_if_suspicious(name: str, value: Any, owner: str) -> None:
    if name == "percentile" and value < 1:
        warnings.warn(
            f"{owner}: percentile={value!r} is a percent in (0, 100), not a fraction: it drops only {value}% "
            f"of the entries; for {value * 100:g}% pass percentile={value * 100:g}",
            UserWarning,
            stacklevel=4,
        )


def _scope(value: Any) -> bool:
    return value in ("global", "tensor")


#: Options of every sharpness-aware optimizer (param-group keys).
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
        "eps", 1e-12, _finite_at_least_zero, float, "a finite number >= 0",
        "added to the norm that divides rho",
    ),
)

#: ZSharp's own options (param-group keys), on top of :data:`SAM_OPTIONS`.
ZSHARP_OPTIONS: tuple[Option, ...] = (
    Option(
        "percentile", 70.0, _percentile_range, float, "a number in (0, 100) (a percent, not a fraction)",
        "share (percent) of gradient entries whose |z-score| falls below the cut",
    ),
    Option(
        "scope", "global", _scope, str, "'global' or 'tensor'",
        "'global': one threshold over the model (the bangyen/zsharp reproduction); "
        "'tensor': a threshold and a norm per weight tensor (the paper's official code)",
    ),
)

_ZSHARP_NAMES = {o.name for o in ZSHARP_OPTIONS}

#: Every option by name.
OPTIONS: dict[str, Option] = {o.name: o for o in SAM_OPTIONS + ZSHARP_OPTIONS}


def check_option(name: str, value: Any, owner: str = "sharpness-aware optimizer") -> Any:
    """Validate one option; returns it as a plain Python value."""
    return OPTIONS[name].validate(value, owner)


def check_options(values: Mapping[str, Any], allowed: Iterable[Option], owner: str) -> dict[str, Any]:
    """Validate ``values`` against ``allowed``; an option of another optimizer (``percentile``
    given to SAM) is named as such, so the error does not blame the base optimizer."""
    allowed = {o.name: o for o in allowed}
    foreign = [k for k in values if k not in allowed and k in OPTIONS]
    if foreign:
        raise TypeError(
            f"{owner} does not take {', '.join(map(repr, foreign))} "
            f"({'ZSharp' if all(k in _ZSHARP_NAMES for k in foreign) else 'another optimizer'}'s option); "
            f"its options are {', '.join(allowed)}"
        )
    return {k: allowed[k].validate(v, owner) for k, v in values.items()}


def fill_group(group: dict, defaults: Mapping[str, Any], allowed: Iterable[Option], owner: str) -> None:
    """Give a param group every option: its own values (validated) where it sets them, else
    ``defaults``."""
    allowed = tuple(allowed)
    given = {k: group[k] for k in group if k in OPTIONS}
    group.update({**defaults, **check_options(given, allowed, owner)})


def _cli_type(option: Option) -> Callable[[str], Any]:
    if isinstance(option.default, bool):
        return lambda text: {"true": True, "false": False, "1": True, "0": False}[text.lower()]
    return type(option.default)


def add_cli_options(parser: Any, names: Iterable[str] | None = None, **defaults: Any) -> None:
    """Add ``--rho``, ``--percentile``, ... to an ``argparse`` parser (or group) from the table:
    the same names, types, defaults (``defaults`` overrides some) and help everywhere. Boolean
    options become flags (``--adaptive``)."""
    for name in names if names is not None else OPTIONS:
        option = OPTIONS[name]
        default = defaults.get(name, option.default)
        if isinstance(option.default, bool):
            parser.add_argument(f"--{name}", action="store_true", default=default, help=option.help)
        elif name == "scope":
            parser.add_argument(f"--{name}", choices=("global", "tensor"), default=default, help=option.help)
        else:
            parser.add_argument(f"--{name}", type=_cli_type(option), default=default, help=option.help)


def cli_values(args: Any, allowed: Iterable[Option]) -> dict[str, Any]:
    """The values of ``allowed`` options on a parsed ``argparse`` namespace (checked)."""
    allowed = tuple(allowed)
    return check_options({o.name: getattr(args, o.name) for o in allowed if hasattr(args, o.name)}, allowed, "flags")


class TakesOptions:
    """Mixin for framework objects configured with an optimizer's options (Composer algorithms,
    Lightning callbacks): :meth:`_take_options` checks them against ``optimizer_cls.options``
    and fills the defaults, ``obj.rho`` reads them, and the class signature (``help()``, IDEs)
    lists them, followed by the class's own ``extra_parameters``."""

    optimizer_cls: Any = None
    extra_parameters: dict[str, Any] = {}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.optimizer_cls is not None:
            keyword = inspect.Parameter.KEYWORD_ONLY
            params = [inspect.Parameter(o.name, keyword, default=o.default) for o in cls.optimizer_cls.options]
            params += [inspect.Parameter(k, keyword, default=v) for k, v in cls.extra_parameters.items()]
            cls.__signature__ = inspect.Signature(params)

    def _take_options(self, options: Mapping[str, Any]) -> None:
        allowed = self.optimizer_cls.options
        given = check_options(options, allowed, type(self).__name__)
        self.options = {**{o.name: o.default for o in allowed}, **given}

    def __getattr__(self, name: str) -> Any:
        options = self.__dict__.get("options", {})
        if name in options:
            return options[name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
