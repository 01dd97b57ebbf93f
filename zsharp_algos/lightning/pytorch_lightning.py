"""The Lightning callbacks for the ``pytorch_lightning`` package (``import pytorch_lightning as pl``).

Same behaviour and arguments as :mod:`zsharp_algos.lightning.callback`, on
``pytorch_lightning.Callback`` (a ``pytorch_lightning.Trainer`` accepts only its own package's
callbacks). :class:`~zsharp_algos.lightning.LightningSAM` / ``LightningZSharp`` serve both
packages as they are.
"""
from __future__ import annotations

from .._optional import require
from . import callback as _lightning_callbacks
from ._hooks import FriendlySAMHooks, GCSAMHooks, GSAMHooks, SAMHooks, SharpnessAwareHooks, ZSharpHooks

Callback = require("pytorch_lightning", "lightning", "zsharp_algos.lightning.pytorch_lightning").Callback

__all__ = [
    "SharpnessAwareCallback", "SAMCallback", "ZSharpCallback", "FriendlySAMCallback", "GSAMCallback", "GCSAMCallback",
]


class SharpnessAwareCallback(SharpnessAwareHooks, Callback):
    __doc__ = _lightning_callbacks.SharpnessAwareCallback.__doc__


class SAMCallback(SAMHooks, SharpnessAwareCallback):
    __doc__ = _lightning_callbacks.SAMCallback.__doc__


class ZSharpCallback(ZSharpHooks, SharpnessAwareCallback):
    __doc__ = _lightning_callbacks.ZSharpCallback.__doc__


class FriendlySAMCallback(FriendlySAMHooks, SharpnessAwareCallback):
    __doc__ = _lightning_callbacks.FriendlySAMCallback.__doc__


class GSAMCallback(GSAMHooks, SharpnessAwareCallback):
    __doc__ = _lightning_callbacks.GSAMCallback.__doc__


class GCSAMCallback(GCSAMHooks, SharpnessAwareCallback):
    __doc__ = _lightning_callbacks.GCSAMCallback.__doc__
