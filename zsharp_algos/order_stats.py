"""Exact order statistics of |z|-scores over many tensors, without a size cap.

ZSharp needs the q-th percentile of |z| over a whole model (86M entries for ViT-B/16) or over
each tensor. ``torch.quantile`` refuses more than 2^24 elements and ``torch.sort`` /
``torch.kthvalue`` copy the input plus int64 indices (3x its bytes). Instead we run a
most-significant-digit radix select on the IEEE-754 bit pattern: for non-negative float32 values
the int32 view is ordered like the values, so the k-th smallest value is found digit by digit
with histograms. Two strategies, both exact:

* **CPU** (:func:`_select_by_halves`): two rounds of 16 bits. The digits are the two int16 halves
  of each value, read through zero-copy views, so a round is one ``bincount`` (round 1) or one
  compare + ``masked_select`` + ``bincount`` of the few values left in the chosen bin (round 2).
  It reads the chosen bins on the host: on the CPU that is a memory load, not a device sync.
  ``bincount`` is single-threaded and slows several-fold when one bin is crowded, as real
  gradients' are: queries over all the values stored back to back (ZSharp's global threshold)
  whose sample shows a crowded bin first try :func:`_select_by_bracket` (the sample brackets the
  ranks, one counting pass checks the bracket and gathers the few values inside it, quickselect
  finishes), whose cost does not depend on the distribution.
* **accelerators** (:func:`_select_by_radix`): three fixed-shape rounds (11 + 10 + 10 bits)
  counted with ``histc`` (per-block shared memory), no data-dependent shape and no host read,
  so nothing waits for the device.

Values arrive as a stream of chunks (a callback, see :data:`ChunksFn`): views of a stored |z|
buffer, or |z| recomputed into a small scratch, so transient memory stays O(chunk).
"""
from __future__ import annotations

import math
import sys
from functools import lru_cache
from typing import Callable, Iterable, Sequence

import torch
from torch import Tensor

__all__ = ["GLOBAL", "chunk_size_for", "reads_host", "scan_step", "select"]

#: Query row meaning "all segments together" rather than one segment.
GLOBAL = -1

# Accelerator strategy: (shift, bits) of each radix round over the 31 value bits.
_ROUNDS = ((20, 11), (10, 10), (0, 10))
# CPU strategy: positions of the high and low int16 halves of a float32 in memory.
_HIGH = 1 if sys.byteorder == "little" else 0
_HIGH_BINS = 1 << 15  # the sign bit of |z| is 0: the high half is in [0, 2^15)
_LOW_BINS = 1 << 16

ChunksFn = Callable[[int], Iterable[Tensor]]
"""``chunks(segment)`` yields 1-D float32 tensors that together hold the segment's values in
order (each may be a view of stored values or a scratch buffer refilled between yields)."""


def reads_host(device: torch.device) -> bool:
    """Whether selection on ``device`` may read small results on the host (true on the CPU,
    where that is a memory load; on accelerators it would stall the stream)."""
    return device.type == "cpu"


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


def scan_step(device: torch.device, total: int) -> int:
    """Elements per kernel call when a round reads stored values (no scratch to refill): an
    eighth of ``total`` or :func:`chunk_size_for`, whichever is more, so the temporaries a
    round makes per call (masks, copies of int16 halves, float flags) stay a small fraction of
    the parameter bytes however the values are split into tensors."""
    return max(chunk_size_for(device, total), -(-total // 8))


def select(
    sizes: Sequence[int],
    chunks: ChunksFn,
    queries: Sequence[tuple[int, int]],
    device: torch.device,
    joined: Tensor | None = None,
) -> Tensor:
    """Exact order statistics of non-negative float32 values split into segments.

    Args:
        sizes: number of values in each segment.
        chunks: the values of a segment, as a stream of chunks (see :data:`ChunksFn`).
        queries: ``(segment, rank)`` pairs; ``segment`` is an index into ``sizes`` or
            :data:`GLOBAL` for all segments together, ``rank`` the 0-based position in
            ascending order (``0 <= rank < size``).
        device: where the values live.
        joined: optional 1-D tensor holding every segment's values back to back, in segment
            order (when they are stored that way): queries over all segments then read it in
            one kernel call per round instead of one per segment.

    Returns:
        float32 tensor with one value per query. NaN sorts above +inf (it is never selected
        unless asked for a rank among the NaNs), matching the bit order.
    """
    for seg, rank in queries:
        size = sum(sizes) if seg == GLOBAL else sizes[seg]
        if not 0 <= rank < size:
            raise ValueError(f"rank {rank} out of range for a segment of {size} values")
    if not queries:
        return torch.empty(0, dtype=torch.float32, device=device)
    if reads_host(device):
        return _select_by_halves(len(sizes), chunks, queries, joined)
    return _select_by_radix(len(sizes), chunks, queries, device)


# --------------------------------------------------------------------------- CPU
def _halves(values: Tensor) -> tuple[Tensor, Tensor]:
    """Zero-copy int16 views of the high and low 16 bits of float32 ``values``."""
    pairs = values.view(torch.int16)
    return pairs[_HIGH::2], pairs[1 - _HIGH :: 2]


def _select_by_halves(n_seg: int, chunks: ChunksFn, queries: Sequence[tuple[int, int]], joined) -> Tensor:
    if joined is not None and any(s == GLOBAL for s, _ in queries) and _crowded(joined):
        mine = [q for q, (s, _) in enumerate(queries) if s == GLOBAL]
        found = _select_by_bracket(joined, [queries[q][1] for q in mine])
        if found is not None:
            rest = sorted(set(range(len(queries))) - set(mine))
            out = torch.empty(len(queries), dtype=torch.float32)
            out[mine] = found
            if rest:
                out[rest] = _select_by_halves(n_seg, chunks, [queries[q] for q in rest], None)
            return out
    rows = {s for s, _ in queries}

    def row_chunks(row: int) -> Iterable[Tensor]:
        if row != GLOBAL:
            return chunks(row)
        if joined is None:
            return (v for seg in range(n_seg) for v in chunks(seg))
        step = scan_step(joined.device, joined.numel())
        return (joined[i : i + step] for i in range(0, joined.numel(), step))

    # Round 1: histogram of the high halves per queried row. A segment's histogram is resolved
    # (chosen bin, its count, the rank inside it) as soon as it is complete; the global one is
    # their sum, or one bincount over ``joined``.
    chosen: dict[int, tuple[int, int, int]] = {}  # query -> (high half, values in that bin, rank in bin)
    sum_segments = GLOBAL in rows and joined is None
    total = torch.zeros(_HIGH_BINS, dtype=torch.int64) if sum_segments else None
    for seg in range(n_seg):
        if seg in rows or sum_segments:
            hist = _high_hist(chunks(seg))
            if sum_segments:
                total += hist
            if seg in rows:
                _resolve(hist, seg, queries, chosen)
    if GLOBAL in rows:
        _resolve(total if sum_segments else _high_hist([joined]), GLOBAL, queries, chosen)

    # Round 2: histogram of the low halves of the values in each chosen (row, bin).
    bits: list[int] = [0] * len(queries)
    for row, high, count in {(s, *chosen[q][:2]) for q, (s, _) in enumerate(queries)}:
        hist = _low_hist(lambda: row_chunks(row), high, count)
        mine = [q for q, (s, _) in enumerate(queries) if s == row and chosen[q][0] == high]
        low, _ = _descend(hist.expand(len(mine), -1), torch.tensor([chosen[q][2] for q in mine]))
        for q, d in zip(mine, low.tolist()):
            bits[q] = (high << 16) | d
    return torch.tensor(bits, dtype=torch.int64).to(torch.int32).view(torch.float32)


BRACKET_SAMPLE = 1 << 16  # sample size: sorting it costs well under one pass over 10M values
BRACKET_SIGMAS = 6.0  # bracket half-width, in standard deviations of a sample rank
BRACKET_MAX_SHARE = 1 / 16  # more values than this inside the bracket (heavy ties): use the radix


CROWDED_SHARE = 0.02  # a bin of the top 16 bits holding this share of the sample is crowded


def _strided_sample(values: Tensor) -> Tensor:
    """About :data:`BRACKET_SAMPLE` values at a fixed stride (a view)."""
    return values[:: max(1, values.numel() // BRACKET_SAMPLE)]


def _crowded(values: Tensor) -> bool:
    """Whether a strided sample of ``values`` puts a crowded share in one bin of the top 16 bits.
    ``bincount`` increments one counter at a time, so a crowded bin serialises it: on real
    gradients (timm resnet18, a fifth of |z| in one bin) round 1 takes ~3x as long as on spread
    values, and the bracket is faster; on spread values the radix select is."""
    sample = _strided_sample(values).contiguous()
    return int(torch.bincount(_halves(sample)[0], minlength=_HIGH_BINS).max()) > CROWDED_SHARE * sample.numel()


def _select_by_bracket(values: Tensor, ranks: Sequence[int]) -> Tensor | None:
    """Exact order statistics of 1-D float32 ``values`` at ``ranks`` (close together), or None
    when the sample's bracket misses them (then the caller's radix select answers).

    The strided sample's order statistics around ``rank / n`` give values ``lo <= hi`` that, for any
    data not ordered adversarially against the stride, enclose the wanted ones. Counting
    ``values < lo`` and ``values <= hi`` proves it (or not): then the answer is the
    ``(rank - below)``-th smallest of the values in ``[lo, hi]``, a percent or two of them
    (gathered in the same pass, so a miss costs that pass).
    """
    n = values.numel()
    sample = _strided_sample(values)
    m = sample.numel()
    p = (min(ranks) + max(ranks)) / (2 * n)
    margin = BRACKET_SIGMAS * math.sqrt(m * p * (1 - p)) + 16
    first = math.floor(min(ranks) / n * m - margin)
    last = math.ceil(max(ranks) / n * m + margin)
    if first <= 0 or last >= m - 1:
        return None  # a rank near the ends: the radix select is as cheap
    # quickselect (kthvalue, 1-based) rather than a sort: linear in the sample size
    lo, hi = sample.kthvalue(first + 1).values.view(1), sample.kthvalue(last + 1).values.view(1)
    step = min(scan_step(values.device, n), 1 << 24)  # float 0/1 sums stay exact
    flags = torch.empty(2, min(step, n), dtype=torch.float32)
    tied = bool(lo == hi)  # the ranks may fall in a run of one repeated value (e.g. exact zeros)
    below, inside, parts = 0, 0, []
    for i in range(0, n, step):  # one pass: count below the bracket, gather what is inside it
        chunk = values[i : i + step]
        # float 0/1 flags: compared, summed and combined several times faster than bool on CPUs
        is_below, is_inside = flags[0, : chunk.numel()], flags[1, : chunk.numel()]
        below += int(torch.lt(chunk, lo, out=is_below).sum())
        torch.le(chunk, hi, out=is_inside).sub_(is_below)  # lo <= value <= hi
        if tied:
            inside += int(is_inside.sum())
        else:
            parts.append(chunk[is_inside.nonzero()[:, 0]])
            inside += parts[-1].numel()
            if inside > n * BRACKET_MAX_SHARE:  # too many to gather (heavy ties): bounded memory
                return None
    if not (below <= min(ranks) and max(ranks) < below + inside):
        return None
    if tied:
        return lo.expand(len(ranks)).clone()
    between = torch.cat(parts)
    # the smallest wanted rank by quickselect; the next few (torch.quantile's neighbour) follow it
    first_rank = min(ranks) - below
    at_first = between.kthvalue(first_rank + 1).values
    up_to_first = int((between <= at_first).sum())  # ranks [0, up_to_first) hold values <= at_first
    after = max(ranks) - below + 1 - up_to_first
    following = torch.topk(between[between > at_first], after, largest=False).values if after > 0 else None
    return torch.stack([at_first if r - below < up_to_first else following[r - below - up_to_first] for r in ranks])


def _resolve(hist: Tensor, row: int, queries, chosen: dict[int, tuple[int, int, int]]) -> None:
    """For the queries on ``row``: the bin holding their rank, its count, and the rank inside it."""
    mine = [q for q, (s, _) in enumerate(queries) if s == row]
    digit, within = _descend(hist.expand(len(mine), -1), torch.tensor([queries[q][1] for q in mine]))
    for q, d, c, r in zip(mine, digit.tolist(), hist[digit].tolist(), within.tolist()):
        chosen[q] = (d, c, r)


def _high_hist(chunks: Iterable[Tensor]) -> Tensor:
    """Counts of the high halves (the top 16 bits) of the values."""
    hist = torch.zeros(_HIGH_BINS, dtype=torch.int64)
    for values in chunks:
        hist += torch.bincount(_halves(values)[0], minlength=_HIGH_BINS)
    return hist


def _low_hist(chunks: Callable[[], Iterable[Tensor]], high: int, count: int) -> Tensor:
    """Counts of the low halves of the ``count`` values whose high half is ``high``.

    Usually a bin holds well under 1% of the values and compacting them is cheap. A heavy bin is
    almost always one value repeated (gradients that are exactly zero, e.g. a zero-initialised
    residual branch or unused embedding rows, share one |z| per tensor): checked with a float
    compare and a sum, which is far cheaper than compacting millions of values.
    """
    hist = torch.zeros(_LOW_BINS, dtype=torch.int64)
    if count > (1 << 16):
        tied = _tied_value(chunks, high, count)
        if tied is not None:
            hist[tied & 0xFFFF] = count
            return hist
    for values in chunks():  # a fresh stream: chunks may share one scratch buffer
        high_half, low_half = _halves(values)
        hist += torch.bincount(low_half[high_half == high].to(torch.int32) & 0xFFFF, minlength=_LOW_BINS)
    return hist


def _tied_value(chunks: Callable[[], Iterable[Tensor]], high: int, count: int) -> int | None:
    """The bits of the value that all ``count`` values in bin ``high`` share, or None."""
    for values in chunks():  # a heavy bin shows up in a sparse sample of the values
        sample = values[:: max(1, values.numel() >> 12)].contiguous()
        hits = sample[_halves(sample)[0] == high]
        if hits.numel():
            candidate = hits[:1].clone()
            break
    else:
        return None
    equal = 0
    for values in chunks():
        # a float 0/1 result sums several times faster than a bool one on CPUs
        equal += int(torch.eq(values, candidate, out=torch.empty_like(values)).sum())
    return int(candidate.view(torch.int32)) if equal == count else None


# --------------------------------------------------------------------------- accelerators
def _select_by_radix(n_seg: int, chunks: ChunksFn, queries: Sequence[tuple[int, int]], device) -> Tensor:
    n_q = len(queries)
    rank = _device_ints(tuple(r for _, r in queries), device)
    # Queries touching each segment (its own and the global ones): a static, host-side list.
    touching = [[q for q, (s, _) in enumerate(queries) if s in (seg, GLOBAL)] for seg in range(n_seg)]

    # Round 0: one histogram of the top digit per segment; the global one is their sum.
    shift, bits = _ROUNDS[0]
    per_seg = torch.zeros(n_seg + 1, 1 << bits, dtype=torch.int64, device=device)
    for seg in range(n_seg):
        if not touching[seg]:
            continue
        for values in chunks(seg):
            _count(per_seg[seg], values.view(torch.int32) >> shift, None)
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
            for values in chunks(seg):
                keys = values.view(torch.int32)
                digit = (keys >> shift) & digit_mask
                high = keys >> (shift + bits)
                for q in touching[seg]:
                    _count(hist[q], digit, high == prefix[q])
        digit, rank = _descend(hist, rank)
        prefix = (prefix << bits) | digit
    return prefix.to(torch.int32).view(torch.float32)


def _count(hist: Tensor, digits: Tensor, where: Tensor | None) -> None:
    """``hist[d] += #{i : digits[i] == d and where[i]}`` (int64 ``hist``), without a host sync.

    ``histc`` on unit-wide bins counts in per-block shared memory; global atomics
    (``scatter_add_``) would serialise on the few bins that hold most |z| values. Its float32
    counts are exact: a chunk has fewer than 2^24 values.
    """
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
