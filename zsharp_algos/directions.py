r"""Ascent directions: the one place where SAM and ZSharp differ.

Every sharpness-aware step perturbs the weights by

.. math::
    e_i = c_i \, T_i^2 \, d_i, \qquad c_i = \frac{\rho}{\lVert T d \rVert_{G(i)} + \epsilon}

where :math:`d` is the ascent direction built from the first-pass gradient :math:`g`,
:math:`T = |w|` for adaptive (ASAM) steps and :math:`T = 1` otherwise, and :math:`G(i)` is the
group of tensors whose norm scales tensor :math:`i` (the whole model, or the tensor alone).

A direction writes :math:`d` into the gradients **in place** (they are not needed afterwards:
the second pass recomputes them) and returns the coefficients :math:`c_i`. The optimizer
(:mod:`zsharp_algos.optimizer`) applies :math:`T^2`, the coefficients and the perturbation with
multi-tensor kernels, identically for every direction.

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

All statistics are computed in float32 whatever the gradient dtype; thresholds are exact order
statistics (:mod:`zsharp_algos.order_stats`), with no element cap and no host sync.
"""
from __future__ import annotations

import math
import struct
from typing import Callable, Sequence

import torch
from torch import Tensor

from . import order_stats
from ._tensors import chunk_ranges, flat_view, group_by_device_dtype, total_norm

__all__ = ["Direction", "GradientDirection", "ZScoreDirection", "DIRECTIONS", "register_direction"]

ZSCORE_EPS = 1e-8  # added to std, as in both reference implementations
FALLBACK_FRACTION = 0.2  # global scope: a tensor that keeps nothing keeps its top 20% by |z|


class Direction:
    """Builds the ascent direction in place and returns the per-tensor coefficients."""

    name = "base"

    def __call__(
        self, params: Sequence[Tensor], grads: Sequence[Tensor], *, rho: float, eps: float, adaptive: bool
    ) -> list[Tensor]:
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
def weighted_norms(params: Sequence[Tensor], grads: Sequence[Tensor], adaptive: bool) -> list[Tensor]:
    """Per-tensor float32 norms of ``T * g`` (``T = |w|`` if adaptive, else 1)."""
    norms: list[Tensor] = [None] * len(grads)  # type: ignore[list-item]
    if not adaptive:
        for idx, (gs,) in group_by_device_dtype(grads):
            for i, n in zip(idx, torch._foreach_norm(gs, 2, dtype=torch.float32)):
                norms[i] = n
        return norms
    chunk = order_stats.chunk_size_for(grads[0].device, sum(g.numel() for g in grads))
    for i, (p, g) in enumerate(zip(params, grads)):
        norms[i] = _chunked_norm(flat_view(g), flat_view(p.detach()), chunk)
    return norms


def _chunked_norm(g: Tensor, w: Tensor | None, chunk: int) -> Tensor:
    """``||w * g||`` in float32, streamed in chunks so no tensor-sized temporary is made."""
    if g.numel() <= chunk:
        x = g.float() if w is None else g.float() * w.float()
        return torch.linalg.vector_norm(x)
    sq = torch.zeros((), dtype=torch.float32, device=g.device)
    for start, n in chunk_ranges(g.numel(), chunk):
        x = g[start : start + n].float()
        if w is not None:
            x = x * w[start : start + n].float()
        sq += torch.linalg.vector_norm(x).square()
    return sq.sqrt()


def _coefficient(rho: float, norm: Tensor, eps: float) -> Tensor:
    return rho / (norm + eps)


# --------------------------------------------------------------------------- SAM
@register_direction("sam")
class GradientDirection(Direction):
    """SAM: ascend along the gradient itself, scaled by its global norm."""

    def __call__(self, params, grads, *, rho, eps, adaptive):
        coef = _coefficient(rho, total_norm(weighted_norms(params, grads, adaptive)), eps)
        return [coef] * len(grads)


# --------------------------------------------------------------------------- ZSharp
class _ZScores:
    """Per-tensor z-score statistics of the gradients, and |z| recomputed on demand.

    |z| is never stored for the whole model: each consumer streams it chunk by chunk through
    :meth:`fill`, recomputing ``|(g - mean) / (std + 1e-8)|`` in float32 with the same
    operations as the reference (so thresholds and masks match it bit for bit).
    """

    def __init__(self, grads: Sequence[Tensor]):
        self.flats = [flat_view(g) for g in grads]
        self.sizes = [f.numel() for f in self.flats]
        self.mean: list[Tensor | None] = []
        self.denom: list[Tensor | None] = []
        self.max_abs: list[Tensor] = []
        for f in self.flats:
            if f.numel() < 2:  # std undefined: z = 0 by definition
                self.mean.append(None)
                self.denom.append(None)
                self.max_abs.append(torch.zeros((), dtype=torch.float32, device=f.device))
                continue
            x = f if f.dtype == torch.float32 else f.float()
            mean, denom = x.mean(), x.std() + ZSCORE_EPS
            lo, hi = torch.aminmax(x)
            # |z| is monotone in g on either side of the mean and every op is correctly rounded,
            # so the largest |z| is reached at min(g) or max(g): exact, without a pass over |z|.
            self.max_abs.append(torch.maximum(((hi - mean) / denom).abs(), ((lo - mean) / denom).abs()))
            self.mean.append(mean)
            self.denom.append(denom)

    def fill(self, seg: int, start: int, n: int, out: Tensor) -> None:
        if self.mean[seg] is None:
            out.zero_()
            return
        out.copy_(self.flats[seg][start : start + n])
        out.sub_(self.mean[seg]).div_(self.denom[seg]).abs_()


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

    def __init__(self, percentile: float = 70.0, scope: str = "global"):
        if isinstance(percentile, bool) or not isinstance(percentile, (int, float)) or not 0 < percentile < 100:
            raise ValueError(f"percentile must be a number in (0, 100), got {percentile!r}")
        if scope not in self.SCOPES:
            raise ValueError(f"scope must be one of {self.SCOPES}, got {scope!r}")
        self.percentile = float(percentile)
        self.scope = scope

    def __call__(self, params, grads, *, rho, eps, adaptive):
        devices = {g.device for g in grads}
        if len(devices) > 1:
            raise ValueError(
                f"ZSharp computes z-score thresholds over tensors on one device, got {sorted(map(str, devices))}"
            )
        device = devices.pop()
        z = _ZScores(grads)
        if self.scope == "global":
            return self._global(params, grads, z, device, rho, eps, adaptive)
        return self._per_tensor(params, grads, z, device, rho, eps, adaptive)

    # -- scope="global": seed README behaviour
    def _global(self, params, grads, z, device, rho, eps, adaptive):
        lo, hi, weight = linear_rank(self.percentile / 100.0, sum(z.sizes))
        queries = [(order_stats.GLOBAL, lo), (order_stats.GLOBAL, hi)]
        # Rank of each tensor's top-20% boundary: its k-th largest value, k = max(1, floor(0.2 n)).
        queries += [(s, n - max(1, int(FALLBACK_FRACTION * n))) for s, n in enumerate(z.sizes)]
        values = order_stats.select(z.sizes, z.fill, queries, device)
        threshold = _interpolate(values[0], values[1], weight)
        # A tensor whose largest |z| is under the global threshold would keep nothing: fallback.
        per_tensor = torch.where(torch.stack(z.max_abs) >= threshold, threshold, values[2:])
        _, filtered_sq = _mask_norms(
            grads, params, z, list(range(len(grads))), per_tensor, torch.ge, adaptive, in_place=True
        )
        coef = _coefficient(rho, filtered_sq.sum().sqrt(), eps)
        return [coef] * len(grads)

    # -- scope="tensor": the paper's official behaviour
    def _per_tensor(self, params, grads, z, device, rho, eps, adaptive):
        raw_coef = _coefficient(rho, total_norm(weighted_norms(params, grads, adaptive)), eps)
        coefs = [raw_coef] * len(grads)
        segs = [s for s, g in enumerate(grads) if g.dim() > 1]
        if not segs:
            return coefs
        queries, weights = [], []
        for s in segs:
            lo, hi, weight = linear_rank(self.percentile / 100.0, z.sizes[s])
            queries += [(s, lo), (s, hi)]
            weights.append(weight)
        values = order_stats.select(z.sizes, z.fill, queries, device)
        thresholds = torch.stack([_interpolate(values[2 * j], values[2 * j + 1], w) for j, w in enumerate(weights)])
        # First pass: is anything left after filtering? (needs the whole tensor before masking)
        plain_sq, _ = _mask_norms(grads, params, z, segs, thresholds, torch.gt, adaptive=False)
        keep_all = plain_sq == 0  # filtered gradient all zero: fall back to the raw gradient
        _, weighted_sq = _mask_norms(grads, params, z, segs, thresholds, torch.gt, adaptive, keep_all, in_place=True)
        own = torch.where(keep_all, raw_coef, _coefficient(rho, weighted_sq.sqrt(), eps))
        for j, s in enumerate(segs):
            coefs[s] = own[j]
        return coefs


def _mask_norms(grads, params, z, segs, thresholds, keep, adaptive, keep_all=None, in_place=False):
    """Stream |z| through each tensor in ``segs``; with ``m = keep(|z|, threshold) | keep_all``,
    return per-segment squared norms of ``g*m`` and of ``T*g*m``, writing ``g*m`` into the
    gradient when ``in_place``."""
    device = grads[0].device
    plain = torch.zeros(len(segs), dtype=torch.float32, device=device)
    weighted = torch.zeros(len(segs), dtype=torch.float32, device=device) if adaptive else plain
    chunk = order_stats.chunk_size_for(device, sum(z.sizes))
    scratch = torch.empty(min(chunk, max(z.sizes[s] for s in segs)), dtype=torch.float32, device=device)
    for j, s in enumerate(segs):
        g = z.flats[s]
        w = flat_view(params[s].detach()) if adaptive else None
        for start, n in chunk_ranges(z.sizes[s], chunk):
            absz = scratch[:n]
            z.fill(s, start, n, absz)
            mask = keep(absz, thresholds[j])
            if keep_all is not None:
                mask |= keep_all[j]
            gc = g[start : start + n]
            if in_place:
                gc.mul_(mask)
                kept = gc.float()
            else:
                kept = gc.float() * mask
            plain[j] += kept.square().sum()
            if adaptive:
                weighted[j] += (kept * w[start : start + n].float()).square().sum()
    return plain, weighted

