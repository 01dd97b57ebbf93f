"""PyTorch Lightning integration: SAM and ZSharp in a LightningModule with automatic optimization.

Two ways in, both for ``lightning.pytorch`` (the same classes for ``pytorch_lightning`` are in
:mod:`zsharp_algos.lightning.pytorch_lightning`):

* a callback, the module unchanged: ``Trainer(callbacks=[ZSharpCallback(rho=0.05)])`` turns the
  optimizer ``configure_optimizers`` returns into the base of a ZSharp (or SAM) optimizer;
* an optimizer returned from ``configure_optimizers``:
  ``LightningZSharp(self.parameters(), torch.optim.SGD, model=self, lr=0.1, rho=0.05)``.

Either way Lightning's closure runs twice on sharpness steps with the second pass kept out of the
logs and metrics, BatchNorm statistics frozen in it, gradient accumulation, clipping, LR
schedulers, ``32-true`` / ``bf16-mixed`` / ``16-mixed`` and DDP handled
(:mod:`zsharp_algos.lightning.driver`). Needs ``lightning``
(``pip install 'zsharp-algos[lightning]'``); ``import zsharp_algos`` alone never imports it.
"""
from __future__ import annotations

from .._optional import require

require("lightning", "lightning", "zsharp_algos.lightning")

from .callback import (  # noqa: E402
    FriendlySAMCallback,
    GCSAMCallback,
    GSAMCallback,
    SAMCallback,
    SharpnessAwareCallback,
    ZSharpCallback,
)
from .driver import SharpnessAwareDriver, check_supported  # noqa: E402
from .optimizer import LightningSAM, LightningZSharp  # noqa: E402

#: The callback for each name of zsharp_algos.registry (what a script's --optim picks).
CALLBACKS = {
    "sam": SAMCallback, "zsharp": ZSharpCallback, "friendlysam": FriendlySAMCallback, "gsam": GSAMCallback,
    "gcsam": GCSAMCallback,
}
from .scaler import LightningClosureScaler  # noqa: E402

__all__ = [
    "SAMCallback",
    "ZSharpCallback",
    "FriendlySAMCallback",
    "GSAMCallback",
    "GCSAMCallback",
    "SharpnessAwareCallback",
    "LightningSAM",
    "LightningZSharp",
    "LightningClosureScaler",
    "SharpnessAwareDriver",
    "check_supported",
    "CALLBACKS",
]
