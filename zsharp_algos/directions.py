r"""Ascent directions: the one place where SAM and ZSharp differ.

Every sharpness-aware step perturbs the weights by

.. math::
    e_i = \frac{\rho_i}{\nu_i + \epsilon_i} \, T_i^2 \, d_i, \qquad \nu_i = \lVert T d \rVert_{G(i)}

where :math:`d` is the ascent direction built from the first-pass gradient :math:`g`,
:math:`T_i = |w_i|` for adaptive (ASAM) tensors and :math:`T_i = 1` otherwise, and :math:`G(i)`
is the group of tensors whose norm scales tensor :math:`i` (all tensors passed, or the tensor
alone).

The call contract::

    norms = direction(params, grads, adaptive=[...], storage=None)   # 1-D, one entry per tensor

A direction writes :math:`d` into the gradients **in place** (they are not needed afterwards:
the second pass recomputes them) and returns the norms :math:`\nu_i` (float32, or float64 when
the gradients are float64, on the gradients' device). ``rho`` and ``eps`` are per param group,
so they are not the direction's business: the caller forms :math:`e_i` with multi-tensor
kernels, identically for every direction.

Directions:

* ``"sam"`` (:class:`GradientDirection`): :math:`d = g`, one global norm (Foret et al., 2021).
* ``"zsharp"`` (:class:`ZScoreDirection`): :math:`d = g \odot m` where the mask :math:`m` keeps
  the entries whose layer-wise z-score :math:`z = (g - \bar g) / (\mathrm{std}(g) + 10^{-8})`
  is large (arXiv 2505.02369). Two scopes:

  - ``scope="global"``: one threshold, the ``percentile`` of :math:`|z|` over all tensors
    (linear interpolation, as ``torch.quantile``); keep :math:`|z| \ge` threshold; a tensor that
    would keep nothing keeps its top :math:`\max(1, \lfloor 0.2 n\rfloor)` entries by :math:`|z|`
    (ties at the boundary kept); tensors with fewer than 2 entries have :math:`z = 0`. One
    global norm. This is the seed README implementation's behaviour.
  - ``scope="tensor"``: only tensors with ``ndim > 1`` are filtered, each by its own
    ``percentile`` of :math:`|z|`, keeping :math:`|z| >` threshold (strict); each filtered tensor
    is normalised by its own norm, so the whole perturbation has norm about
    :math:`\rho\sqrt{\#\text{filtered}}`. Other tensors, and filtered tensors whose filtered
    gradient is all zero, get SAM's scaling of the raw gradient (global raw norm). This is the
    paper's official code (which uses ``percentile=95``).

Statistics are computed in float32 for float32, bfloat16 and float16 gradients, and norms, mean
and std in float64 for float64 gradients; thresholds are exact order statistics
(:mod:`zsharp_algos.order_stats`), with no element cap and no host sync.
"""
from __future__ import annotations

import math
import struct
from typing import Callable, Iterator, Sequence

import torch
from torch import Tensor

from . import order_stats
from ._tensors import chunk_ranges, flat_view, group_by_device_dtype, total_norm

__all__ = ["Direction", "GradientDirection", "ZScoreDirection", "DIRECTIONS", "register_direction"]

ZSCORE_EPS = 1e-8  # added to std, as in both reference implementations
FALLBACK_FRACTION = 0.2  # global scope: a tensor that keeps nothing keeps its top 20% by |z|


class Direction:
    """Builds the ascent direction in place and returns the per-tensor norms that divide it."""

    name = "base"
    uses_storage = False  # whether it works in the ``storage`` buffer when one is lent

    def __call__(
        self,
        params: Sequence[Tensor],
        grads: Sequence[Tensor],
        *,
        adaptive: Sequence[bool],
        storage: Tensor | None = None,
    ) -> Tensor:
        """Write the direction ``d`` into ``grads`` and return the 1-D tensor of norms ``nu_i``.

        ``adaptive[i]``: whether ``T_i = |w_i|`` (ASAM) for tensor ``i``, else ``T_i = 1``.
        ``storage``: an optional flat float32 buffer with at least as many elements as
        ``grads``, free to overwrite during the call (a direction may keep work there)."""
        raise NotImplementedError


DIRECTIONS: dict[str, Callable[..., Direction]] = {}


def register_direction(name: str):
    """Class decorator adding a direction to :data:`DIRECTIONS` (the optimizer factory's registry)."""

    def deco(cls):
        cls.name = name
        DIRECTIONS[name] = cls
        return cls

    return deco


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


def weighted_norms(params: Sequence[Tensor], grads: Sequence[Tensor], adaptive: bool | Sequence[bool]) -> list[Tensor]:
    """Per-tensor norms of ``T_i * g_i`` (``T_i = |w_i|`` where ``adaptive[i]``, else 1), in
    :func:`stat_dtype` of each gradient."""
    flags = _flags(adaptive, len(grads))
    norms: list[Tensor] = [None] * len(grads)  # type: ignore[list-item]
    plain = [i for i, a in enumerate(flags) if not a]
    for idx, (gs,) in group_by_device_dtype([grads[i] for i in plain]):
        for i, n in zip(idx, torch._foreach_norm(gs, 2, dtype=stat_dtype(gs[0].dtype))):
            norms[plain[i]] = n
    if len(plain) < len(grads):
        chunk = order_stats.chunk_size_for(grads[0].device, sum(g.numel() for g in grads))
        for i, a in enumerate(flags):
            if a:
                norms[i] = _chunked_norm(flat_view(grads[i]), flat_view(params[i].detach()), chunk)
    return norms


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


def _global_norms(params, grads, adaptive) -> Tensor:
    """The global norm of ``T g`` over all tensors, one entry per tensor."""
    norm = total_norm(weighted_norms(params, grads, adaptive), norm_dtype(grads))
    return norm.repeat(len(grads))


# --------------------------------------------------------------------------- SAM
@register_direction("sam")
class GradientDirection(Direction):
    """SAM: ascend along the gradient itself, scaled by its global norm."""

    def __call__(self, params, grads, *, adaptive, storage=None):
        return _global_norms(params, grads, adaptive)


# --------------------------------------------------------------------------- ZSharp
def _moments(flat: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """float32 ``mean``, ``std``, ``min`` and ``max`` of a flat tensor (one float32 copy at a time
    for other dtypes, freed on return)."""
    # float64 gradients: float32 statistics for now (their float64 path is the segmented filter's)
    x = flat if flat.dtype == torch.float32 else flat.float()
    return (x.mean(), x.std(), *torch.aminmax(x))


class _ZScores:
    """Per-tensor z-score statistics of the gradients, and their |z| streamed in chunks.

    ``|z| = |(g - mean) / (std + 1e-8)|`` in float32, with the same operations as the
    reference (so thresholds and masks match it bit for bit). With ``storage`` (a flat float32
    buffer of at least as many elements as the gradients: the optimizer lends its persistent
    flat buffer, free during the direction's call) |z| is computed once and read back as views.
    Without it (non-float32 weights), each read recomputes |z| chunk by chunk into a small
    scratch, so no model-sized temporary is ever made.
    """

    def __init__(self, grads: Sequence[Tensor], storage: Tensor | None = None):
        self.flats = [flat_view(g) for g in grads]
        self.sizes = [f.numel() for f in self.flats]
        self.device = self.flats[0].device
        total = sum(self.sizes)
        self.chunk = order_stats.chunk_size_for(self.device, total)
        self.scan = order_stats.scan_step(self.device, total)  # piece length when selection reads stored |z|
        # Per-tensor mean, std and extremes with the reference's reductions (bit for bit); the
        # scalar arithmetic on them runs once over the stacked values, not once per tensor.
        # A tensor of fewer than 2 entries (std undefined) has z = 0: it stands in as zeros.
        zero = torch.zeros((), dtype=torch.float32, device=self.device)
        valid = [n >= 2 for n in self.sizes]
        stats = [_moments(f) if ok else (zero,) * 4 for f, ok in zip(self.flats, valid)]
        mean, std, lo, hi = (torch.stack(column) for column in zip(*stats))
        denom = std.add_(ZSCORE_EPS)
        # |z| is monotone in g on either side of the mean and every op is correctly rounded,
        # so the largest |z| is reached at min(g) or max(g): exact, without a pass over |z|.
        self.max_abs = torch.maximum(((hi - mean) / denom).abs(), ((lo - mean) / denom).abs())
        self.mean = [m if ok else None for (m, *_), ok in zip(stats, valid)]
        self.denom = [d if ok else None for d, ok in zip(denom.unbind(), valid)]
        self.offsets = [0]
        for n in self.sizes[:-1]:
            self.offsets.append(self.offsets[-1] + n)
        self.joined = storage[:total] if storage is not None else None  # |z|, tensor after tensor
        if self.joined is not None:
            for seg, n in enumerate(self.sizes):
                self._compute(seg, 0, n, self._stored(seg, 0, n))
        else:
            self._scratch = torch.empty(min(self.chunk, max(self.sizes)), dtype=torch.float32, device=self.device)

    def _stored(self, seg: int, start: int, n: int) -> Tensor:
        return self.joined[self.offsets[seg] + start : self.offsets[seg] + start + n]

    def _compute(self, seg: int, start: int, n: int, out: Tensor) -> None:
        if self.mean[seg] is None:
            out.zero_()
            return
        g = self.flats[seg][start : start + n]
        if g.dtype == torch.float32:
            torch.sub(g, self.mean[seg], out=out)
        else:
            out.copy_(g).sub_(self.mean[seg])
        out.div_(self.denom[seg]).abs_()

    def chunks(self, seg: int, max_len: int | None = None) -> Iterator[tuple[int, Tensor]]:
        """``(start, |z|[start:start+n])`` for the chunks of tensor ``seg``: stored |z| comes as
        views of at most ``max_len`` elements (default: the whole tensor, fewest kernel calls),
        recomputed |z| in scratch-sized chunks. A consumer may overwrite a chunk once done with
        it only if nothing reads |z| of that tensor again."""
        if self.joined is not None:
            for start, n in chunk_ranges(self.sizes[seg], max_len or self.sizes[seg]):
                yield start, self._stored(seg, start, n)
            return
        for start, n in chunk_ranges(self.sizes[seg], self.chunk):
            self._compute(seg, start, n, self._scratch[:n])
            yield start, self._scratch[:n]

    def values(self, seg: int) -> Iterator[Tensor]:
        """The chunks of tensor ``seg`` without their offsets (:data:`order_stats.ChunksFn`), in
        pieces of at most :func:`order_stats.scan_step` so selection's temporaries stay bounded
        on a single huge tensor too."""
        return (v for _, v in self.chunks(seg, max_len=self.scan))

    def select(self, queries: Sequence[tuple[int, int]]) -> Tensor:
        """Exact order statistics of |z| (see :func:`order_stats.select`)."""
        return order_stats.select(self.sizes, self.values, queries, self.device, self.joined)


def linear_rank(q: float, n: int) -> tuple[int, int, float]:
    """Indices and weight of ``torch.quantile(x, q)`` (linear interpolation) for ``n`` values.

    ``torch.quantile`` computes the rank ``q * (n - 1)`` in float32; we do the same (so results
    match it bit for bit) while that is exact for the integer ``n - 1`` (below 2^24, which is
    also where ``torch.quantile`` stops), and in float64 beyond.
    """
    q32 = _to_float32(q)
    # The float64 product of two float32 values is exact, so rounding it to float32 gives
    # float32 multiplication's result; n - 1 is exact in float32 below 2^24.
    pos = _to_float32(q32 * (n - 1)) if n - 1 < 2**24 else q32 * (n - 1)
    lo = math.floor(pos)
    return lo, min(math.ceil(pos), n - 1), pos - lo


def _to_float32(x: float) -> float:
    return struct.unpack("f", struct.pack("f", x))[0]


def _interpolate(lo_val: Tensor, hi_val: Tensor, weight: float) -> Tensor:
    # torch.quantile's linear interpolation is lerp(below, above, weight) in float32
    return lo_val if weight == 0.0 else torch.lerp(lo_val, hi_val, weight)


@register_direction("zsharp")
class ZScoreDirection(Direction):
    """ZSharp: keep the gradient entries with significant layer-wise z-scores (see module doc)."""

    SCOPES = ("global", "tensor")
    uses_storage = True  # |z| is kept there

    def __init__(self, percentile: float = 70.0, scope: str = "global"):
        if isinstance(percentile, bool) or not isinstance(percentile, (int, float)) or not 0 < percentile < 100:
            raise ValueError(f"percentile must be a number in (0, 100), got {percentile!r}")
        if scope not in self.SCOPES:
            raise ValueError(f"scope must be one of {self.SCOPES}, got {scope!r}")
        self.percentile = float(percentile)
        self.scope = scope

    def __call__(self, params, grads, *, adaptive, storage=None):
        devices = {g.device for g in grads}
        if len(devices) > 1:
            raise ValueError(
                f"ZSharp computes z-score thresholds over tensors on one device, got {sorted(map(str, devices))}"
            )
        z = _ZScores(grads, storage)
        if self.scope == "global":
            return self._global(params, grads, z, adaptive)
        return self._per_tensor(params, grads, z, adaptive)

    # -- scope="global": seed README behaviour
    def _global(self, params, grads, z, adaptive):
        lo, hi, weight = linear_rank(self.percentile / 100.0, sum(z.sizes))
        queries = [(order_stats.GLOBAL, lo), (order_stats.GLOBAL, hi)]
        # Rank of each tensor's top-20% boundary: its k-th largest value, k = max(1, floor(0.2 n)).
        fallback_queries = [(s, n - max(1, int(FALLBACK_FRACTION * n))) for s, n in enumerate(z.sizes)]
        max_abs = z.max_abs
        if order_stats.reads_host(z.device):
            # Where small results can be read for free, find the threshold first and then the
            # fallback ranks of only the tensors that need one (usually none).
            values = z.select(queries)
            threshold = _interpolate(values[0], values[1], weight)
            short = (~(max_abs >= threshold)).nonzero()[:, 0].tolist()
            fallback = threshold.expand(len(z.sizes)).clone()
            if short:
                fallback[short] = z.select([fallback_queries[s] for s in short])
        else:  # one fixed-shape pass for every query: nothing waits for the device
            values = z.select(queries + fallback_queries)
            threshold = _interpolate(values[0], values[1], weight)
            fallback = values[2:]
        # A tensor whose largest |z| is under the global threshold would keep nothing: fallback.
        per_tensor = torch.where(max_abs >= threshold, threshold, fallback)
        segs = list(range(len(grads)))
        _apply_masks(z, segs, per_tensor, Tensor.ge_)
        return _global_norms(params, grads, adaptive)

    # -- scope="tensor": the paper's official behaviour
    def _per_tensor(self, params, grads, z, adaptive):
        flags = _flags(adaptive, len(grads))
        norms = _global_norms(params, grads, flags)  # the raw norm: tensors not filtered
        segs = [s for s, g in enumerate(grads) if g.dim() > 1]
        if not segs:
            return norms
        queries, weights = [], []
        for s in segs:
            lo, hi, weight = linear_rank(self.percentile / 100.0, z.sizes[s])
            queries += [(s, lo), (s, hi)]
            weights.append(weight)
        values = z.select(queries)
        thresholds = torch.stack([_interpolate(values[2 * j], values[2 * j + 1], w) for j, w in enumerate(weights)])
        # Is anything left after filtering? Needs the whole tensor before it is masked in place.
        keep_all = _kept_square_norms(z, segs, thresholds) == 0  # all filtered out: raw gradient
        _apply_masks(z, segs, thresholds, Tensor.gt_, keep_all.float())
        own_norms = weighted_norms([params[s] for s in segs], [grads[s] for s in segs], [flags[s] for s in segs])
        own = torch.stack([n.to(norms.dtype) for n in own_norms])
        norms[order_stats._device_ints(tuple(segs), norms.device)] = torch.where(keep_all, norms[0], own)
        return norms


def _apply_masks(z: _ZScores, segs, thresholds: Tensor, keep, keep_all: Tensor | None = None) -> None:
    """``g <- g * m`` in place for each tensor in ``segs``, with ``m = keep(|z|, threshold)``
    (or all ones where ``keep_all``). The 0/1 mask is written over |z| (not read again) so the
    multiply is a float one, several times faster than by a bool mask on CPUs."""
    for j, s in enumerate(segs):
        g = z.flats[s]
        for start, absz in z.chunks(s):
            mask = keep(absz, thresholds[j])
            if keep_all is not None:
                mask.clamp_(min=keep_all[j])
            g[start : start + absz.numel()].mul_(mask)


def _kept_square_norms(z: _ZScores, segs, thresholds: Tensor) -> Tensor:
    """``||g * (|z| > threshold)||^2`` for each tensor in ``segs``, leaving |z| intact."""
    out = torch.zeros(len(segs), dtype=torch.float32, device=z.device)
    scratch = torch.empty(min(z.chunk, max(z.sizes[s] for s in segs)), dtype=torch.float32, device=z.device)
    for j, s in enumerate(segs):
        g = z.flats[s]
        for start, absz in z.chunks(s, max_len=z.chunk):
            kept = torch.gt(absz, thresholds[j], out=scratch[: absz.numel()])
            kept.mul_(g[start : start + absz.numel()])
            out[j] += torch.linalg.vector_norm(kept).square()
    return out
