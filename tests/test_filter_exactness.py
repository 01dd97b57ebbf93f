"""ZSharp's exactness contract (docs/filter.md), checked on random, heavy-tailed, tied and
all-zero gradients, both scopes, both selection strategies, with and without the work buffer:

1. per-tensor mean within ``eps * mean|g|`` of the exact (float64) mean, std within
   ``eps * (std + mean|g|)``, ``eps = B * 2^-24`` (``B``: the layout's row length, <= 1024);
2. so |z| within ``delta = 2 eps (1 + |z|)(1 + mean|g| / (std + 1e-8))`` of the exact z-score's;
3. thresholds are exact order statistics of the |z| we compute (torch.quantile's interpolation
   of them; where the upper neighbour is far, a value selecting the very same entries);
4. masks equal tests/reference.py's except for entries whose |z| lies within that slack of the
   threshold (or a whole tensor whose largest |z| does, flipping the global scope's fallback):
   every difference is counted and shown to be of that kind.
"""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from zsharp_algos import order_stats
from zsharp_algos.directions import FALLBACK_FRACTION, ZScoreDirection, linear_rank
from zsharp_algos.segments import ZSCORE_EPS, Workspace, layout_for

from reference import stat, zscore, zsharp_global_masks

SHAPES = [(64, 50), (3000,), (33, 65), (8, 5), (1,), (5,), (300, 20), (2, 3), (1030,), (4, 4, 3, 3)]


def gradients(kind: str, seed: int, dtype=torch.float32) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i, s in enumerate(SHAPES):
        if kind == "random":
            g = torch.randn(s, generator=gen) * (1 + i) + 0.3 * i
        elif kind == "heavy_tailed":  # log-normal scales: a few entries dominate each tensor
            g = torch.randn(s, generator=gen) * torch.exp(2 * torch.randn(s, generator=gen))
        elif kind == "tied":  # few distinct values, many exact zeros
            g = torch.randint(-2, 3, s, generator=gen).float() * (torch.rand(s, generator=gen) < 0.5)
        elif kind == "all_zero":
            g = torch.zeros(s)
        out.append(g.to(dtype))
    if kind == "tied":
        out[3] = torch.full(SHAPES[3], 3.0, dtype=dtype)  # one value only: std 0, |z| 0
    return out


KINDS = ["random", "heavy_tailed", "tied", "all_zero"]


def eps_of(layout, dtype) -> float:
    return layout.row * (2.0**-53 if dtype == torch.float64 else 2.0**-24)


def our_state(grads, stored, name, scope, percentile):
    """Our statistics, |z| per tensor and per-tensor thresholds, from the filter's own code."""
    dtype = torch.float64 if grads[0].dtype == torch.float64 else torch.float32
    layout = layout_for([g.numel() for g in grads], grads[0].device)
    storage = torch.empty(layout.numel, dtype=dtype) if stored else None
    ws = Workspace(layout, grads, dtype, storage)
    mean, denom = ws.statistics()
    # |z| as the filter computes it (a stored twin when the workspace under test is windowed)
    seen = ws if stored else Workspace(layout, grads, dtype, torch.empty(layout.numel, dtype=dtype))
    if not stored:
        seen.statistics()
    seen.z_buffer()
    absz = [torch.cat(seen.segment_pieces(s)).clone() for s in range(layout.n)]
    direction = ZScoreDirection(percentile, scope)
    with order_stats.strategy(name):
        thresholds = direction._global_thresholds(ws) if scope == "global" else direction._tensor_thresholds(ws)
    return layout, mean, denom, [z.view(g.shape) for z, g in zip(absz, grads)], thresholds


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", KINDS)
def test_statistics_and_zscores_within_the_stated_bound(kind, dtype):
    grads = gradients(kind, 0, dtype)
    layout, mean, denom, absz, _ = our_state(grads, True, "cpu", "global", 70)
    eps = eps_of(layout, dtype)
    for g, m, d, z in zip(grads, mean, denom, absz):
        if g.numel() < 2:
            assert torch.equal(z, torch.zeros_like(z))  # z = 0, as both references
            continue
        exact = g.double()
        mu, sigma, scale = exact.mean(), exact.std(), exact.abs().mean()
        assert abs(m.double() - mu) <= eps * scale
        assert abs(d.double() - ZSCORE_EPS - sigma) <= eps * (sigma + scale) + 2 * ZSCORE_EPS * 2.0**-23
        # ... and against torch.mean / torch.std in the gradient's precision (their own error is
        # well under eps): within twice the bound
        assert abs(m.double() - g.mean().double()) <= 2 * eps * scale
        assert abs(d.double() - ZSCORE_EPS - g.std().double()) <= 2 * eps * (sigma + scale) + 4 * ZSCORE_EPS * 2.0**-23
        z_exact = ((exact - mu) / (sigma + ZSCORE_EPS)).abs()
        delta = 2 * eps * (1 + z_exact) * (1 + scale / (sigma + ZSCORE_EPS))
        assert bool(((z.double() - z_exact).abs() <= delta).all())


def _exact_threshold(values: torch.Tensor, q: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """torch.quantile's interpolation of the exact order statistics of ``values`` (any size)."""
    ordered = values.flatten().sort().values
    lo, hi, w = linear_rank(q, ordered.numel(), values.dtype)
    t = torch.lerp(ordered[lo], ordered[hi], w) if w else ordered[lo]
    return t, ordered[lo], ordered[hi]


@pytest.mark.parametrize("name", ["cpu", "accelerator"])
@pytest.mark.parametrize("scope", ["global", "tensor"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_thresholds_are_exact_order_statistics_of_our_zscores(name, scope, kind, dtype):
    grads = gradients(kind, 1, dtype)
    percentile = 70 if scope == "global" else 95
    filtered = [g for g in grads if g.dim() > 1] if scope == "tensor" else grads
    layout, _, _, absz, thresholds = our_state(filtered, True, name, scope, percentile)
    if scope == "global":
        t, lo, hi = _exact_threshold(torch.cat([z.flatten() for z in absz]), percentile / 100)
        for z, got in zip(absz, thresholds):
            if bool((z >= t).any()):
                _same_selection(got, t, lo, hi, torch.ge)
            else:  # the tensor's own top max(1, floor(0.2 n)) boundary, exactly
                k = max(1, int(FALLBACK_FRACTION * z.numel()))
                assert got == z.flatten().sort().values[z.numel() - k]
    else:
        for z, got in zip(absz, thresholds):
            t, lo, hi = _exact_threshold(z, percentile / 100)
            _same_selection(got, t, lo, hi, torch.gt)


def _same_selection(got, t, lo, hi, keep):
    """``got`` is the interpolated threshold itself, or (upper neighbour far) a value between
    the two order statistics that keeps the very same entries."""
    if got == t:
        return
    assert lo <= got <= hi and keep(hi, got) == keep(hi, t) and keep(lo, got) == keep(lo, t)


@pytest.mark.parametrize("stored", [True, False])
@pytest.mark.parametrize("name", ["cpu", "accelerator"])
@pytest.mark.parametrize("scope", ["global", "tensor"])
@pytest.mark.parametrize("kind", KINDS)
def test_masks_equal_the_reference_except_within_the_bound(stored, name, scope, kind):
    grads = gradients(kind, 2)
    percentile = 70 if scope == "global" else 95
    gs = [g.clone() for g in grads]
    storage = torch.empty(sum(g.numel() for g in gs)) if stored else None
    with order_stats.strategy(name):
        ZScoreDirection(percentile, scope)([torch.zeros_like(g) for g in gs], gs, adaptive=[False] * len(gs), storage=storage)
    differences = 0
    if scope == "global":
        ref_masks = zsharp_global_masks(grads, percentile)
        zs = [zscore(stat(g)).abs() for g in grads]
        t_ref = torch.quantile(torch.cat([z.flatten() for z in zs]), percentile / 100)
        layout = layout_for([g.numel() for g in grads], torch.device("cpu"))
        slack = _slack(grads, layout)
        for g, d, m, z in zip(grads, gs, ref_masks, zs):
            ours, want = d != 0, (g * m) != 0
            diff = ours != want
            if not bool(diff.any()):
                continue
            differences += int(diff.sum())
            k = max(1, int(0.2 * z.numel()))
            v_f = z.flatten().topk(k).values[-1]  # the reference's fallback boundary
            near_t = bool(((z - t_ref).abs() <= slack)[diff].all())
            near_f = bool(((z - v_f).abs() <= slack)[diff].all())
            flipped = abs(z.max() - t_ref) <= slack  # keep-nothing decided the other way
            assert near_t or near_f or flipped
    else:
        for g, d in zip(grads, gs):
            if g.dim() < 2:
                assert torch.equal(d, g)
                continue
            z = zscore(g.float()).abs()
            t_ref = torch.quantile(z.flatten(), percentile / 100)
            want = g * (z > t_ref)
            if not bool(want.any()):
                want = g  # filtered gradient all zero: the raw gradient
            if torch.equal(d, want):
                continue
            layout = layout_for([g.numel()], torch.device("cpu"))
            slack = _slack([g], layout)
            diff = d != want
            differences += int(diff.sum())
            assert bool(((z - t_ref).abs() <= slack)[diff].all())
    # Rounding differs from torch.mean / torch.std in the last bits only: differences are rare
    assert differences <= 2


def _slack(grads, layout) -> float:
    """Twice the largest |z| bound: ours and the reference's |z| each within delta of the exact
    z-score, so their thresholds (order statistics) differ by at most that much too."""
    eps = eps_of(layout, torch.float32)
    worst = 0.0
    for g in grads:
        if g.numel() < 2:
            continue
        exact = g.double()
        sigma, scale = float(exact.std()), float(exact.abs().mean())
        z = float(((exact - exact.mean()) / (sigma + ZSCORE_EPS)).abs().max())
        worst = max(worst, 2 * eps * (1 + z) * (1 + scale / (sigma + ZSCORE_EPS)))
    return 4 * worst


# ------------------------------------------------------------------ kernels vs number of tensors
class _Count(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += not func.is_view
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("scope", ["global", "tensor"])
def test_accelerator_filter_ops_do_not_grow_with_the_number_of_tensors(scope, adaptive):
    """The sync-free filter dispatches as many ops for 24 tensors as for 9 of the same sizes.
    (The digit width, hence the number of rounds, follows the entries per tensor: the histogram
    budget is a fraction of the entries, shared by the tensors.)"""
    gen = torch.Generator().manual_seed(3)
    shapes = [(600, 521), (311_000,), (5, 3, 7, 7)]  # rows with tails, a vector, a small conv

    def ops(n_tensors: int) -> int:
        grads = [torch.randn(shapes[i % 3], generator=gen) for i in range(n_tensors)]
        storage = torch.empty(sum(g.numel() for g in grads))
        direction = ZScoreDirection(70, scope)
        params = [torch.zeros_like(g) for g in grads]
        with order_stats.strategy("accelerator"):
            direction(params, [g.clone() for g in grads], adaptive=[adaptive] * len(grads), storage=storage)
            mode = _Count()
            with mode:
                direction(params, grads, adaptive=[adaptive] * len(grads), storage=storage)
        return mode.ops

    assert ops(9) == ops(24)
