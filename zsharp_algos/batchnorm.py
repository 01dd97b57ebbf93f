"""Keep normalisation layers' running statistics out of the second (perturbed) pass.

SAM's second forward pass runs at ``w + e``; letting it update BatchNorm's running mean and
variance would count every batch twice, once with statistics of weights that are never kept.
:meth:`~zsharp_algos.SharpnessAwareOptimizer.step` freezes them by default: the layers that
updated their statistics in the first pass (:func:`norm_layers_seen`) are frozen in the second.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, Iterator

from torch import nn
from torch.nn.modules.batchnorm import _NormBase
from torch.nn.modules.module import register_module_forward_pre_hook

__all__ = ["frozen_norm_stats", "norm_layers_seen", "norm_layers"]


def norm_layers(model: nn.Module) -> list[nn.Module]:
    """BatchNorm / InstanceNorm layers (torch's, timm's, SyncBatchNorm) of ``model`` that track
    running statistics."""
    return [m for m in model.modules() if isinstance(m, _NormBase) and m.track_running_stats]


@contextmanager
def norm_layers_seen() -> Iterator[list[nn.Module]]:
    """Collects the normalisation layers that run in training mode with running statistics
    inside the block (any model: a process-wide forward pre-hook, removed on exit)."""
    seen: dict[int, nn.Module] = {}

    def hook(module: nn.Module, args) -> None:
        if isinstance(module, _NormBase) and module.training and module.track_running_stats:
            seen[id(module)] = module

    handle = register_module_forward_pre_hook(hook)
    layers: list[nn.Module] = []
    try:
        yield layers
    finally:
        handle.remove()
        layers.extend(seen.values())


@contextmanager
def frozen_norm_stats(model_or_layers: nn.Module | Iterable[nn.Module]) -> Iterator[None]:
    """Within the block, the normalisation layers of a model (or the given layers) normalise
    with the batch statistics as usual in training mode but leave ``running_mean``,
    ``running_var`` and ``num_batches_tracked`` exactly as they were.

    Works by switching ``track_running_stats`` off for the duration, which is what the layers'
    own ``forward`` consults; restored on exit, also on error.
    """
    if isinstance(model_or_layers, nn.Module):
        layers = norm_layers(model_or_layers)
    else:
        layers = [m for m in model_or_layers if m.track_running_stats]
    for m in layers:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in layers:
            m.track_running_stats = True
