"""Keep normalisation layers' running statistics out of the second (perturbed) pass.

SAM's second forward pass runs at ``w + e``; letting it update BatchNorm's running mean and
variance would count every batch twice, once with statistics of weights that are never kept.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from torch import nn
from torch.nn.modules.batchnorm import _NormBase

__all__ = ["frozen_norm_stats"]


@contextmanager
def frozen_norm_stats(model: nn.Module) -> Iterator[None]:
    """Within the block, BatchNorm / InstanceNorm layers (torch's, timm's, SyncBatchNorm) that
    track running statistics normalise with the batch statistics as usual in training mode but
    leave ``running_mean``, ``running_var`` and ``num_batches_tracked`` exactly as they were.

    Works by switching ``track_running_stats`` off for the duration, which is what the layers'
    own ``forward`` consults; restored on exit, also on error.
    """
    layers = [m for m in model.modules() if isinstance(m, _NormBase) and m.track_running_stats]
    for m in layers:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in layers:
            m.track_running_stats = True
