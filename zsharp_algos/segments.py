r"""The flat, segmented layout ZSharp's filter works in: many tensors, a fixed number of kernels.

The gradients of ``n`` tensors are copied into one flat work buffer (the optimizer's persistent
float32 buffer, lent for the call) laid out so that per-tensor work is done by a few whole-buffer
ops, whatever ``n``:

* **heads**: each tensor's first ``floor(size / B) * B`` entries, tensor after tensor, viewed
  as a ``(R, B)`` matrix whose every row belongs to one tensor (``B`` is a power of two, 1024
  for usual models). A per-tensor value (a mean, a threshold) reaches its entries as a
  length-``R`` column broadcast along the rows: one op for all tensors.
* **tails**: the remaining ``size mod B`` entries of each tensor, back to back (at most
  ``B - 1`` per tensor), addressed with a per-entry tensor index.

Per-tensor sums (*segment reductions*) are row sums of the matrix plus the tail entries, added up
per tensor by one float64 ``cumsum`` and a difference at each tensor's boundaries. Each op on the
buffer is thus one op on the matrix and one on the tails, and the index tensors behind it are
built once per model layout and cached.

When no buffer is lent (non-float32 weights, float64 gradients), the same layout is walked in
*windows*: a bounded scratch holds a band of rows (or of tails) at a time, refilled from the
gradients, so the transient memory stays a fixed fraction of the parameter bytes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Iterator, Sequence

import torch
from torch import Tensor

from ._tensors import flat_view

__all__ = ["Layout", "Block", "Workspace", "layout_for", "row_length"]

#: Row lengths tried, longest first (a longer row: fewer rows to index, more tail entries).
ROW_LENGTHS = (1024, 512, 256, 128, 64)
#: Fraction of the parameter bytes a scratch window may take when no buffer is lent.
WINDOW_SHARE = 0.125


def row_length(sizes: Sequence[int]) -> int:
    """The longest row length whose tails stay under 1/32 of the entries (64 at least)."""
    total = max(1, sum(sizes))
    for b in ROW_LENGTHS:
        if sum(s % b for s in sizes) * 32 <= total:
            return b
    return ROW_LENGTHS[-1]


class Layout:
    """Where each segment's entries sit in the flat buffer, and the index tensors of the
    segment reductions and per-entry parameters (see the module doc). Built by
    :func:`layout_for` (cached per sizes, row length and device)."""

    def __init__(self, sizes: Sequence[int], row: int, device: torch.device):
        self.sizes = tuple(int(s) for s in sizes)
        self.n = len(self.sizes)
        self.row = row
        self.device = device
        self.head_rows = [s // row for s in self.sizes]
        self.tail_sizes = [s - h * row for s, h in zip(self.sizes, self.head_rows)]
        self.rows = sum(self.head_rows)  # R
        self.head_numel = self.rows * row
        self.tail_numel = sum(self.tail_sizes)  # T
        self.numel = self.head_numel + self.tail_numel
        self.row_start = _starts(self.head_rows)
        self.tail_start = _starts(self.tail_sizes)
        i64 = dict(dtype=torch.int64, device=device)
        # Only O(segments) tensors are kept between steps; the per-entry index is rebuilt per
        # step (entry_index: one op), so nothing cached grows with the model's size.
        self._entry_src = (torch.arange(self.n, **i64).repeat(2), torch.tensor(self.head_rows + self.tail_sizes, **i64))
        # Segment sums: one segmented reduction over [row values..., tail values...], whose
        # 2n segments are each tensor's rows, then each tensor's tails (per-segment sums, so a
        # small tensor after a large one keeps its own relative precision).
        self.sum_lengths = torch.tensor(self.head_rows + self.tail_sizes, **i64)
        self.zero64 = torch.zeros(1, dtype=torch.float64, device=device)
        self._consts: dict = {}

    def const(self, key, make):
        """A device tensor derived from the layout alone, built once (e.g. per-entry offsets)."""
        if key not in self._consts:
            self._consts[key] = make()
        return self._consts[key]

    def segment_sums(self, row_values: Sequence[Tensor], tail_values: Sequence[Tensor], square: bool = False) -> Tensor:
        """float64 per-segment sums of per-row partial sums and of tail entries (``square``:
        of their squares). Three or four ops, whatever the number of segments."""
        v = torch.cat([self.zero64[:0], *row_values, *tail_values])  # promoted to float64
        if square:
            v.square_()
        # unsafe: the lengths are right by construction (checking them would read the device)
        return torch.segment_reduce(v, "sum", lengths=self.sum_lengths, unsafe=True).view(2, self.n).sum(0)

    def entry_index(self) -> Tensor:
        """The segment of each row, then of each tail entry: ``(R + T,)`` int64, one op (no
        host sync: the output size is known). ``values[..., entry]`` spreads per-segment values
        to the rows and tail entries."""
        values, repeats = self._entry_src
        return torch.repeat_interleave(values, repeats, output_size=self.rows + self.tail_numel)

    def pieces(self, flats: Sequence[Tensor], rows: tuple[int, int], tails: tuple[int, int]) -> list[Tensor]:
        """Views of the gradients that fill rows ``[r0, r1)`` and tail entries ``[t0, t1)``."""
        out = []
        r0, r1 = rows
        for s, f in enumerate(flats):
            a, b = max(r0, self.row_start[s]), min(r1, self.row_start[s] + self.head_rows[s])
            if a < b:
                base = self.row_start[s]
                out.append(f[(a - base) * self.row : (b - base) * self.row])
        t0, t1 = tails
        for s, f in enumerate(flats):
            a, b = max(t0, self.tail_start[s]), min(t1, self.tail_start[s] + self.tail_sizes[s])
            if a < b:
                head = self.head_rows[s] * self.row
                base = self.tail_start[s]
                out.append(f[head + a - base : head + b - base])
        return out

    def natural_views(self, buffer: Tensor) -> list[Tensor]:
        """Per-segment views of ``buffer`` laid out plainly, segment after segment (scratch use)."""
        starts = _starts(self.sizes)
        return [buffer[a : a + n] for a, n in zip(starts, self.sizes)]

    def segment_views(self, buffer: Tensor) -> list[Tensor]:
        """For each segment, its head view and its tail view into ``buffer`` (heads/tails layout),
        in the order head_0, tail_0, head_1, tail_1, ... (empty views included)."""
        out = []
        H = self.head_numel
        for s in range(self.n):
            a = self.row_start[s] * self.row
            out.append(buffer[a : a + self.head_rows[s] * self.row])
            b = H + self.tail_start[s]
            out.append(buffer[b : b + self.tail_sizes[s]])
        return out


def _starts(counts: Sequence[int]) -> list[int]:
    out, acc = [], 0
    for c in counts:
        out.append(acc)
        acc += c
    return out


@lru_cache(maxsize=32)
def _cached_layout(sizes: tuple[int, ...], row: int, device: torch.device) -> Layout:
    return Layout(sizes, row, device)


def layout_for(sizes: Sequence[int], device: torch.device) -> Layout:
    """The :class:`Layout` of segments of ``sizes`` entries on ``device``, made once per
    distinct set of sizes (the step reuses it, with its constants)."""
    sizes = tuple(int(s) for s in sizes)
    return _cached_layout(sizes, row_length(sizes), torch.device(device))


@dataclass
class Block:
    """One band of the layout held in a buffer at a time: rows ``[r0, r1)`` and tail entries
    ``[t0, t1)``, their values in ``flat`` (rows first), refilled from ``pieces``."""

    rows: tuple[int, int]
    tails: tuple[int, int]
    flat: Tensor
    pieces: list[Tensor] = field(repr=False)
    X: Tensor | None = None  # (r1 - r0, B) view of flat
    T: Tensor | None = None  # tail view of flat

    def fill(self) -> None:
        """Copy the pieces' current values into ``flat``."""
        if len(self.pieces) == 1:
            self.flat.copy_(self.pieces[0])
        else:
            torch.cat(self.pieces, out=self.flat)

    def row_part(self, per_entry: Tensor) -> Tensor:
        """The rows' slice of a ``(..., R + T)`` per-entry tensor, as a column to broadcast."""
        return per_entry[..., self.rows[0] : self.rows[1]].unsqueeze(-1)

    def tail_part(self, per_entry: Tensor, R: int) -> Tensor:
        """The tail entries' slice of a ``(..., R + T)`` per-entry tensor (``R`` rows)."""
        return per_entry[..., R + self.tails[0] : R + self.tails[1]]


class Workspace:
    """The gradients of a pool in the segmented layout, with their |z|-scores on demand.

    ``storage``: a flat buffer of the value dtype with at least ``layout.numel`` elements, free
    for the call (the whole layout lives there: one block). Without it, a scratch of at most
    :data:`WINDOW_SHARE` of the gradient bytes is allocated and the layout is walked in windows.
    """

    def __init__(
        self, layout: Layout, grads: Sequence[Tensor], dtype: torch.dtype, storage: Tensor | None, shards=None
    ):
        self.layout = layout
        self.dtype = dtype
        # shards (zsharp_algos.sharding.Shards): the grads are local shards of larger tensors;
        # per-segment sums, extremes and histograms are completed across the shard group, and
        # counts and ranks are those of the whole tensors
        self.shards = shards
        self.sizes = layout.sizes if shards is None else shards.numels
        self.numel = sum(self.sizes)
        #: entries per process, identical on every rank (histogram budgets must agree)
        self.budget = layout.numel if shards is None else -(-self.numel // shards.size)
        self.flats = [flat_view(g) for g in grads]
        L = layout
        if storage is not None and storage.dtype == dtype and storage.numel() >= L.numel:
            buf = storage[: L.numel]
            self.windowed = False
            self.blocks = [self._block(buf, (0, L.rows), (0, L.tail_numel))]
            self.buffer = buf
        else:
            grad_bytes = sum(f.numel() * f.element_size() for f in self.flats)
            item = torch.empty((), dtype=dtype).element_size()
            rows_per = max(1, int(WINDOW_SHARE * grad_bytes / item) // L.row)
            tails_per = rows_per * L.row
            span = min(max(L.rows, 1) * L.row, tails_per) if L.rows else 0
            span = max(span, min(L.tail_numel, tails_per))
            scratch = torch.empty(max(span, 1), dtype=dtype, device=L.device)
            self.windowed = True
            self.blocks = []
            for r0 in range(0, L.rows, rows_per):
                r1 = min(L.rows, r0 + rows_per)
                self.blocks.append(self._block(scratch[: (r1 - r0) * L.row], (r0, r1), (0, 0)))
            for t0 in range(0, L.tail_numel, tails_per):
                t1 = min(L.tail_numel, t0 + tails_per)
                self.blocks.append(self._block(scratch[: t1 - t0], (0, 0), (t0, t1)))
            self.buffer = None
        self.fresh = False  # whether the single block holds |z| now (unwindowed only)
        self.centered = False  # whether it holds g - mean (statistics' second pass left it so)
        self.coef: Tensor | None = None  # (2, R + T): per entry mean, std + 1e-8
        self.entry = layout.entry_index()

    def _block(self, flat: Tensor, rows: tuple[int, int], tails: tuple[int, int]) -> Block:
        L = self.layout
        nr = rows[1] - rows[0]
        blk = Block(rows, tails, flat, L.pieces(self.flats, rows, tails))
        blk.X = flat[: nr * L.row].view(nr, L.row) if nr else None
        blk.T = flat[nr * L.row :] if tails[1] > tails[0] else None
        return blk

    # ------------------------------------------------------------------ statistics
    def statistics(self) -> tuple[Tensor, Tensor]:
        """Per-segment mean and ``std + 1e-8`` of the gradients (value dtype), two-pass: sums of
        the rows and tails, then sums of squares of the centred values (float64 across rows)."""
        L = self.layout
        rows, tails = [], []
        for blk in self.blocks:
            blk.fill()
            if blk.X is not None:
                rows.append(blk.X.sum(1))
            if blk.T is not None:
                tails.append(blk.T if not self.windowed else blk.T.clone())
        count1, count_m1, eps = _count_consts(self.sizes, L.device, self.dtype)
        mean64 = self._complete(L.segment_sums(rows, tails)) / count1
        mean = mean64.to(self.dtype)
        m_entry = mean[self.entry]
        rows, tails = [], []
        for blk in self.blocks:
            if self.windowed:
                blk.fill()
            if blk.X is not None:
                blk.X.sub_(blk.row_part(m_entry))
                rows.append(torch.linalg.vector_norm(blk.X, dim=1))
            if blk.T is not None:
                blk.T.sub_(blk.tail_part(m_entry, L.rows))
                tails.append(blk.T if not self.windowed else blk.T.clone())
        m2 = self._complete(L.segment_sums(rows, tails, square=True))
        std = (m2 / count_m1).sqrt_().to(self.dtype)
        denom = std.add_(eps)
        self.coef = torch.stack([mean, denom])[:, self.entry]
        self.fresh, self.centered = False, not self.windowed
        return mean, denom

    def _complete(self, per_segment: Tensor) -> Tensor:
        """Per-segment sums over this process's entries -> over the whole tensors."""
        return per_segment if self.shards is None else self.shards.sum_(per_segment.contiguous())

    # ------------------------------------------------------------------ |z|
    def zscores(self, blk: Block) -> None:
        """``blk.flat <- |z|`` of its entries: ``|g - mean| / (std + 1e-8)``, the references'
        own ops given the statistics (refill, subtract, abs, divide: the same ops wherever |z| is
        computed, so every pass sees the same bits)."""
        R = self.layout.rows
        mean, denom = self.coef[0], self.coef[1]
        if not self.centered:
            blk.fill()
            if blk.X is not None:
                blk.X.sub_(blk.row_part(mean))
            if blk.T is not None:
                blk.T.sub_(blk.tail_part(mean, R))
        self.centered = False
        blk.flat.abs_()
        if blk.X is not None:
            blk.X.div_(blk.row_part(denom))
        if blk.T is not None:
            blk.T.div_(blk.tail_part(denom, R))

    def blocks_with_z(self) -> Iterator[Block]:
        """Each block holding |z| (recomputed unless it still does). A consumer that changes a
        block's values must set ``fresh = False``."""
        for blk in self.blocks:
            if self.windowed or not self.fresh:
                self.zscores(blk)
            if not self.windowed:
                self.fresh = True
            yield blk

    def z_buffer(self) -> Tensor:
        """The whole layout's |z| (unwindowed workspaces only), left intact for reading."""
        assert not self.windowed
        for _ in self.blocks_with_z():
            pass
        return self.buffer

    def segment_pieces(self, seg: int) -> list[Tensor]:
        """Views of segment ``seg``'s |z| in the buffer (unwindowed), head then tail."""
        L = self.layout
        a = L.row_start[seg] * L.row
        b = L.head_numel + L.tail_start[seg]
        out = [self.buffer[a : a + L.head_rows[seg] * L.row], self.buffer[b : b + L.tail_sizes[seg]]]
        return [p for p in out if p.numel()]

    def segment_max(self) -> Tensor:
        """Per-segment largest |z| (value dtype)."""
        L = self.layout
        rows, tails = [], []
        for blk in self.blocks_with_z():
            if blk.X is not None:
                rows.append(blk.X.amax(1))
            if blk.T is not None:
                tails.append(blk.T if not self.windowed else blk.T.clone())
        zero = L.const(("zero", self.dtype), lambda: torch.zeros((), dtype=self.dtype, device=L.device))
        if not rows and not tails:  # a process whose shards of the pool are all empty
            largest = zero.expand(L.n).clone()
        else:
            largest = torch.scatter_reduce(zero.expand(L.n), 0, self.entry, torch.cat(rows + tails), "amax")
        return largest if self.shards is None else self.shards.max_(largest)


ZSCORE_EPS = 1e-8  # added to std, as in both reference implementations


@lru_cache(maxsize=64)
def _count_consts(sizes: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """Per segment of these (whole-tensor) sizes: ``max(n, 1)``, ``max(n - 1, 1)`` (float64) and
    the ``eps`` added to std: 1e-8 in the value dtype, as the references, and inf for a segment
    of fewer than 2 entries ((g - mean) / inf = 0 gives it z = 0, as both references)."""
    count = torch.tensor(sizes, dtype=torch.float64, device=device)
    eps = torch.where(count >= 2, ZSCORE_EPS, math.inf).to(dtype)
    return count.clamp(min=1), (count - 1).clamp(min=1), eps


def value_dtype(grads: Sequence[Tensor]) -> torch.dtype:
    """float64 if any gradient is float64, else float32: the dtype of |z| and the statistics."""
    return torch.float64 if any(g.dtype == torch.float64 for g in grads) else torch.float32
