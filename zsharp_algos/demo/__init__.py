"""``zsharp-compare``, the demo: SGD vs SAM vs ZSharp on embedded data, with a report and a plot.

Not part of the core (``import zsharp_algos`` never imports it); needs the ``demo`` and ``vision``
extras (scikit-learn, matplotlib, numpy, tqdm, timm). The example scripts under
``integrations/`` share its model builder and data loaders.
"""
from __future__ import annotations

from .data import load_data
from .models import build_model

__all__ = ["build_model", "load_data"]
