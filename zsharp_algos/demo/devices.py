"""Device and precision choices for command-line tools: ``--device`` and ``--precision``."""
from __future__ import annotations

import torch

__all__ = ["DEVICES", "PRECISIONS", "resolve_device", "autocast_dtype"]

DEVICES = ("auto", "cpu", "cuda", "mps")
PRECISIONS = ("fp32", "bf16", "fp16")


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return mps is not None and mps.is_available()


def resolve_device(name: str = "auto") -> torch.device:
    """The :class:`torch.device` for ``name``: ``"auto"`` (CUDA, else MPS, else CPU), ``"cpu"``,
    ``"cuda"``, ``"cuda:N"`` or ``"mps"``. Raises :class:`ValueError` for an unknown name or a
    device this machine (or this torch build) does not have."""
    name = name.strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps") if _mps_available() else torch.device("cpu")
    kind, _, index = name.partition(":")
    if kind not in DEVICES or (index and (kind != "cuda" or not index.isdigit())):
        raise ValueError(f"unknown device {name!r}; choose one of {', '.join(DEVICES)} (or cuda:N)")
    if kind == "cuda":
        if not torch.cuda.is_available():
            build = f"built with CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
            raise ValueError(
                f"device {name!r} requested but CUDA is not available (torch {torch.__version__}, {build})"
            )
        if index and int(index) >= torch.cuda.device_count():
            raise ValueError(f"device {name!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist")
    if kind == "mps" and not _mps_available():
        raise ValueError("device 'mps' requested but MPS (Apple GPU) is not available on this machine")
    return torch.device(name)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The ``torch.autocast`` dtype for ``precision`` on ``device``: ``None`` for ``"fp32"``
    (no autocast), ``torch.bfloat16`` for ``"bf16"`` (CPU, MPS, and CUDA GPUs that support it;
    no loss scaling needed), ``torch.float16`` for ``"fp16"`` (CUDA only; pair it with a
    :class:`~zsharp_algos.ClosureGradScaler`). Raises :class:`ValueError` otherwise."""
    precision = precision.strip().lower()
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if precision == "fp32":
        return None
    if precision == "fp16":
        if device.type != "cuda":
            raise ValueError(f"--precision fp16 needs a CUDA device (got {device.type}); use bf16 or fp32 there")
        return torch.float16
    if device.type not in ("cpu", "cuda", "mps") or (device.type == "cuda" and not torch.cuda.is_bf16_supported()):
        raise ValueError(f"--precision bf16 is not supported on device {str(device)!r}; use fp32")
    return torch.bfloat16
