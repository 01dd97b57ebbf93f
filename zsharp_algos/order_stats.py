"""Exact order statistics of |z|-scores over many tensors, without a size cap or a host sync.

ZSharp needs the q-th percentile of |z| over a whole model (86M entries for ViT-B/16) or over
each tensor. ``torch.quantile`` refuses more than 2^24 elements and ``torch.sort`` /
``torch.kthvalue`` copy the input plus int64 indices (3x its bytes). Instead we run an MSD
radix select on the IEEE-754 bit pattern: for non-negative float32 values the int32 view is
ordered like the values, so the k-th smallest value is found digit by digit with histograms
(11 + 10 + 10 bits over the 31 non-sign bits). Every step is a fixed-shape tensor op:

* no ``.item()`` or data-dependent shapes, so nothing waits for the device;
* the values are streamed in chunks through a small scratch space and never materialised
  as one model-sized tensor, so transient memory is O(chunk + queries x 2048).

The values themselves are produced by a callback (``fill_abs_z``) so that callers can recompute
them on the fly from gradients instead of storing them.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Callable, Sequence

import torch
from torch import Tensor

__all__ = ["GLOBAL", "chunk_size_for", "select"]

#: Query row meaning "all segments together" rather than one segment.
GLOBAL = -1

# (shift, bits) of each radix round over the 31 value bits of a non-negative float32.
_ROUNDS = ((20, 11), (10, 10), (0, 10))


def chunk_size_for(device: torch.device, total: int) -> int:
    """Elements streamed per kernel call when scanning ``total`` values.

    Large chunks amortise per-call overhead; each chunk element costs about 20 bytes of
    temporaries (float32 values, int32 keys/digits, masks), which we keep under ``total`` bytes
    (a quarter of the float32 parameter bytes). Between 2^16 and 2^22 elements.
    """
    limit = min(total // 20, 1 << 22)
    chunk = 1 << 16
    while chunk * 2 <= limit:
        chunk *= 2
    return chunk


FillFn = Callable[[int, int, int, Tensor], None]
"""``fill(segment, start, length, out)`` writes the float32 values ``[start, start+length)`` of
``segment`` into ``out`` (a 1-D float32 tensor of ``length`` elements)."""


def select(
    sizes: Sequence[int],
    fill: FillFn,
    queries: Sequence[tuple[int, int]],
    device: torch.device,
) -> Tensor:
    """Exact order statistics of non-negative float32 values split into segments.

    Args:
        sizes: number of values in each segment.
        fill: callback producing the values of a segment chunk (see :data:`FillFn`).
        queries: ``(segment, rank)`` pairs; ``segment`` is an index into ``sizes`` or
            :data:`GLOBAL` for all segments together, ``rank`` the 0-based position in
            ascending order (``0 <= rank < size``).
        device: where the values live.

    Returns:
        float32 tensor with one value per query. NaN sorts above +inf (it is never selected
        unless asked for a rank among the NaNs), matching the bit order.
    """
    n_seg, n_q = len(sizes), len(queries)
    for seg, rank in queries:
        size = sum(sizes) if seg == GLOBAL else sizes[seg]
        if not 0 <= rank < size:
            raise ValueError(f"rank {rank} out of range for a segment of {size} values")
    chunk = chunk_size_for(device, sum(sizes))
    scratch = torch.empty(min(chunk, max(sizes, default=1)), dtype=torch.float32, device=device)
    rank = _device_ints(tuple(r for _, r in queries), device)
    # Queries touching each segment (its own and the global ones): a static, host-side list.
    touching = [[q for q, (s, _) in enumerate(queries) if s in (seg, GLOBAL)] for seg in range(n_seg)]

    def chunks(seg: int):
        for start in range(0, sizes[seg], chunk):
            n = min(chunk, sizes[seg] - start)
            out = scratch[:n]
            fill(seg, start, n, out)
            yield out.view(torch.int32), n

    # Round 0: one histogram of the top digit per segment; the global one is their sum.
    shift, bits = _ROUNDS[0]
    per_seg = torch.zeros(n_seg + 1, 1 << bits, dtype=torch.int64, device=device)
    for seg in range(n_seg):
        if not touching[seg]:
            continue
        for keys, n in chunks(seg):
            _count(per_seg[seg], keys >> shift, None)
    per_seg[n_seg] = per_seg[:n_seg].sum(0)
    rows = _device_ints(tuple(n_seg if s == GLOBAL else s for s, _ in queries), device)
    prefix, rank = _descend(per_seg[rows], rank)

    # Later rounds: histogram the next digit of the values that share each query's prefix.
    for shift, bits in _ROUNDS[1:]:
        hist = torch.zeros(n_q, 1 << bits, dtype=torch.int64, device=device)
        digit_mask = (1 << bits) - 1
        for seg in range(n_seg):
            if not touching[seg]:
                continue
            for keys, n in chunks(seg):
                digit = (keys >> shift) & digit_mask
                high = keys >> (shift + bits)
                for q in touching[seg]:
                    _count(hist[q], digit, high == prefix[q])
        digit, rank = _descend(hist, rank)
        prefix = (prefix << bits) | digit
    return prefix.to(torch.int32).view(torch.float32)


def _count(hist: Tensor, digits: Tensor, where: Tensor | None, shared_memory: bool | None = None) -> None:
    """``hist[d] += #{i : digits[i] == d and where[i]}`` (int64 ``hist``), without a host sync.

    CPU: ``scatter_add_`` (the fastest kernel there). Accelerators: ``histc`` on unit-wide bins,
    which counts in per-block shared memory; global atomics (``scatter_add_``) serialise on the
    few bins that hold most |z| values. Its float32 counts are exact: a chunk has < 2^24 values.
    """
    if not (hist.device.type != "cpu" if shared_memory is None else shared_memory):
        src = torch.ones_like(digits, dtype=torch.int64) if where is None else where.long()
        hist.scatter_add_(0, digits.long(), src)
        return
    values = digits.float() if where is None else torch.where(where, digits.float(), -1.0)
    hist += torch.histc(values, bins=hist.numel(), min=0, max=hist.numel()).long()


@lru_cache(maxsize=256)
def _device_ints(values: tuple[int, ...], device: torch.device) -> Tensor:
    """Query ranks/rows as a device tensor, built once per model layout: a host-to-device copy
    of pageable memory would otherwise wait for the device on every step."""
    return torch.tensor(values, dtype=torch.int64, device=device)


def _descend(hist: Tensor, rank: Tensor) -> tuple[Tensor, Tensor]:
    """For each row: the bin holding the ``rank``-th value and the rank within that bin."""
    cum = hist.cumsum(1)
    digit = torch.searchsorted(cum, rank[:, None], right=True)
    below = cum.gather(1, digit) - hist.gather(1, digit)
    return digit[:, 0], rank - below[:, 0]
