r"""Exact order statistics of |z|-scores over many tensors, in a fixed number of kernels.

ZSharp needs the ``q``-th percentile of |z| over a whole model (86M entries for ViT-B/16), over
each tensor, or the ``k``-th largest |z| of each tensor. ``torch.quantile`` refuses more than
2^24 elements and ``torch.sort`` / ``torch.kthvalue`` copy the input plus int64 indices; neither
batches over tensors. Here the values live in a :class:`~zsharp_algos.segments.Workspace` (the
flat, segmented layout of the filter) and the selection is exact, with two strategies:

* **accelerator** (sync-free; the default off the CPU): a most-significant-digit *radix
  select* on the IEEE-754 bit patterns (for non-negative floats the integer view is ordered like
  the values). Each round rewrites the buffer's bits in place into one histogram key per entry,
  ``slot * (2^b + 2) + 1 + digit`` where the entry's tensor (its *slot*) still shares the
  prefix found so far, and the key of a "below" or "above" bin otherwise, and counts every key of
  every tensor with **one** ``index_add``. The cumulative counts of each slot are absolute ranks
  (the "below" bin holds all smaller entries), so one ``searchsorted`` finds every query's next
  digit. No data-dependent shapes and no host reads, so nothing waits for the device; the buffer
  is refilled with |z| (:meth:`~zsharp_algos.segments.Workspace.zscores`: four ops) between
  rounds. A global query (all tensors together) is a slot of its own, counted in the first round
  as the sum of the tensors' histograms. ``torch.quantile``'s upper neighbour (rank + 1) is the
  smallest value above the lower one: :func:`successors`, a bit trick without a mask.
* **cpu** (the default on CPU tensors; reads small results on the host, a memory load there):
  a strided sample brackets the wanted ranks, one pass counts the values below the bracket and
  gathers those inside it, and quickselect finishes (:func:`bracket_select`). Cost independent of
  the distribution; where the bracket misses (values ordered against the stride, heavy ties) the
  radix select answers.

Counts are int64 (exact for any size). Histogram memory is bounded by a fraction of the entries
(:func:`digit_plan`): the digit width shrinks, and rounds are added, for small models.
"""
from __future__ import annotations

import contextlib
import contextvars
import math
from functools import lru_cache
from typing import Sequence

import torch
from torch import Tensor

__all__ = [
    "GLOBAL",
    "STRATEGIES",
    "strategy",
    "reads_host",
    "digit_plan",
    "select",
    "bracket_select",
]

#: Query row meaning "all segments together" rather than one segment.
GLOBAL = -1

#: The selection strategies :func:`strategy` takes: ``"auto"`` (by the device), ``"cpu"`` (reads small
#: results on the host), ``"accelerator"`` (fixed-shape, no host sync).
STRATEGIES = ("auto", "cpu", "accelerator")
_STRATEGY: contextvars.ContextVar[str] = contextvars.ContextVar("zsharp_filter_strategy", default="auto")


@contextlib.contextmanager
def strategy(name: str):
    """Run ZSharp's filter with the given selection strategy inside the ``with`` block.

    ``"auto"`` (the default): the host-reading ``"cpu"`` strategy on CPU tensors, the sync-free
    ``"accelerator"`` one elsewhere. ``"accelerator"`` on CPU tensors runs exactly what a GPU
    runs (the same ops, the same results), which is how the tests check it for host syncs and
    ``benchmarks/dispatch_count.py`` counts its kernels::

        with zsharp_algos.order_stats.strategy("accelerator"):
            opt.step(closure)

    ``"cpu"`` is for CPU tensors only."""
    if name not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {name!r}")
    token = _STRATEGY.set(name)
    try:
        yield
    finally:
        _STRATEGY.reset(token)


def reads_host(device: torch.device) -> bool:
    """Whether selection on ``device`` may read small results on the host, under the current
    :func:`strategy` (on accelerators a host read would stall the stream)."""
    chosen = _STRATEGY.get()
    if chosen == "auto":
        return torch.device(device).type == "cpu"
    if chosen == "cpu" and torch.device(device).type != "cpu":
        raise ValueError(f"the host-reading 'cpu' strategy runs on CPU tensors only, got {device}")
    return chosen == "cpu"


# --------------------------------------------------------------------------- plan
def key_bits(dtype: torch.dtype) -> tuple[torch.dtype, int]:
    """The integer view of non-negative ``dtype`` values and its number of value bits."""
    return (torch.int64, 63) if dtype == torch.float64 else (torch.int32, 31)


MAX_DIGIT = 16  # widest digit
#: Histogram bins allowed, per entry of the population: int32 counts and their int32 cumulative
#: sums are 8 bytes a bin, so 0.075 bins an entry is 0.15x the float32 entry bytes.
BINS_PER_ENTRY = 0.075


def digit_width(slots: int, entries: int) -> int:
    """The widest digit whose ``slots`` histograms fit the bin budget (1 to :data:`MAX_DIGIT`)."""
    per = max(4, int(BINS_PER_ENTRY * entries) // max(1, slots))
    return max(1, min(MAX_DIGIT, int(math.log2(per))))


def digit_plan(bits: int, slots: int, entries: int, wide_last: bool = False) -> list[int]:
    """Digit widths, most significant first, covering ``bits`` within the bin budget.
    ``wide_last``: make the last round the widest one whose doubled histogram still fits (the
    tensor scope's final round spans two blocks), the others share the remaining bits."""
    b = digit_width(slots, entries)
    if wide_last and b >= 2:
        last = min(b - 1, bits)
        rest = bits - last
        k = -(-rest // b) if rest else 0
        return [rest // k + (1 if i < rest % k else 0) for i in range(k)] + [last] if k else [last]
    widths = []
    while bits > 0:
        widths.append(min(b, bits))
        bits -= widths[-1]
    return widths


@lru_cache(maxsize=256)
def device_ints(values: tuple[int, ...], device: torch.device, dtype: torch.dtype = torch.int64) -> Tensor:
    """Static integers (query ranks, slot offsets) as a device tensor, built once per layout: a
    pageable host-to-device copy would otherwise wait for the device on every step."""
    return torch.tensor(values, dtype=dtype, device=device)


@lru_cache(maxsize=64)
def _unit(dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
    # 0-dim 0 and 1, expanded to any length: index_add's zero start and its all-ones source
    return torch.zeros((), dtype=dtype, device=device), torch.ones((), dtype=dtype, device=device)


def _count(keys: Tensor, nbins: int, hist: Tensor | None) -> Tensor:
    """``hist[k] += #{i : keys[i] == k}`` (int32: exact below 2^31 entries), one ``index_add``;
    every key is in range by construction."""
    zero, one = _unit(torch.int32, keys.device)
    return torch.index_add(zero.expand(nbins) if hist is None else hist, 0, keys, one.expand(keys.numel()))


# --------------------------------------------------------------------------- radix select
class Radix:
    """Radix selection over a :class:`~zsharp_algos.segments.Workspace` (module doc). Ranks are
    int32 device tensors; prefixes and results are bit patterns in the key dtype.

    In rounds after the first, an entry of a slot below the prefix is counted in the slot's first
    digit bin and one above it in an extra last bin: the cumulative counts are then absolute ranks,
    and ``searchsorted`` returns the next digit itself."""

    def __init__(self, ws):
        self.ws = ws
        self.L = ws.layout
        self.entry = ws.entry
        self.kdt, self.bits = key_bits(ws.dtype)

    def _keys(self, blk) -> Tensor:
        return blk.flat.view(self.kdt)

    def _complete(self, hist: Tensor | None, nbins: int) -> Tensor:
        """This process's counts -> the whole tensors' (summed across the shard group when the
        workspace holds shards: integer counts, so exact)."""
        if hist is None:  # no block: this process holds no entry of the pool
            hist = _unit(torch.int32, self.L.device)[0].expand(nbins).clone()
        shards = self.ws.shards
        return hist if shards is None else shards.sum_(hist)

    def _search(self, cum: Tensor, rank: Tensor) -> Tensor:
        return torch.searchsorted(cum, rank, right=True, out_int32=self.kdt == torch.int32)

    def first_round(self, width: int, seg_rank: Tensor | None, global_rank: Tensor | None):
        """Top ``width`` bits for ``(n, q)`` ranks per segment and ``(q,)`` ranks over all
        entries (their histogram is the sum of the segments'). Returns the digits."""
        L, shift, W = self.L, self.bits - width, 1 << width
        base = L.const(("r1", W, self.kdt), lambda: torch.arange(L.n, device=L.device, dtype=self.kdt) * W)
        base_e = base[self.entry]
        hist = None
        for blk in self.ws.blocks_with_z():
            k = self._keys(blk)
            k.bitwise_right_shift_(shift)
            if blk.X is not None:
                blk.X.view(self.kdt).add_(blk.row_part(base_e))
            if blk.T is not None:
                blk.T.view(self.kdt).add_(blk.tail_part(base_e, L.rows))
            self.ws.fresh = False
            hist = _count(k, L.n * W, hist)
        cum = self._complete(hist, L.n * W).view(L.n, W).cumsum(1, dtype=torch.int32)
        seg_p = self._search(cum, seg_rank) if seg_rank is not None else None
        glob_p = self._search(cum.sum(0, dtype=torch.int32), global_rank) if global_rank is not None else None
        return seg_p, glob_p

    def segment_round(self, prefix: Tensor, rank: Tensor, width: int, shift: int, blocks: int = 1):
        """The next ``width`` bits (below ``shift + width``) of the ``(n, q)`` ranks per segment
        given ``(n,)`` prefixes so far. ``blocks=2`` counts the block after the prefix's too (a
        final round whose other ranks may sit just above). Returns the ``(n, q)`` positions ``p``
        (the rank's value is ``prefix * W + p`` when ``p < blocks * W``, else above the counted
        blocks) and the cumulative counts."""
        L, W = self.L, 1 << width
        block = blocks * W + 1
        key = ("seg", block, self.kdt)
        if key not in L._consts:
            lower = torch.arange(L.n, device=L.device, dtype=self.kdt) * block
            L._consts[key] = (lower, torch.stack([lower, lower + block - 1]))
        lower, bounds = L._consts[key]
        # key = clamp((k >> shift) - prefix * W + slot * block, slot * block, slot * block + block - 1)
        table = torch.cat([torch.add(lower, prefix, alpha=-W)[None], bounds])[:, self.entry]
        hist = None
        for blk in self.ws.blocks_with_z():
            k = self._keys(blk)
            if shift:
                k.bitwise_right_shift_(shift)
            if blk.X is not None:
                o, lo, hi = blk.row_part(table)
                blk.X.view(self.kdt).add_(o).clamp_(lo, hi)
            if blk.T is not None:
                o, lo, hi = blk.tail_part(table, L.rows)
                blk.T.view(self.kdt).add_(o).clamp_(lo, hi)
            self.ws.fresh = False
            hist = _count(k, L.n * block, hist)
        cum = self._complete(hist, L.n * block).view(L.n, block).cumsum(1, dtype=torch.int32)
        return self._search(cum, rank), cum

    def global_round(self, prefix: Tensor, rank: Tensor, width: int, shift: int, blocks: int = 1):
        """As :meth:`segment_round` for ``(q,)`` ranks over all entries (one slot, scalar ops)."""
        W = 1 << width
        hist = None
        for blk in self.ws.blocks_with_z():
            k = self._keys(blk)
            if shift:
                k.bitwise_right_shift_(shift)
            k.sub_(prefix, alpha=W).clamp_(0, blocks * W)
            self.ws.fresh = False
            hist = _count(k, blocks * W + 1, hist)
        cum = self._complete(hist, blocks * W + 1).cumsum(0, dtype=torch.int32)
        return self._search(cum, rank), cum


def descend(radix: Radix, rank: Tensor, widths: Sequence[int]) -> Tensor:
    """One ``(n, 1)`` rank per segment through every round: the values' bit patterns ``(n,)``."""
    prefix = radix.first_round(widths[0], rank, None)[0][:, 0]
    return continue_segments(radix, prefix, rank, widths[1:], radix.bits - widths[0])


def continue_segments(radix: Radix, prefix: Tensor, rank: Tensor, widths: Sequence[int], shift: int) -> Tensor:
    """Further rounds of one ``(n, 1)`` rank per segment from its ``(n,)`` prefix digits."""
    for w in widths:
        shift -= w
        pos, _ = radix.segment_round(prefix, rank, w, shift)
        prefix = torch.add(pos[:, 0], prefix, alpha=1 << w)
    return prefix


def descend_global(radix: Radix, rank: Tensor, first: Tensor, widths: Sequence[int], shift: int) -> tuple[Tensor, Tensor]:
    """One ``(1,)`` global rank from its first-round digit ``first``: its bit pattern and the
    count of entries <= it."""
    prefix, le = first, None
    for w in widths:
        shift -= w
        pos, cum = radix.global_round(prefix, rank, w, shift)
        prefix = torch.add(pos[0], prefix, alpha=1 << w)
        le = cum[pos][0]
    return prefix, le


def successors(ws, bits: Tensor, per_segment: bool) -> Tensor:
    """The smallest stored value above ``bits`` (per segment when ``entry`` is given, else over
    all entries), as bit patterns; values with none get a pattern above every value.

    With ``c = bits + 1``, ``(key - c) & MAX`` keeps the entries above ``bits`` as their
    distance to ``c`` and sends the others to ``2^b - (c - key) >= 2^b - c``, above every kept
    distance: a plain minimum then finds the successor, with no mask and no temporary. The
    buffer is rewritten (``ws.fresh`` is cleared)."""
    kdt, nbits = key_bits(ws.dtype)
    top = (1 << nbits) - 1
    L = ws.layout
    c = bits + 1
    entry = ws.entry if per_segment else None
    mins, rows, tails = [], [], []
    c_e = c[entry] if entry is not None else None
    for blk in ws.blocks_with_z():
        k = blk.flat.view(kdt)
        if c_e is None:
            k.sub_(c)
        else:
            if blk.X is not None:
                blk.X.view(kdt).sub_(blk.row_part(c_e))
            if blk.T is not None:
                blk.T.view(kdt).sub_(blk.tail_part(c_e, L.rows))
        k.bitwise_and_(top)
        ws.fresh = False
        if entry is None:
            if k.numel():
                mins.append(k.amin())
        else:
            if blk.X is not None:
                rows.append(blk.X.view(kdt).amin(1))
            if blk.T is not None:
                tails.append(blk.T.view(kdt) if not ws.windowed else blk.T.view(kdt).clone())
    big = L.const(("big", kdt), lambda: torch.full((), top, dtype=kdt, device=L.device))
    if entry is None:
        m = mins[0] if len(mins) == 1 else torch.stack(mins).amin() if mins else big.clone()
    elif rows or tails:
        m = torch.scatter_reduce(big.expand(L.n), 0, entry, torch.cat(rows + tails), "amin")
    else:  # a process whose shards of the pool are all empty
        m = big.expand(L.n).clone()
    if ws.shards is not None:  # the smallest distance over the whole tensors
        m = ws.shards.min_(m.contiguous())
    return m + c  # past every value where there is no successor (sorted above them all)


# --------------------------------------------------------------------------- CPU: bracket
BRACKET_SAMPLE = 1 << 16  # sample size: sorting it costs well under one pass over 10M values
BRACKET_SIGMAS = 6.0  # bracket half-width, in standard deviations of a sample rank
BRACKET_MAX_SHARE = 1 / 32  # more values than this inside the bracket (heavy ties): give up
DIRECT_MAX = 1 << 18  # fewer than this: quickselect on them all (no sample, no scan)


def bracket_select(pieces: Sequence[Tensor], ranks: Sequence[int]) -> Tensor | None:
    """Exact order statistics at ``ranks`` of the values in ``pieces`` (1-D, together one
    population), or None where the sampled bracket misses (the caller's radix select answers).

    A strided sample's order statistics around ``rank / n`` give ``lo <= hi`` that, for data not
    ordered against the stride, enclose the wanted values; one pass counts ``values < lo`` and
    gathers the values in ``[lo, hi]``, which proves it (or not), and quickselect finishes on
    the few percent gathered. Temporaries: two float flags per value of a piece of at most
    :func:`scan_step` values."""
    n = sum(p.numel() for p in pieces)
    if n <= DIRECT_MAX:  # a sample would be most of the values: select among them directly
        return kth(torch.cat(list(pieces)) if len(pieces) > 1 else pieces[0], ranks)
    stride = max(1, n // BRACKET_SAMPLE)
    sample = torch.cat([p[::stride] for p in pieces])
    m = sample.numel()
    p = (min(ranks) + max(ranks)) / (2 * n)
    margin = BRACKET_SIGMAS * math.sqrt(m * p * (1 - p)) + 16
    first = math.floor(min(ranks) / n * m - margin)
    last = math.ceil(max(ranks) / n * m + margin)
    if first <= 0 or last >= m - 1:
        return None  # ranks near the ends: the radix select is as cheap
    # quickselect rather than a sort: linear in the sample size
    lo, hi = kth(sample, [first, last]).view(2, 1)
    tied = bool(lo == hi)  # the ranks may fall in a run of one repeated value (e.g. exact zeros)
    scan = _scan_numpy if _numpy() is not None else _scan_torch
    found = scan(pieces, lo, hi, tied, n * BRACKET_MAX_SHARE)
    if found is None:
        return None  # too many values inside the bracket (heavy ties): bounded memory
    below, inside, parts = found
    if not (below <= min(ranks) and max(ranks) < below + inside):
        return None
    if tied:
        return lo.expand(len(ranks)).clone()
    return kth(torch.cat(parts), [r - below for r in ranks])


def kth(values: Tensor, ranks: Sequence[int]) -> Tensor:
    """Exact order statistics of a 1-D CPU tensor at ``ranks`` by quickselect (NumPy's
    ``partition`` where installed: several times faster than ``torch.kthvalue``, which also
    tracks indices); a rank just above another is that value again or the smallest above it."""
    np = _numpy()
    if np is not None:
        parted = np.partition(values.numpy(), sorted(set(ranks)))
        out = torch.empty(len(ranks), dtype=values.dtype)  # torch's memory, so torch sees it
        out.numpy()[:] = parted[list(ranks)]
        return out
    out: dict[int, Tensor] = {}
    for r in sorted(set(ranks)):
        below = out.get(r - 1)
        if below is not None:
            out[r] = below if int((values <= below).sum()) > r else values[values > below].min()
        else:
            out[r] = values.kthvalue(r + 1).values
    return torch.stack([out[r] for r in ranks])


def _scan_torch(pieces, lo, hi, tied, limit):
    """Count the values below ``lo`` and gather those in ``[lo, hi]`` (None past ``limit``)."""
    n = sum(p.numel() for p in pieces)
    step = min(scan_step(n), 1 << 24)  # float 0/1 sums stay exact
    flags = torch.empty(2, min(step, max(p.numel() for p in pieces)), dtype=pieces[0].dtype)
    below, inside, parts = 0, 0, []
    for piece in pieces:
        for i in range(0, piece.numel(), step):
            chunk = piece[i : i + step]
            # float 0/1 flags: compared, summed and combined several times faster than bool on CPUs
            is_below, is_inside = flags[0, : chunk.numel()], flags[1, : chunk.numel()]
            below += int(torch.lt(chunk, lo, out=is_below).sum())
            torch.le(chunk, hi, out=is_inside).sub_(is_below)  # lo <= value <= hi
            if tied:
                inside += int(is_inside.sum())
                continue
            parts.append(chunk[is_inside.nonzero()[:, 0]])
            inside += parts[-1].numel()
            if inside > limit:
                return None
    return below, inside, parts


def _scan_numpy(pieces, lo, hi, tied, limit):
    """:func:`_scan_torch` through NumPy views of the same memory: its compare, count and
    compress run several times faster on CPUs than torch's bool ops and ``nonzero`` (and do not
    wait on thread barriers when other processes share the cores)."""
    np = _numpy()
    lo_v, hi_v = lo.item(), hi.item()
    n = sum(p.numel() for p in pieces)
    step = max(1 << 16, scan_step(n))  # its bool temporaries: 2 bytes a value of a chunk
    below, inside, parts = 0, 0, []
    for piece in pieces:
        values = piece.numpy()
        for i in range(0, values.size, step):
            chunk = values[i : i + step]
            is_below = chunk < lo_v
            below += int(np.count_nonzero(is_below))
            if tied:
                inside += int(np.count_nonzero(chunk == lo_v))
                continue
            is_inside = chunk <= hi_v
            np.logical_xor(is_below, is_inside, out=is_inside)  # lo <= value <= hi
            count = int(np.count_nonzero(is_inside))
            if inside + count > limit:
                return None
            gathered = torch.empty(count, dtype=piece.dtype)  # torch's memory, so torch sees it
            np.compress(is_inside, chunk, out=gathered.numpy())
            parts.append(gathered)
            inside += count
    return below, inside, parts


@lru_cache(maxsize=1)
def _numpy():
    try:
        import numpy

        return numpy
    except ImportError:  # torch runs without NumPy: the torch scan does the same
        return None


def scan_step(total: int) -> int:
    """Values per kernel call when the CPU bracket scans ``total`` values: a 32nd of them (at
    least 2^12), so its two float flags a value stay under 1/16 of the bytes."""
    return max(1 << 12, -(-total // 32))


# --------------------------------------------------------------------------- plain values
def select(segments: Sequence[Tensor], queries: Sequence[tuple[int, int]], *, storage: bool = True) -> Tensor:
    """Exact order statistics of non-negative float32 / float64 values split into segments, by
    the current :func:`strategy` (the filter's own selection, exposed for tests and reuse).

    Args:
        segments: 1-D tensors on one device, one dtype.
        queries: ``(segment, rank)`` pairs; ``segment`` indexes ``segments`` or is
            :data:`GLOBAL` for all of them together; ``rank`` is 0-based in ascending order.
        storage: keep the values in one flat buffer (else the windowed path).

    Returns one value per query. NaN sorts above +inf (it is never selected unless asked for a
    rank among the NaNs), as the bit order says.
    """
    from .segments import Workspace, layout_for

    sizes = [s.numel() for s in segments]
    for seg, rank in queries:
        size = sum(sizes) if seg == GLOBAL else sizes[seg]
        if not 0 <= rank < size:
            raise ValueError(f"rank {rank} out of range for a segment of {size} values")
    if not queries:
        return torch.empty(0, dtype=segments[0].dtype, device=segments[0].device)
    dtype, device = segments[0].dtype, segments[0].device
    layout = layout_for(sizes, device)
    buf = torch.empty(layout.numel, dtype=dtype, device=device) if storage else None
    ws = Workspace(layout, segments, dtype, buf)
    # identity z: mean 0, denom 1, so |z| = |v - 0| / 1 = v
    ws.coef = torch.stack([torch.zeros(layout.rows + layout.tail_numel, dtype=dtype, device=device),
                           torch.ones(layout.rows + layout.tail_numel, dtype=dtype, device=device)])
    out = [None] * len(queries)
    kdt, nbits = key_bits(dtype)
    if reads_host(device) and not ws.windowed:
        ws.z_buffer()
        for q, (seg, rank) in enumerate(queries):
            pieces = [ws.buffer] if seg == GLOBAL else ws.segment_pieces(seg)
            found = bracket_select(pieces, [rank])
            if found is not None:
                out[q] = found[0]
    missing = [q for q in range(len(queries)) if out[q] is None]
    # radix: one pass family per distinct rank set (a segment may be asked several ranks)
    radix = Radix(ws)
    while missing:
        seg_rank = [0] * layout.n
        wanted, used, glob = [], set(), None
        for q in missing:
            seg, rank = queries[q]
            if seg == GLOBAL:
                glob = q if glob is None else glob
            elif seg not in used:
                used.add(seg)
                seg_rank[seg] = rank
                wanted.append(q)
        if wanted:
            widths = digit_plan(nbits, layout.n, layout.numel)
            bits = descend(radix, device_ints(tuple(seg_rank), device, torch.int32)[:, None], widths)
            for q in wanted:
                out[q] = bits[queries[q][0]].view(dtype)
        if glob is not None:
            rank = device_ints((queries[glob][1],), device, torch.int32)
            width = digit_plan(nbits, 1, layout.numel)[0]
            first = radix.first_round(width, None, rank)[1][0]
            bits, _ = descend_global(radix, rank, first, digit_plan(nbits - width, 1, layout.numel), nbits - width)
            out[glob] = bits.view(dtype)
        missing = [q for q in missing if out[q] is None]
    return torch.stack(out)
