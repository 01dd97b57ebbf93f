"""Untrained timm models for the demo and the example scripts (``pip install 'zsharp-algos[vision]'``)."""
from __future__ import annotations

from torch import nn

from .._optional import require
from .data import IMAGE_SIZE

__all__ = ["build_model"]


def timm_for(model_name: str):
    """The timm module, after checking that it knows ``model_name``."""
    timm = require("timm", "vision", "--model (timm models)")
    if not timm.is_model(model_name):
        raise ValueError(f"unknown timm model {model_name!r} (see timm.list_models())")
    return timm


def build_model(name: str, num_classes: int, image_size: int = IMAGE_SIZE, **kwargs) -> nn.Module:
    """An untrained ``timm`` model. Models that take ``img_size`` (ViTs, Swin...) are built for
    ``image_size`` inputs; others (CNNs) adapt to any size by themselves."""
    timm = timm_for(name)
    kwargs = dict(pretrained=False, num_classes=num_classes, **kwargs)
    try:
        return timm.create_model(name, **{"img_size": image_size, **kwargs})
    except TypeError as err:
        if "img_size" not in str(err):
            raise
    return timm.create_model(name, **kwargs)
