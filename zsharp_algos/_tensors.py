"""Small tensor helpers shared by the perturbation math: flat views, chunking, grouping."""
from __future__ import annotations

from collections import defaultdict
from typing import Iterator, Sequence

import torch
from torch import Tensor


def flat_view(t: Tensor) -> Tensor:
    """A 1-D view of a dense tensor in memory order (works for channels_last and other
    permuted layouts, where ``view(-1)`` would fail). Elementwise math on it is elementwise
    math on ``t``; order-free statistics (mean, std, quantiles) are unchanged."""
    if t.is_contiguous():
        return t.view(-1)
    order = sorted(range(t.dim()), key=lambda d: (t.stride(d), t.size(d)), reverse=True)
    permuted = t.permute(order)
    if not permuted.is_contiguous():
        raise ValueError(
            f"tensor of shape {tuple(t.shape)} and strides {t.stride()} is not dense; "
            "make the parameter contiguous before using a sharpness-aware optimizer"
        )
    return permuted.view(-1)


def chunk_ranges(n: int, chunk: int) -> Iterator[tuple[int, int]]:
    """``(start, length)`` pairs covering ``range(n)`` in steps of ``chunk``."""
    for start in range(0, n, chunk):
        yield start, min(chunk, n - start)


def group_by_device_dtype(*lists: Sequence[Tensor]) -> list[tuple[list[int], tuple[list[Tensor], ...]]]:
    """Split parallel tensor lists into groups sharing the first list's device and dtype, so
    every ``torch._foreach_*`` call gets a homogeneous list (its fast multi-tensor path)."""
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = defaultdict(list)
    for i, t in enumerate(lists[0]):
        groups[(t.device, t.dtype)].append(i)
    return [(idx, tuple([lst[i] for i in idx] for lst in lists)) for idx in groups.values()]


def total_norm(norms: Sequence[Tensor], dtype: torch.dtype = torch.float32) -> Tensor:
    """L2 norm of a list of 0-dim norms (possibly on several devices), on the first's device, in
    ``dtype``."""
    device = norms[0].device
    return torch.linalg.vector_norm(torch.stack([n.to(device, dtype) for n in norms]))
