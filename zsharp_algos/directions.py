r"""Ascent directions: the one place where SAM and ZSharp differ.

Every sharpness-aware step perturbs the weights by

.. math::
    e_i = \frac{\rho_i}{\nu_i + \epsilon_i} \, T_i^2 \, d_i, \qquad \nu_i = \lVert T d \rVert_{G(i)}

where :math:`d` is the ascent direction built from the first-pass gradient :math:`g`,
:math:`T_i = |w_i|` for adaptive (ASAM) tensors and :math:`T_i = 1` otherwise, and :math:`G(i)`
is the group of tensors whose norm scales tensor :math:`i` (all tensors passed, or the tensor
alone).

The call contract::

    ascent = direction(params, grads, adaptive=[...], storage=None, stats=False)   # an Ascent

A direction writes :math:`d` into the gradients **in place** (they are not needed afterwards:
the second pass recomputes them) and returns an :class:`Ascent`: the norms :math:`\nu_i`
(float32, or float64 when the gradients are float64, on the gradients' device) and, asked with
``stats=True``, what it knows anyway of :math:`g` and :math:`d` for the logged
:mod:`statistics <zsharp_algos.stats>` (``||g||``, the entries it keeps), so that recording them
costs no pass over the gradients. ``rho`` and ``eps`` are per param group, so they are not the
direction's business: the caller forms :math:`e_i` with multi-tensor kernels, identically for
every direction.

Directions:

* ``"sam"`` (:class:`GradientDirection`): :math:`d = g`, one global norm (Foret et al., 2021).
* ``"zsharp"`` (:class:`ZScoreDirection`): :math:`d = g \odot m` where the mask :math:`m` keeps
  the entries whose layer-wise z-score :math:`z = (g - \bar g) / (\mathrm{std}(g) + 10^{-8})`
  is large (arXiv 2505.02369). Two scopes:

  - ``scope="global"``: one threshold, the ``percentile`` of :math:`|z|` over all tensors
    (linear interpolation, as ``torch.quantile``); keep :math:`|z| \ge` threshold; a tensor that
    would keep nothing keeps its top :math:`\max(1, \lfloor 0.2 n\rfloor)` entries by :math:`|z|`
    (ties at the boundary kept); tensors with fewer than 2 entries have :math:`z = 0`. One
    global norm. This is the bangyen/zsharp reproduction's behaviour.
  - ``scope="tensor"``: only tensors with ``ndim > 1`` are filtered, each by its own
    ``percentile`` of :math:`|z|`, keeping :math:`|z| >` threshold (strict); each filtered tensor
    is normalised by its own norm, so the whole perturbation has norm about
    :math:`\rho\sqrt{\#\text{filtered}}`. Other tensors, and filtered tensors whose filtered
    gradient is all zero, get SAM's scaling of the raw gradient (global raw norm). This is the
    paper's official code (which uses ``percentile=95``).

How ZSharp's filter runs: the gradients are copied into one flat buffer (the optimizer's
work buffer, lent for the call) in the segmented layout of :mod:`zsharp_algos.segments`; per-tensor
means and stds are segment reductions over it, |z| is one multiply-add over the whole buffer, and
the thresholds come from :mod:`zsharp_algos.order_stats` (each radix round one histogram for every
tensor and query), so the number of kernels does not grow with the number of tensors. The CPU
strategy reads small results on the host (a memory load there); the accelerator strategy never
does (:func:`zsharp_algos.order_stats.strategy` runs it on CPU tensors too).

Statistics are in float32 for float32, bfloat16 and float16 gradients, in float64 for float64
ones (norms, mean, std, |z| and the order statistics over their int64 bit patterns).

The exactness contract (tested in ``tests/test_filter_exactness.py``; ``docs/filter.md``). With
``u = 2^-24`` (float64 gradients: ``2^-53``) and ``B <= 1024`` the layout's row length,
``eps = B u`` (at most ``2^-14`` for float32):

* each tensor's mean is within ``eps * mean|g|`` of the exact mean, its std within
  ``eps * (std + mean|g|)`` of the exact std (for ``mean|g| / std`` up to ``1 / eps``);
* so |z| is within ``delta = 2 eps (1 + |z|) (1 + mean|g| / (std + 1e-8))`` of the exact z-score's;
* thresholds are exact order statistics of the |z| computed here, interpolated as
  ``torch.quantile`` does; where the upper neighbour is far above the lower one (an empty
  first-round bin between them), the sync-free strategy uses a value between the two that keeps
  the very same entries;
* so masks equal the reference implementations' (``tests/reference.py``) except for entries whose
  |z| lies within about ``4 delta`` of the threshold (in the global scope, also a whole tensor
  whose largest |z| does: its keep-nothing fallback may be decided the other way).
"""
from __future__ import annotations

import functools
import math
import struct
from typing import NamedTuple, Sequence

import torch
from torch import Tensor

from . import order_stats
from ._tensors import chunk_ranges, flat_view, group_by_device_dtype, total_norm
from .order_stats import (
    BINS_PER_ENTRY,
    Radix,
    bracket_select,
    continue_segments,
    descend_global,
    device_ints,
    digit_plan,
    digit_width,
    key_bits,
    reads_host,
    successors,
)
from .segments import Workspace, layout_for, value_dtype
from .sharding import Shards
from .variants import StateView, Transform
from .stats import nonzero_count, squared_norm

__all__ = ["Ascent", "Direction", "GradientDirection", "ZScoreDirection", "linear_rank"]

FALLBACK_FRACTION = 0.2  # global scope: a tensor that keeps nothing keeps its top 20% by |z|


class Ascent(NamedTuple):
    """What a direction returns (the direction ``d`` itself is in the gradients).

    Attributes:
        norms: ``nu_i``, the norm that divides tensor ``i`` (1-D; a stride-0 view when one norm
            divides them all).
        d_sq: ``||T_i d_i||^2`` of each whole tensor where the norms are per tensor and
            differ from it (the tensor scope), for ``||e||``; None otherwise.
        grad_sq: ``||g||^2`` over the first-pass gradients, whole tensors (0-dim), when asked
            for statistics.
        kept: how many entries ``d`` keeps (0-dim, whole tensors), when asked for statistics;
            None: all of them.
    """

    norms: Tensor
    d_sq: Tensor | None = None
    grad_sq: Tensor | None = None
    kept: Tensor | None = None


class Direction:
    """Builds the ascent direction in place and returns its :class:`Ascent`.

    Args:
        transform: a variant's rewrite of ``g`` before the direction's own work
            (:mod:`zsharp_algos.variants`: FriendlySAM's ``g - sigma m``, GCSAM's centring), or
            None.
    """

    name = "base"
    uses_storage = False  # whether it works in the ``storage`` buffer when one is lent

    def __init__(self, transform: Transform | None = None):
        self.transform = transform

    def __call__(
        self,
        params: Sequence[Tensor],
        grads: Sequence[Tensor],
        *,
        adaptive: Sequence[bool],
        storage: Tensor | None = None,
        shards: Shards | None = None,
        stats: bool = False,
        state: StateView | None = None,
    ) -> Ascent:
        """Write the direction ``d`` into ``grads`` and return the norms ``nu_i`` (and, with
        ``stats``, ``||g||^2`` and the kept count) as an :class:`Ascent`.

        ``adaptive[i]``: whether ``T_i = |w_i|`` (ASAM) for tensor ``i``, else ``T_i = 1``.
        ``storage``: an optional flat float32 buffer with at least as many elements as
        ``grads``, free to overwrite during the call (a direction may keep work there).
        ``shards``: set when ``params`` and ``grads`` are the local shards of FSDP2 DTensors
        (:mod:`zsharp_algos.sharding`): the norms (and any statistic over a tensor) must then be
        those of the whole tensors, completed across ``shards.group``. ``state``: the
        optimizer state of the tensors, for a transform that keeps some."""
        raise NotImplementedError

    def _transform(self, params, grads, state: StateView | None) -> None:
        if self.transform is not None:
            if state is None:
                raise ValueError(f"{type(self.transform).__name__} keeps optimizer state: pass state=")
            self.transform(params, grads, state)


# --------------------------------------------------------------------------- norms
def stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """The precision statistics of a gradient of ``dtype`` are computed in: float64 for float64,
    float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def norm_dtype(grads: Sequence[Tensor]) -> torch.dtype:
    """The dtype of the norms a direction returns: float64 if any gradient is float64."""
    return torch.float64 if any(g.dtype == torch.float64 for g in grads) else torch.float32


def _flags(adaptive: bool | Sequence[bool], n: int) -> list[bool]:
    if isinstance(adaptive, bool):
        return [adaptive] * n
    flags = [bool(a) for a in adaptive]
    if len(flags) != n:
        raise ValueError(f"adaptive has {len(flags)} entries for {n} tensors")
    return flags


def weighted_norms(
    params: Sequence[Tensor], grads: Sequence[Tensor], adaptive: bool | Sequence[bool], scratch: Tensor | None = None
) -> list[Tensor]:
    """Per-tensor norms of ``T_i * g_i`` (``T_i = |w_i|`` where ``adaptive[i]``, else 1), in
    :func:`stat_dtype` of each gradient. ``scratch``: a free flat float32 buffer; with one big
    enough, the ASAM products of float32 tensors are formed there by three multi-tensor kernels
    (else streamed tensor by tensor in bounded pieces)."""
    flags = _flags(adaptive, len(grads))
    norms: list[Tensor] = [None] * len(grads)  # type: ignore[list-item]
    plain = [i for i, a in enumerate(flags) if not a]
    for idx, (gs,) in group_by_device_dtype([grads[i] for i in plain]):
        for i, n in zip(idx, torch._foreach_norm(gs, 2, dtype=stat_dtype(gs[0].dtype))):
            norms[plain[i]] = n
    weighted = [i for i, a in enumerate(flags) if a]
    if (
        weighted
        and scratch is not None
        and scratch.dtype == torch.float32
        and all(grads[i].dtype == params[i].dtype == torch.float32 for i in weighted)
        and sum(grads[i].numel() for i in weighted) <= scratch.numel()
    ):
        views, start = [], 0
        for i in weighted:
            views.append(scratch[start : start + grads[i].numel()])
            start += grads[i].numel()
        torch._foreach_copy_(views, [flat_view(params[i].detach()) for i in weighted])
        torch._foreach_mul_(views, [flat_view(grads[i]) for i in weighted])
        for i, n in zip(weighted, torch._foreach_norm(views)):
            norms[i] = n
        return norms
    if weighted:
        chunk = _norm_chunk(sum(g.numel() for g in grads))
        for i, a in enumerate(flags):
            if a:
                norms[i] = _chunked_norm(flat_view(grads[i]), flat_view(params[i].detach()), chunk)
    return norms


def _norm_chunk(total: int) -> int:
    """Elements per call of the streamed ASAM norm: a 32nd of the total, at least 2^16, so
    its temporaries (a product and its float copy) stay a small fraction of the parameters."""
    return max(1 << 16, -(-total // 32))


def _chunked_norm(g: Tensor, w: Tensor | None, chunk: int) -> Tensor:
    """``||w * g||`` in :func:`stat_dtype`, streamed in chunks so no tensor-sized temporary is made."""
    dtype = stat_dtype(g.dtype)
    if g.numel() <= chunk:
        x = g.to(dtype) if w is None else g.to(dtype) * w.to(dtype)
        return torch.linalg.vector_norm(x)
    sq = torch.zeros((), dtype=dtype, device=g.device)
    for start, n in chunk_ranges(g.numel(), chunk):
        x = g[start : start + n].to(dtype)
        if w is not None:
            x = x * w[start : start + n].to(dtype)
        sq += torch.linalg.vector_norm(x).square()
    return sq.sqrt()


def _global_norms(params, grads, adaptive, scratch: Tensor | None = None, shards: Shards | None = None) -> Tensor:
    """The global norm of ``T g`` over all tensors, one entry per tensor."""
    norms = weighted_norms(params, grads, adaptive, scratch)
    if shards is None:
        norm = total_norm(norms, norm_dtype(grads))
    else:  # the squared norms of the shards, summed over this process's tensors and the group
        norm = shards.sum_(total_norm(norms, norm_dtype(grads)).square()).sqrt()
    return norm.expand(len(grads))  # one norm for all: a stride-0 view, read-only


def _own_norms(params, grads, adaptive, scratch: Tensor | None, shards: Shards | None) -> Tensor:
    """Each tensor's own norm of ``T g`` (1-D)."""
    norms = torch.stack(weighted_norms(params, grads, adaptive, scratch))
    return norms if shards is None else shards.sum_(norms.square()).sqrt()


# --------------------------------------------------------------------------- SAM
class GradientDirection(Direction):
    """SAM: ascend along the gradient (or a variant's transform of it), scaled by its global
    norm."""

    name = "sam"

    def __call__(self, params, grads, *, adaptive, storage=None, shards=None, stats=False, state=None):
        raw_sq = None
        if stats and (self.transform is not None or any(_flags(adaptive, len(grads)))):
            # ||g|| is then not the norm below (ASAM's is ||T d||): one norm of its own
            raw_sq = _global_norms(params, grads, False, shards=shards)[0].square()
        self._transform(params, grads, state)
        norms = _global_norms(params, grads, adaptive, shards=shards)
        if not stats:
            return Ascent(norms)
        return Ascent(norms, grad_sq=norms[0].square() if raw_sq is None else raw_sq)


# --------------------------------------------------------------------------- ZSharp
def linear_rank(q: float, n: int, dtype: torch.dtype = torch.float32) -> tuple[int, int, float]:
    """Indices and weight of ``torch.quantile(x, q)`` (linear interpolation) for ``n`` values of
    ``dtype``.

    ``torch.quantile`` computes the rank ``q * (n - 1)`` in the input's dtype; we do the same (so
    results match it bit for bit): for float32 while that is exact for the integer ``n - 1``
    (below 2^24, which is also where ``torch.quantile`` stops), and in float64 beyond.
    """
    if dtype == torch.float64:
        pos = q * (n - 1)
    else:
        q32 = _to_float32(q)
        # The float64 product of two float32 values is exact, so rounding it to float32 gives
        # float32 multiplication's result; n - 1 is exact in float32 below 2^24.
        pos = _to_float32(q32 * (n - 1)) if n - 1 < 2**24 else q32 * (n - 1)
    lo = math.floor(pos)
    return lo, min(math.ceil(pos), n - 1), pos - lo


def _to_float32(x: float) -> float:
    return struct.unpack("f", struct.pack("f", x))[0]


def _interpolate(lo_val: Tensor, hi_val: Tensor, weight) -> Tensor:
    # torch.quantile's linear interpolation is lerp(below, above, weight) in the values' dtype
    return lo_val if isinstance(weight, float) and weight == 0.0 else torch.lerp(lo_val, hi_val, weight)


def _from_bits(bits: Tensor, dtype: torch.dtype) -> Tensor:
    return bits.view(dtype)  # bit patterns are kept in the key dtype


class ZScoreDirection(Direction):
    """ZSharp: keep the gradient entries with significant layer-wise z-scores (see module doc)."""

    name = "zsharp"

    SCOPES = ("global", "tensor")
    uses_storage = True  # |z| is kept there

    def __init__(self, percentile: float = 70.0, scope: str = "global", transform: Transform | None = None):
        super().__init__(transform)
        if isinstance(percentile, bool) or not isinstance(percentile, (int, float)) or not 0 < percentile < 100:
            raise ValueError(f"percentile must be a number in (0, 100), got {percentile!r}")
        if scope not in self.SCOPES:
            raise ValueError(f"scope must be one of {self.SCOPES}, got {scope!r}")
        self.percentile = float(percentile)
        self.scope = scope

    def __call__(self, params, grads, *, adaptive, storage=None, shards=None, stats=False, state=None):
        devices = {g.device for g in grads}
        if len(devices) > 1:
            raise ValueError(
                f"ZSharp computes z-score thresholds over tensors on one device, got {sorted(map(str, devices))}"
            )
        flags = _flags(adaptive, len(grads))
        numels = [g.numel() for g in grads] if shards is None else shards.numels
        grad_sq = _whole_sum(squared_norm(grads), shards) if stats else None
        self._transform(params, grads, state)
        if self.scope == "global":
            norms = self._global(params, grads, flags, storage, shards, numels)
        else:
            norms = self._per_tensor(params, grads, flags, storage, shards, numels)
        if not stats:
            return Ascent(norms)
        kept = _whole_sum(nonzero_count(grads), shards)
        d_sq = None
        if self.scope == "tensor":
            d_sq = torch.stack(weighted_norms(params, grads, False)).to(norms.dtype).square()
            d_sq = d_sq if shards is None else shards.sum_(d_sq)
        return Ascent(norms, d_sq, grad_sq, kept)

    # -- scope="global": the bangyen/zsharp reproduction's behaviour
    def _global(self, params, grads, flags, storage, shards, numels):
        live = [i for i, n in enumerate(numels) if n]
        if live:
            ws = _workspace([grads[i] for i in live], storage, shards, [numels[i] for i in live])
            thresholds = self._global_thresholds(ws)
            _apply_masks(ws, thresholds, torch.Tensor.ge_)
        return _global_norms(params, grads, flags, storage, shards)  # the buffer is free again

    def _global_thresholds(self, ws: Workspace) -> Tensor:
        """Per segment: the global percentile of |z|, or the segment's own top-20% boundary where
        its largest |z| is under the global one (it would keep nothing)."""
        L, dtype, device = ws.layout, ws.dtype, ws.layout.device
        lo, hi, weight = linear_rank(self.percentile / 100.0, ws.numel, dtype)
        # Rank of each tensor's top-20% boundary: its k-th largest value, k = max(1, floor(0.2 n)).
        fallback_ranks = tuple(n - max(1, int(FALLBACK_FRACTION * n)) for n in ws.sizes)
        if reads_host(device) and not ws.windowed and ws.shards is None:
            # Small results can be read for free: the threshold first, then the fallback ranks
            # of only the tensors that need one (usually none).
            values = bracket_select([ws.z_buffer()], [lo, hi])
            if values is None:
                values = order_stats.select([ws.z_buffer()], [(0, lo), (0, hi)])
            threshold = _interpolate(values[0], values[1], weight)
            largest = ws.segment_max()
            short = (~(largest >= threshold)).nonzero()[:, 0].tolist()
            per_segment = threshold.expand(L.n).clone()
            if short:
                per_segment[short] = torch.stack([self._one_rank(ws, s, fallback_ranks[s]) for s in short])
            return per_segment
        largest = ws.segment_max()
        threshold, fallback = self._radix_global(ws, lo, hi, weight, fallback_ranks)
        # A tensor whose largest |z| is under the global threshold would keep nothing: fallback.
        return torch.where(largest >= threshold, threshold, fallback)

    @staticmethod
    def _radix_global(ws: Workspace, lo: int, hi: int, weight: float, fallback_ranks) -> tuple[Tensor, Tensor]:
        """Fixed-shape selection: the interpolated global threshold and every fallback value."""
        L, dtype, device = ws.layout, ws.dtype, ws.layout.device
        _, nbits = key_bits(dtype)
        b1 = digit_width(L.n, ws.budget)
        W = 1 << (nbits - b1)
        radix = Radix(ws)
        frank = device_ints(fallback_ranks, device, torch.int32)[:, None]
        granks = device_ints((lo, hi), device, torch.int32)
        seg_p, glob_p = radix.first_round(b1, frank, granks)
        # One more round finishes the global ranks if two first-round bins' worth of bins fit
        # the budget: it counts lo's bin and the next one, so hi is found there unless a whole
        # empty bin lies between them, and then the gap (>= W ulps) puts the interpolated
        # threshold strictly above lo wherever the weight is >= 1/W: any value in (lo, hi]
        # selects the same entries, and lo's successor is one.
        if dtype == torch.float32 and 2 * W + 2 <= BINS_PER_ENTRY * ws.budget and (hi == lo or weight >= 1 / W):
            pos, _ = radix.global_round(glob_p[0], granks, nbits - b1, 0, blocks=2)
            found = torch.add(pos, glob_p[0], alpha=W)
            lo_val = _from_bits(found[0], dtype)
            if hi == lo:
                threshold = lo_val
            else:
                inside = pos[1] < 2 * W
                interpolated = torch.lerp(lo_val, _from_bits(found[1], dtype), weight)
                threshold = torch.where(inside, interpolated, _from_bits(found[0] + 1, dtype))
        else:  # narrower rounds, then hi as lo's repeat or successor
            rank = granks[:1]
            lo_bits, le = descend_global(radix, rank, glob_p[0], digit_plan(nbits - b1, 1, ws.budget), nbits - b1)
            lo_val = _from_bits(lo_bits, dtype)
            if hi == lo:
                threshold = lo_val
            else:
                hi_bits = torch.where(le > hi, lo_bits, successors(ws, lo_bits, per_segment=False))
                threshold = _interpolate(lo_val, _from_bits(hi_bits, dtype), weight)
        fallback = continue_segments(radix, seg_p[:, 0], frank, digit_plan(nbits - b1, L.n, ws.budget), nbits - b1)
        return threshold, _from_bits(fallback, dtype)

    @staticmethod
    def _one_rank(ws: Workspace, seg: int, rank: int) -> Tensor:
        found = bracket_select(ws.segment_pieces(seg), [rank])
        if found is not None:
            return found[0]
        return order_stats.select(ws.segment_pieces(seg), [(0, rank)])[0]

    # -- scope="tensor": the paper's official behaviour
    def _per_tensor(self, params, grads, flags, storage, shards, numels):
        norms = _global_norms(params, grads, flags, storage, shards)  # the raw norm: tensors not filtered
        segs = [s for s, g in enumerate(grads) if g.dim() > 1 and numels[s]]
        if not segs:
            return norms
        ws = _workspace([grads[s] for s in segs], storage, shards, [numels[s] for s in segs])
        thresholds = self._tensor_thresholds(ws)
        kept = _apply_masks(ws, thresholds, torch.Tensor.gt_, keep_if_empty=True)
        pick = lambda xs: [xs[s] for s in segs]  # noqa: E731
        own = _own_norms(pick(params), pick(grads), pick(flags), storage, shards).to(norms.dtype)
        index = device_ints(tuple(segs), norms.device)
        # filtered gradient all zero: the raw gradient (kept as is by _apply_masks), raw norm
        return norms.index_put((index,), torch.where(kept == 0, norms[0], own))

    def _tensor_thresholds(self, ws: Workspace) -> Tensor:
        L, dtype, device = ws.layout, ws.dtype, ws.layout.device
        ranks = [linear_rank(self.percentile / 100.0, n, dtype) for n in ws.sizes]
        if reads_host(device) and not ws.windowed and ws.shards is None:
            ws.z_buffer()
            out = []
            for s, (lo, hi, w) in enumerate(ranks):
                pair = bracket_select(ws.segment_pieces(s), [lo, hi])
                if pair is None:
                    pair = order_stats.select(ws.segment_pieces(s), [(0, lo), (0, hi)])
                out.append(_interpolate(pair[0], pair[1], w))
            return torch.stack(out)
        _, nbits = key_bits(dtype)
        plan = digit_plan(nbits, L.n, ws.budget, wide_last=True)
        W = 1 << plan[-1]
        radix = Radix(ws)
        lo_rank = device_ints(tuple(r[0] for r in ranks), device, torch.int32)[:, None]
        both = device_ints(tuple(v for r in ranks for v in r[:2]), device, torch.int32).view(L.n, 2)
        prefix = radix.first_round(plan[0], lo_rank, None)[0][:, 0]
        prefix = continue_segments(radix, prefix, lo_rank, plan[1:-1], nbits - plan[0])
        # The last round counts the block after lo's too: hi is there, or so far above that the
        # interpolated threshold stays below it wherever the weight is <= 1 - 2/W, and then
        # |z| > threshold selects the same entries as |z| > lo.
        wide = all(hi == lo or w <= 1 - 2 / W for lo, hi, w in ranks)
        pos, cum = radix.segment_round(prefix, both, plan[-1], 0, blocks=2 if wide else 1)
        found = torch.add(pos, prefix[:, None], alpha=W)
        lo_val = _from_bits(found[:, 0], dtype)
        if all(hi == lo for lo, hi, _ in ranks):
            return lo_val
        weights = _weights(tuple(r[2] for r in ranks), dtype, device)
        if wide:
            interpolated = torch.lerp(lo_val, _from_bits(found[:, 1], dtype), weights)
            return torch.where(pos[:, 1] < 2 * W, interpolated, lo_val)
        le = cum.gather(1, pos[:, :1].long())[:, 0]
        hi_bits = torch.where(le > both[:, 1], found[:, 0], successors(ws, found[:, 0], per_segment=True))
        return torch.lerp(lo_val, _from_bits(hi_bits, dtype), weights)


def _whole_sum(local_sum: Tensor, shards: Shards | None) -> Tensor:
    return local_sum if shards is None else shards.sum_(local_sum.reshape(1))[0]


@functools.lru_cache(maxsize=64)
def _weights(values: tuple[float, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    return torch.tensor(values, dtype=dtype, device=device)


def _workspace(
    grads: Sequence[Tensor], storage: Tensor | None, shards: Shards | None = None, numels: Sequence[int] = ()
) -> Workspace:
    dtype = value_dtype(grads)
    layout = layout_for([g.numel() for g in grads], grads[0].device)
    ws = Workspace(layout, grads, dtype, storage, None if shards is None else shards.sub(numels))
    ws.statistics()
    return ws


def _apply_masks(ws: Workspace, thresholds: Tensor, keep, keep_if_empty: bool = False) -> Tensor | None:
    """``g <- g * m`` in place, ``m = keep(|z|, threshold of its tensor)`` (``Tensor.ge_`` or
    ``Tensor.gt_``), written as 0/1 floats over |z| (not read again) so the multiply is a float
    one. ``keep_if_empty``: a tensor whose ``g * m`` is all zero keeps its raw gradient; returns
    each tensor's ``||g * m||^2`` (compared with 0 only: its rounding depends on the windows)."""
    L = ws.layout
    t_entry = thresholds[ws.entry]
    kept = None
    passes = ("norm", "apply") if keep_if_empty and ws.windowed else ("apply",)
    if keep_if_empty and not ws.blocks:  # this process holds none of the pool's entries
        return _whole(ws, None)
    for stage in passes:
        if stage == "apply" and ws.windowed and kept is not None:
            kept = _whole(ws, kept)  # every window counted: complete across the shards
        for blk in ws.blocks_with_z():
            if blk.X is not None:
                keep(blk.X, blk.row_part(t_entry))
            if blk.T is not None:
                keep(blk.T, blk.tail_part(t_entry, L.rows))
            ws.fresh = False
            masks = list(blk.flat.split([p.numel() for p in blk.pieces]))
            if keep_if_empty:
                if stage == "norm" or not ws.windowed:
                    torch._foreach_mul_(masks, blk.pieces)  # g * m, to tell empty filters
                    part = _piece_norms_squared(ws, blk, masks)
                    kept = part if kept is None else kept + part
                    if not ws.windowed:
                        kept = _whole(ws, kept)
                if stage == "norm":
                    continue
                if not ws.windowed:
                    keep_all = (kept == 0).to(ws.dtype)
                    blk.flat.ne_(0)  # m where g != 0 (where g == 0, d is 0 either way)
                else:
                    keep_all = (kept == 0).to(ws.dtype)
                k_entry = keep_all[ws.entry]
                if blk.X is not None:
                    blk.X.clamp_(min=blk.row_part(k_entry))
                if blk.T is not None:
                    blk.T.clamp_(min=blk.tail_part(k_entry, L.rows))
            torch._foreach_mul_(blk.pieces, masks)
    return kept


def _whole(ws: Workspace, kept: Tensor | None) -> Tensor:
    """Per-segment sums of squares over this process's entries -> over the whole tensors."""
    if kept is None:
        kept = torch.zeros(ws.layout.n, dtype=torch.float64, device=ws.layout.device)
    return kept if ws.shards is None else ws.shards.sum_(kept.contiguous())


def _piece_norms_squared(ws: Workspace, blk, pieces: list[Tensor]) -> Tensor:
    """Per-segment sum of squares of a block's pieces (each piece lies in one segment)."""
    L = ws.layout
    if not pieces:  # a block of empty shards
        return torch.zeros(L.n, dtype=torch.float64, device=L.device)
    owners = L.const(("owners", blk.rows, blk.tails), lambda: torch.tensor(
        _piece_owners(L, blk.rows, blk.tails), dtype=torch.int64, device=L.device))
    sq = torch.stack(torch._foreach_norm(pieces)).to(torch.float64).square_()
    zero = L.const("zero64n", lambda: torch.zeros((), dtype=torch.float64, device=L.device))
    return torch.index_add(zero.expand(L.n), 0, owners, sq)


def _piece_owners(L, rows, tails) -> list[int]:
    out = []
    r0, r1 = rows
    for s in range(L.n):
        if max(r0, L.row_start[s]) < min(r1, L.row_start[s] + L.head_rows[s]):
            out.append(s)
    t0, t1 = tails
    for s in range(L.n):
        if max(t0, L.tail_start[s]) < min(t1, L.tail_start[s] + L.tail_sizes[s]):
            out.append(s)
    return out
