"""The perturbation math against hand-derived values and the reference definitions."""
from __future__ import annotations

import math

import pytest
import torch

from zsharp_algos import SAM, ZSharp
from zsharp_algos.directions import GradientDirection, ZScoreDirection, linear_rank
from zsharp_algos import order_stats
from zsharp_algos.order_stats import GLOBAL, select

from reference import zscore as reference_zscore
from reference import (
    sam_perturbation,
    zsharp_global_masks,
    zsharp_global_perturbation,
    zsharp_tensor_perturbation,
)


def perturbation_of(opt_cls, params_data, grads, **kw):
    """Run first_step on parameters holding ``params_data`` with ``grads``; return the
    perturbation e (left in .grad by first_step(zero_grad=False)), checking w' = w + e (to the
    rounding of the sum: on the CPU w' is one fused multiply-add, w + c * d)."""
    params = [torch.nn.Parameter(d.clone()) for d in params_data]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    opt = opt_cls(params, torch.optim.SGD, lr=0.1, **kw)
    opt.first_step(zero_grad=False)
    e = [p.grad.clone() for p in params]
    for p, d, ei in zip(params, params_data, e):
        torch.testing.assert_close(p.detach(), d + ei, rtol=torch.finfo(p.dtype).eps, atol=1e-45)
    return e, opt, params


def random_grads(seed, shapes):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen) * (1 + i) + i * 0.1 for i, s in enumerate(shapes)]


SHAPES = [(8, 5), (5,), (1,), (3, 4, 2, 2), (4,), (16, 3)]


# ------------------------------------------------------------------ hand-derived
def test_sam_hand_derived():
    # g = (3, 4) -> ||g|| = 5 -> e = rho * g / 5
    e, _, _ = perturbation_of(SAM, [torch.zeros(2)], [torch.tensor([3.0, 4.0])], rho=0.5)
    torch.testing.assert_close(e[0], torch.tensor([0.3, 0.4]))


def test_asam_hand_derived():
    # w = (2, 1), g = (1, 2): T g = (2, 2), ||T g|| = 2 sqrt 2; e = rho * (4*1, 1*2) / (2 sqrt 2)
    w = torch.tensor([2.0, 1.0])
    e, _, _ = perturbation_of(SAM, [w], [torch.tensor([1.0, 2.0])], rho=1.0, adaptive=True)
    torch.testing.assert_close(e[0], torch.tensor([4.0, 2.0]) / (2 * math.sqrt(2)))


def test_zsharp_global_hand_derived():
    # g = (0, 0, 0, 10): mean 2.5, unbiased std 5 -> |z| = (.5, .5, .5, 1.5); 70th percentile at
    # rank 0.7 * 3 = 2.1 -> .5 + .1 * (1.5 - .5) = .6; only the 10 survives -> e = rho * (0,0,0,1)
    e, _, _ = perturbation_of(ZSharp, [torch.zeros(4)], [torch.tensor([0.0, 0.0, 0.0, 10.0])], rho=0.2)
    torch.testing.assert_close(e[0], torch.tensor([0.0, 0.0, 0.0, 0.2]))


def test_zsharp_global_fallback_hand_derived():
    # a = (0, 0, 0, 10): |z| = (.5, .5, .5, 1.5). b = (1, 2, 3, 4, 6): mean 3.2, std 1.924,
    # |z| = (1.143, .624, .104, .416, 1.455). The 90th percentile of all nine |z| sits at rank
    # 7.2: 1.455 + .2 * (1.5 - 1.455) = 1.464, so a keeps its 10 and b keeps nothing -> b keeps
    # its top max(1, floor(0.2 * 5)) = 1 entry, the 6. One global norm: sqrt(10^2 + 6^2).
    a, b = torch.tensor([0.0, 0.0, 0.0, 10.0]), torch.tensor([1.0, 2.0, 3.0, 4.0, 6.0])
    e, _, _ = perturbation_of(ZSharp, [torch.zeros(4), torch.zeros(5)], [a, b], rho=1.0, percentile=90)
    norm = math.sqrt(10.0**2 + 6.0**2)
    torch.testing.assert_close(e[0], torch.tensor([0.0, 0.0, 0.0, 10.0 / norm]))
    torch.testing.assert_close(e[1], torch.tensor([0.0, 0.0, 0.0, 0.0, 6.0 / norm]))


def test_zsharp_tensor_hand_derived():
    # W (2x3) = (0,0,0,0,0,6): |z| = (.41,)*5 + 2.04; 95th pct lies between them: keep the 6,
    # normalised alone -> rho * e_6. Bias b = (3, 4) is not filtered: SAM scaling with the raw
    # global norm sqrt(36 + 9 + 16) = sqrt(61).
    W, b = torch.tensor([[0.0, 0, 0], [0, 0, 6]]), torch.tensor([3.0, 4.0])
    e, _, _ = perturbation_of(ZSharp, [torch.zeros(2, 3), torch.zeros(2)], [W, b], rho=0.1, percentile=95, scope="tensor")
    torch.testing.assert_close(e[0], torch.tensor([[0.0, 0, 0], [0, 0, 0.1]]))
    torch.testing.assert_close(e[1], 0.1 * b / math.sqrt(61.0))


# ------------------------------------------------------------------ reference definitions
@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("adaptive", [False, True])
def test_sam_matches_reference(seed, adaptive):
    grads = random_grads(seed, SHAPES)
    weights = random_grads(seed + 100, SHAPES)
    e, _, _ = perturbation_of(SAM, weights, grads, rho=0.05, adaptive=adaptive)
    for got, want in zip(e, sam_perturbation(weights, grads, 0.05, adaptive=adaptive)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("percentile", [70, 95, 33.3])
def test_zsharp_global_matches_reference(seed, percentile):
    grads = random_grads(seed, SHAPES)
    if seed % 2:  # ties and a tensor that keeps nothing
        grads[4] = torch.tensor([1.0, 1.0, 2.0, 2.0])
        grads[0][:4] = 0.0
    e, _, _ = perturbation_of(ZSharp, [torch.zeros(s) for s in SHAPES], grads, rho=0.05, percentile=percentile)
    want = zsharp_global_perturbation(grads, 0.05, percentile)
    for got, ref, mask in zip(e, want, zsharp_global_masks(grads, percentile)):
        assert torch.equal(got != 0, mask & (ref != 0)), "kept entries differ from the reference"
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("percentile", [95, 70])
def test_zsharp_tensor_matches_reference(seed, percentile):
    grads = random_grads(seed, SHAPES)
    if seed % 2:  # filtered gradient exactly zero: fall back to the raw gradient
        grads[0] = torch.full((8, 5), 3.0)
        grads[0][0, 0] = 0.0
    e, _, _ = perturbation_of(
        ZSharp, [torch.zeros(s) for s in SHAPES], grads, rho=0.05, percentile=percentile, scope="tensor"
    )
    for got, ref in zip(e, zsharp_tensor_perturbation(grads, 0.05, percentile)):
        assert torch.equal(got != 0, ref != 0)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-8)


def test_zsharp_tensor_total_norm_grows_with_filtered_tensors():
    grads = random_grads(0, [(10, 10)] * 4)
    e, _, _ = perturbation_of(ZSharp, [torch.zeros(10, 10)] * 4, grads, rho=0.1, percentile=95, scope="tensor")
    norm = torch.stack([x.norm() for x in e]).norm()
    torch.testing.assert_close(norm, torch.tensor(0.1 * 2.0))  # rho * sqrt(4 tensors)


@pytest.mark.parametrize("scope", ["global", "tensor"])
def test_windowed_path_matches_reference(monkeypatch, strategy, scope):
    """No work buffer lent (non-float32 weights): the layout is walked in small windows, refilled
    from the gradients; the same perturbation as with the buffer, bit for bit."""
    from zsharp_algos import segments

    monkeypatch.setattr(segments, "WINDOW_SHARE", 1e-3)  # windows of one row: many of them
    shapes = SHAPES + [(40, 70), (3000,)]
    grads = random_grads(3, shapes)
    results = []
    for stored in (True, False):
        gs = [g.clone() for g in grads]
        storage = torch.empty(sum(g.numel() for g in gs)) if stored else None
        norms = ZScoreDirection(70, scope)([torch.zeros(s) for s in shapes], gs, adaptive=[False] * len(gs), storage=storage).norms
        results.append(gs + [norms])
    for a, b in zip(*results):
        assert torch.equal(a, b)
    ref_fn = zsharp_global_perturbation if scope == "global" else zsharp_tensor_perturbation
    for d, n, want in zip(results[1][:-1], results[1][-1], ref_fn(grads, 0.05, 70)):
        torch.testing.assert_close(0.05 * d / (n + 1e-12), want, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("scope", ["global", "tensor"])
@pytest.mark.parametrize("stored", [True, False])
def test_adaptive_zsharp_matches_reference(scope, stored):
    """ASAM scaling of ZSharp's direction: e = rho T^2 d / ||T d|| with T = |w| (the norm over all
    tensors, or the filtered tensor's own), through the work buffer or streamed."""
    grads, weights = random_grads(5, SHAPES), random_grads(6, SHAPES)
    percentile = 70
    if scope == "global":
        ds = [g * m for g, m in zip(grads, zsharp_global_masks(grads, percentile))]
        norm = torch.stack([(w.abs() * d).norm() for w, d in zip(weights, ds)]).norm()
        want = [0.05 * w * w * d / (norm + 1e-12) for w, d in zip(weights, ds)]
    else:
        raw = torch.stack([(w.abs() * g).norm() for w, g in zip(weights, grads)]).norm()
        want = []
        for w, g in zip(weights, grads):
            if g.dim() > 1:
                z = reference_zscore(g).abs()
                d = g * (z > torch.quantile(z.flatten(), percentile / 100))
                if d.any():
                    want.append(0.05 * w * w * d / ((w.abs() * d).norm() + 1e-12))
                    continue
            want.append(0.05 * w * w * g / (raw + 1e-12))
    gs = [g.clone() for g in grads]
    storage = torch.empty(sum(g.numel() for g in gs)) if stored else None
    norms = ZScoreDirection(percentile, scope)(weights, gs, adaptive=[True] * len(gs), storage=storage).norms
    for w, d, n, ref in zip(weights, gs, norms, want):
        torch.testing.assert_close(0.05 * w * w * d / (n + 1e-12), ref, rtol=1e-5, atol=1e-8)


def test_asam_streamed_norm_matches_reference():
    grads, weights = random_grads(3, SHAPES), random_grads(4, SHAPES)
    e, _, _ = perturbation_of(SAM, weights, grads, rho=0.05, adaptive=True)
    for got, want in zip(e, sam_perturbation(weights, grads, 0.05, adaptive=True)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------ order statistics
@pytest.fixture(params=["cpu", "accelerator"])
def strategy(request):
    """Run with the CPU selection strategy (host reads, sampled bracket) or, on the CPU too, with
    the fixed-shape one accelerators use (order_stats.strategy, the documented switch)."""
    with order_stats.strategy(request.param):
        yield request.param


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("stored", [True, False])
def test_select_matches_sort_with_ties_zeros_and_extremes(strategy, dtype, stored):
    gen = torch.Generator().manual_seed(0)
    segs = [torch.rand(1000, generator=gen), torch.zeros(3), torch.randint(0, 4, (517,), generator=gen).float(),
            torch.tensor([1e-30, 3e38, 0.5]), torch.rand(300, generator=gen) * 1e-3, torch.rand(20_000, generator=gen),
            torch.tensor([float("inf"), 0.0, 1e-45])]
    segs = [x.to(dtype) for x in segs]
    everything = torch.cat(segs).sort().values
    queries = [(GLOBAL, 0), (GLOBAL, 1822), (GLOBAL, 700), (0, 999), (1, 1), (2, 300), (3, 0), (3, 2), (0, 0),
               (4, 150), (GLOBAL, 701), (4, 151), (5, 13_999), (6, 2), (6, 0), (GLOBAL, everything.numel() - 1)]
    got = select(segs, queries, storage=stored)
    want = torch.stack([everything[r] if s == GLOBAL else segs[s].sort().values[r] for s, r in queries])
    assert torch.equal(got, want)


@pytest.mark.parametrize("heavy", ["tied", "distinct"])
def test_select_in_a_bin_holding_most_values(heavy, strategy):
    """A bin with most of the values: one value repeated (exactly-zero gradients) or distinct
    values sharing their top 16 bits."""
    gen = torch.Generator().manual_seed(1)
    if heavy == "tied":
        bulk = torch.full((150_000,), 0.75)
    else:  # 1 + k * 2^-23: the same high half, 80_000 distinct low halves (several times each)
        bulk = 1.0 + torch.randint(0, 80_000, (150_000,), generator=gen).float() * 2.0**-23
    seg = torch.cat([torch.rand(30_000, generator=gen), bulk, torch.rand(20_000, generator=gen) + 2])
    seg = seg[torch.randperm(seg.numel(), generator=gen)]
    ranks = [0, 30_000, 100_000, 179_999, 180_000, 199_999]
    queries = [(0, r) for r in ranks] + [(GLOBAL, r) for r in ranks]
    got = select([seg], queries)
    want = seg.sort().values[ranks * 2]
    assert torch.equal(got, want)


@pytest.mark.parametrize(
    "data, bracketed",
    [
        ("normal", True),
        ("crowded_bin", True),  # a fifth of the values share their top 16 bits (as real gradients)
        ("tied_at_rank", True),  # the ranks fall inside a run of one value: no sort needed
        ("sorted", True),
        ("duplicates", True),  # values repeat dozens of times: the neighbour rank may share a value
        ("against_the_stride", False),  # the strided sample sees only outliers: bracket misses
        ("too_many_inside", False),  # more values inside the bracket than it may gather
    ],
)
@pytest.mark.parametrize("numpy", [True, False])
def test_bracket_select_is_exact_or_steps_aside(data, bracketed, numpy, monkeypatch):
    """The CPU strategy's sampled bracket gives exactly the sorted values, or None where it
    cannot (bracket missed, too many values in it); select() then answers by the radix. Its
    counting pass through NumPy, and through torch where NumPy is not installed."""
    if not numpy:
        monkeypatch.setattr(order_stats, "_numpy", lambda: None)
    monkeypatch.setattr(order_stats, "BRACKET_SAMPLE", 1 << 14)  # a 32-stride sample of 512K values
    monkeypatch.setattr(order_stats, "BRACKET_MAX_SHARE", 1 / 16)  # room for its wider bracket
    gen = torch.Generator().manual_seed(2)
    n = 2 * order_stats.DIRECT_MAX  # above the size selected directly
    values = torch.randn(n, generator=gen).abs()
    if data == "crowded_bin":
        values[: n // 5] = 1.5 + torch.rand(n // 5, generator=gen) * 2.0**-10
    elif data == "tied_at_rank":
        values[: n // 2] = 0.7
    elif data == "sorted":
        values = values.sort().values
    elif data == "duplicates":
        values = (values * 1000).round() / 1000
    elif data == "against_the_stride":
        values[:: n // (1 << 14)] = 1e6
    elif data == "too_many_inside":
        monkeypatch.setattr(order_stats, "BRACKET_MAX_SHARE", 1e-3)
    values = values[torch.randperm(n, generator=gen)] if data not in ("sorted", "against_the_stride") else values
    ranks = [int(0.7 * (n - 1)), int(0.7 * (n - 1)) + 1]  # torch.quantile's two neighbours
    ordered = values.sort().values
    if data == "duplicates":  # the neighbour is the next distinct value
        boundaries = (ordered[1:] != ordered[:-1]).nonzero()[:, 0]
        ranks = [int(boundaries[boundaries >= ranks[0]][0])] * 2
        ranks[1] += 1
        assert ordered[ranks[0]] < ordered[ranks[1]]
    pieces = [values[: n // 3], values[n // 3 :]]  # a head and a tail, as a tensor's pieces
    got = order_stats.bracket_select(pieces, ranks)
    assert (got is not None) == bracketed
    if got is not None:
        assert torch.equal(got, ordered[ranks])
    with order_stats.strategy("cpu"):
        assert torch.equal(select([values], [(0, r) for r in ranks]), ordered[ranks])


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("scope", ["global", "tensor"])
def test_both_selection_strategies_and_storage_modes_agree_bitwise(seed, scope, monkeypatch):
    """CPU strategy vs accelerator strategy, |z| stored in the work buffer vs windows refilled
    from the gradients: the same directions and norms to the last bit (fallback cases included)."""
    from zsharp_algos import segments

    monkeypatch.setattr(segments, "WINDOW_SHARE", 0.05)
    shapes = SHAPES + [(40, 30), (70, 33)]
    grads = random_grads(seed, shapes)
    if seed % 2:
        grads[4] = torch.tensor([1.0, 1.0, 2.0, 2.0])  # keeps nothing under the global threshold
        grads[0] = torch.full((8, 5), 3.0)  # filtered gradient all zero (tensor scope)
        grads[0][0, 0] = 0.0
    results = []
    for name in ("cpu", "accelerator"):
        for stored in (True, False):
            gs = [g.clone() for g in grads]
            storage = torch.full((sum(g.numel() for g in gs) + 3,), float("nan")) if stored else None
            with order_stats.strategy(name):
                norms = ZScoreDirection(70, scope)([torch.zeros(s) for s in shapes], gs, adaptive=[False] * len(gs), storage=storage).norms
            assert norms.shape == (len(gs),) and norms.dtype == torch.float32
            results.append(gs + [norms])
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


@pytest.mark.parametrize("q", [0.7, 0.95, 0.5, 0.01, 0.999])
def test_linear_rank_matches_torch_quantile(q):
    # linear_rank reproduces the float32 rank arithmetic of torch.quantile up to torch 2.7 (the
    # pinned environment); later torch computes the rank differently, so it is checked there only
    if tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2]) > (2, 7):
        pytest.skip("torch.quantile's rank arithmetic changed after torch 2.7")
    gen = torch.Generator().manual_seed(1)
    for n in [1, 2, 3, 10, 11, 101, 4097]:
        x = torch.rand(n, generator=gen)
        lo, hi, w = linear_rank(q, n)
        s = x.sort().values
        assert torch.equal(torch.lerp(s[lo], s[hi], w) if w else s[lo], torch.quantile(x, q)), (n, q)
        x64, s64 = x.double(), s.double()
        lo, hi, w = linear_rank(q, n, torch.float64)
        assert torch.equal(torch.lerp(s64[lo], s64[hi], w) if w else s64[lo], torch.quantile(x64, q)), (n, q)


def test_threshold_beyond_torch_quantile_limit(strategy):
    """22M entries in one tensor: torch.quantile refuses (> 2^24); we compute the exact order
    statistic of our |z|, checked against kthvalue."""
    from zsharp_algos.directions import _workspace

    n = 22_000_000
    g = torch.randn(n, generator=torch.Generator().manual_seed(0))
    try:  # torch up to 2.7 refuses; newer torch may not
        torch.quantile(g[: 1 << 25].abs(), 0.7)
    except RuntimeError:
        pass
    ws = _workspace([g], torch.empty(n))
    absz = ws.z_buffer().clone()
    lo, hi, w = linear_rank(0.7, n)
    got = select([absz], [(GLOBAL, lo), (GLOBAL, hi)])
    assert got[0] == torch.kthvalue(absz, lo + 1).values and got[1] == torch.kthvalue(absz, hi + 1).values


# ------------------------------------------------------------------ dtypes and edge cases
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scope", ["global", "tensor"])
def test_low_precision_gradients_use_float32_statistics(dtype, scope):
    grads = [g.to(dtype) for g in random_grads(2, SHAPES)]
    e, _, _ = perturbation_of(ZSharp, [torch.zeros(s, dtype=dtype) for s in SHAPES], grads, rho=0.05, scope=scope)
    ref_fn = zsharp_global_perturbation if scope == "global" else zsharp_tensor_perturbation
    want = ref_fn([g.float() for g in grads], 0.05, 70 if scope == "global" else 70)
    for got, ref in zip(e, want):
        assert got.dtype == dtype
        assert torch.equal(got != 0, ref != 0)
        torch.testing.assert_close(got.float(), ref, rtol=2e-2, atol=1e-3)


@pytest.mark.parametrize("make", [lambda: SAM, lambda: ZSharp, lambda: (lambda *a, **k: ZSharp(*a, scope="tensor", **k))])
def test_zero_gradient_gives_zero_perturbation(make):
    e, _, _ = perturbation_of(make(), [torch.ones(3, 2), torch.ones(4)], [torch.zeros(3, 2), torch.zeros(4)], rho=0.05)
    for x in e:
        assert torch.equal(x, torch.zeros_like(x))


def test_one_element_tensors():
    e, _, _ = perturbation_of(ZSharp, [torch.zeros(1), torch.zeros(1)], [torch.tensor([3.0]), torch.tensor([4.0])], rho=1.0)
    # z = 0 for both; threshold 0; both kept -> plain SAM
    torch.testing.assert_close(torch.cat(e), torch.tensor([0.6, 0.8]))


@pytest.mark.parametrize("stored", [True, False])
def test_accelerator_path_does_not_sync_with_host(monkeypatch, stored):
    """No .item(), bool(tensor), float(tensor)... anywhere on the step path that accelerators
    take (run here on CPU tensors with order_stats.strategy("accelerator"); the CPU strategy may
    read small results on the host). Without the work buffer (bfloat16 weights) too."""
    dtype = torch.float32 if stored else torch.bfloat16
    grads = [g.to(dtype) for g in random_grads(0, SHAPES)]
    with order_stats.strategy("accelerator"):
        opts = [perturbation_of(c, [torch.zeros(s, dtype=dtype) for s in SHAPES], grads, rho=0.05, **kw)[1]
                for c, kw in [(SAM, {}), (SAM, {"adaptive": True}), (ZSharp, {}),
                              (ZSharp, {"scope": "tensor", "adaptive": True}), (ZSharp, {"scope": "tensor"})]]

        def forbidden(*args, **kwargs):
            raise AssertionError("host sync on the optimizer step path")

        for opt in opts:
            opt.restore()
            for p, g in zip([p for grp in opt.param_groups for p in grp["params"]], grads):
                p.grad = g.clone()
        with monkeypatch.context() as m:
            for name in ["item", "__bool__", "__float__", "__int__", "__index__", "tolist", "cpu", "numpy"]:
                m.setattr(torch.Tensor, name, forbidden)
            for opt in opts:
                opt.first_step()
                opt.second_step()


# ------------------------------------------------------------------ CUDA (when a GPU is present)
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
@pytest.mark.parametrize("kw", [dict(), dict(scope="tensor"), dict(adaptive=True)])
def test_cuda_matches_cpu_without_syncs(kw):
    grads = random_grads(5, SHAPES + [(300, 257)])
    weights = random_grads(6, SHAPES + [(300, 257)])
    e_cpu, _, _ = perturbation_of(ZSharp, weights, grads, rho=0.05, **kw)
    params = [torch.nn.Parameter(w.cuda()) for w in weights]
    for p, g in zip(params, grads):
        p.grad = g.cuda()
    opt = ZSharp(params, torch.optim.SGD, lr=0.1, rho=0.05, **kw)
    opt.first_step(zero_grad=False)  # warm-up: caches the layout's index tensors
    opt.restore()
    for p, g in zip(params, grads):
        p.grad = g.cuda()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        opt.first_step(zero_grad=False)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for p, want in zip(params, e_cpu):
        assert torch.equal(p.grad.cpu() != 0, want != 0)
        torch.testing.assert_close(p.grad.cpu(), want, rtol=1e-5, atol=1e-8)


# ------------------------------------------------------------------ the call contract
def test_direction_returns_the_norms_that_divide_each_tensor():
    """SAM: the global norm of T g, with T = |w| only for the tensors flagged adaptive; ZSharp's
    tensor scope: each filtered tensor's own norm, the raw global norm for the others."""
    weights = random_grads(7, SHAPES)
    grads = random_grads(8, SHAPES)
    flags = [i % 2 == 0 for i in range(len(SHAPES))]
    gs = [g.clone() for g in grads]
    norms = GradientDirection()(weights, gs, adaptive=flags).norms
    want = torch.stack([((w.abs() if a else 1) * g).norm() for w, g, a in zip(weights, grads, flags)]).norm()
    assert norms.shape == (len(SHAPES),) and norms.dtype == torch.float32
    torch.testing.assert_close(norms, want.expand(len(SHAPES)))
    assert all(torch.equal(a, b) for a, b in zip(gs, grads))  # d = g

    gs = [g.clone() for g in grads]
    norms = ZScoreDirection(95, "tensor")(weights, gs, adaptive=flags).norms
    raw = torch.stack([((w.abs() if a else 1) * g).norm() for w, g, a in zip(weights, grads, flags)]).norm()
    for i, (w, g, d, a) in enumerate(zip(weights, grads, gs, flags)):
        if g.dim() > 1:
            z = reference_zscore(g).abs()
            assert torch.equal(d, g * (z > torch.quantile(z.flatten(), 0.95)))
            torch.testing.assert_close(norms[i], ((w.abs() if a else 1) * d).norm())
        else:
            assert torch.equal(d, g)
            torch.testing.assert_close(norms[i], raw)


@pytest.mark.parametrize("make", [lambda: GradientDirection(), lambda: ZScoreDirection(70, "global"), lambda: ZScoreDirection(70, "tensor")])
def test_float64_gradients_get_float64_norms(make):
    grads = [g.double() for g in random_grads(9, SHAPES)]
    norms = make()([torch.ones_like(g) for g in grads], [g.clone() for g in grads], adaptive=[True] * len(grads)).norms
    assert norms.dtype == torch.float64 and norms.shape == (len(SHAPES),)
