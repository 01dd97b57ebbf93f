"""Deprecated name of :mod:`zsharp_algos.accelerate_loop` (a module named like the package it
integrates invites import mix-ups); kept so existing imports keep working."""
from __future__ import annotations

import warnings

from .accelerate_loop import *  # noqa: F401,F403
from .accelerate_loop import __all__  # noqa: F401

warnings.warn(
    "zsharp_algos.accelerate is now zsharp_algos.accelerate_loop; import TwoPassBackward from there",
    DeprecationWarning,
    stacklevel=2,
)
