"""Param groups that leave biases and normalisation layers unperturbed.

A common SAM recipe perturbs only the weight matrices and kernels: biases and the affine
parameters of normalisation layers are cheap to get wrong and add little to the sharpness
estimate. With the options in ``param_groups`` that is one group with ``rho`` 0 (under its key,
``sharpness_rho``, so that it never meets a base optimizer's own ``rho``)::

    opt = SAM(no_perturbation_groups(model), torch.optim.SGD, lr=0.1, rho=0.05)

The ``rho=0`` group is stepped by the base optimizer as usual; it is neither perturbed nor
counted in the perturbation's norm.
"""
from __future__ import annotations

from typing import Any

from torch import nn
from torch.nn.modules.batchnorm import _NormBase

from .options import OPTIONS

__all__ = ["no_perturbation_groups"]

NORM_LAYERS = (_NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm)


def no_perturbation_groups(model: nn.Module, **unperturbed: Any) -> list[dict[str, Any]]:
    """Two param groups over ``model``'s trainable parameters: the weights with ``ndim > 1``
    outside normalisation layers (perturbed with the optimizer's options), and the rest, biases
    and normalisation parameters, with ``rho`` 0 (key ``sharpness_rho``; plus any keys in
    ``unperturbed``, e.g. ``weight_decay=0.0``). Empty groups are left out."""
    in_norm = {id(p) for m in model.modules() if isinstance(m, NORM_LAYERS) for p in m.parameters(recurse=False)}
    perturbed, other = [], []
    for p in model.parameters():
        if p.requires_grad:
            (perturbed if p.dim() > 1 and id(p) not in in_norm else other).append(p)
    groups = []
    if perturbed:
        groups.append({"params": perturbed})
    if other:
        groups.append({"params": other, **unperturbed, OPTIONS["rho"].key: 0.0})
    return groups
