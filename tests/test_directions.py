"""The perturbation math against hand-derived values and the reference definitions."""
from __future__ import annotations

import math

import pytest
import torch

from zsharp_algos import SAM, ZSharp
from zsharp_algos.directions import GradientDirection, ZScoreDirection, linear_rank
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
    perturbation e (left in .grad by first_step(zero_grad=False)), checking w' = w + e."""
    params = [torch.nn.Parameter(d.clone()) for d in params_data]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    opt = opt_cls(params, torch.optim.SGD, lr=0.1, **kw)
    opt.first_step(zero_grad=False)
    e = [p.grad.clone() for p in params]
    for p, d, ei in zip(params, params_data, e):
        assert torch.equal(p.detach(), d + ei)
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


def test_chunked_path_matches_reference(monkeypatch):
    """Tensors larger than one chunk go through the streaming path: same result."""
    import zsharp_algos.order_stats as os_mod

    monkeypatch.setattr(os_mod, "chunk_size_for", lambda device, total: 7)
    grads = random_grads(3, SHAPES)
    for scope, ref in [("global", zsharp_global_perturbation(grads, 0.05, 70)), ("tensor", zsharp_tensor_perturbation(grads, 0.05, 70))]:
        e, _, _ = perturbation_of(ZSharp, [torch.zeros(s) for s in SHAPES], grads, rho=0.05, percentile=70, scope=scope)
        for got, want in zip(e, ref):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-8)
    weights = random_grads(4, SHAPES)
    e, _, _ = perturbation_of(SAM, weights, grads, rho=0.05, adaptive=True)
    for got, want in zip(e, sam_perturbation(weights, grads, 0.05, adaptive=True)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------ order statistics
@pytest.fixture(params=["cpu", "accelerator"])
def strategy(request, monkeypatch):
    """Run with the CPU selection strategy (host reads, compaction) or, on the CPU too, with the
    fixed-shape one accelerators use."""
    import zsharp_algos.order_stats as os_mod

    if request.param == "accelerator":
        monkeypatch.setattr(os_mod, "reads_host", lambda device: False)
    return request.param


def test_select_matches_sort_with_ties_zeros_and_chunks(monkeypatch, strategy):
    gen = torch.Generator().manual_seed(0)
    segs = [torch.rand(1000, generator=gen), torch.zeros(3), torch.randint(0, 4, (517,), generator=gen).float(),
            torch.tensor([1e-30, 3e38, 0.5]), torch.rand(300, generator=gen) * 1e-3]
    everything = torch.cat(segs).sort().values
    queries = [(GLOBAL, 0), (GLOBAL, 1822), (GLOBAL, 700), (0, 999), (1, 1), (2, 300), (3, 0), (3, 2), (0, 0),
               (4, 150), (GLOBAL, 701), (4, 151)]
    chunk = 64

    def chunks(s):  # chunked, as the real source yields them
        return (segs[s][i : i + chunk] for i in range(0, len(segs[s]), chunk))

    got = select([len(s) for s in segs], chunks, queries, torch.device("cpu"))
    want = torch.stack([everything[r] if s == GLOBAL else segs[s].sort().values[r] for s, r in queries])
    assert torch.equal(got, want)


@pytest.mark.parametrize("heavy", ["tied", "distinct"])
def test_select_in_a_bin_holding_most_values(heavy, strategy):
    """A bin with most of the values: one value repeated (exactly-zero gradients) takes the CPU
    strategy's shortcut, distinct values (all with the same top 16 bits) its compaction."""
    gen = torch.Generator().manual_seed(1)
    if heavy == "tied":
        bulk = torch.full((150_000,), 0.75)
    else:  # 1 + k * 2^-23: the same high half, 80_000 distinct low halves (several times each)
        bulk = 1.0 + torch.randint(0, 80_000, (150_000,), generator=gen).float() * 2.0**-23
    seg = torch.cat([torch.rand(30_000, generator=gen), bulk, torch.rand(20_000, generator=gen) + 2])
    seg = seg[torch.randperm(seg.numel(), generator=gen)]
    ranks = [0, 30_000, 100_000, 179_999, 180_000, 199_999]
    queries = [(0, r) for r in ranks] + [(GLOBAL, r) for r in ranks]
    got = select([seg.numel()], lambda s: iter([seg]), queries, torch.device("cpu"))
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
        ("too_many_inside", False),  # more values inside the bracket than it may sort
    ],
)
def test_bracket_select_is_exact_or_steps_aside(data, bracketed, monkeypatch):
    """Global queries over stored values: the sampled bracket gives exactly the sorted values,
    and where it cannot (bracket missed, too many values in it) the radix select does."""
    import zsharp_algos.order_stats as os_mod

    monkeypatch.setattr(os_mod, "BRACKET_SAMPLE", 1 << 14)
    monkeypatch.setattr(os_mod, "_crowded", lambda values: True)
    gen = torch.Generator().manual_seed(2)
    n = 200_000
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
        monkeypatch.setattr(os_mod, "BRACKET_MAX_SHARE", 1e-3)
    values = values[torch.randperm(n, generator=gen)] if data not in ("sorted", "against_the_stride") else values
    calls = []
    bracket = os_mod._select_by_bracket
    monkeypatch.setattr(os_mod, "_select_by_bracket", lambda v, r: calls.append(bracket(v, r)) or calls[-1])
    ranks = [int(0.7 * (n - 1)), int(0.7 * (n - 1)) + 1]  # torch.quantile's two neighbours
    if data == "duplicates":  # the neighbour is the next distinct value
        ordered = values.sort().values
        boundaries = (ordered[1:] != ordered[:-1]).nonzero()[:, 0]
        ranks = [int(boundaries[boundaries >= ranks[0]][0])] * 2
        ranks[1] += 1
        assert ordered[ranks[0]] < ordered[ranks[1]]
    queries = [(GLOBAL, r) for r in ranks] + [(0, 5), (0, n // 3)]
    got = select([n], lambda s: iter([values]), queries, torch.device("cpu"), joined=values)
    want = values.sort().values
    assert torch.equal(got, torch.stack([want[r] for r in ranks + [5, n // 3]]))
    assert len(calls) == 1 and (calls[0] is not None) == bracketed


def test_bracket_is_tried_only_where_a_bin_is_crowded():
    from zsharp_algos.order_stats import _crowded

    gen = torch.Generator().manual_seed(3)
    spread = torch.randn(300_000, generator=gen).abs()
    crowded = spread.clone()
    crowded[::7] = 1.5 + torch.rand(crowded[::7].numel(), generator=gen) * 2.0**-10  # 14% share one bin
    assert not _crowded(spread) and _crowded(crowded)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("scope", ["global", "tensor"])
def test_both_selection_strategies_and_storage_modes_agree_bitwise(seed, scope, monkeypatch):
    """CPU strategy vs accelerator strategy, |z| stored in the save buffer vs recomputed per
    chunk: the same perturbation to the last bit (fallback cases included)."""
    import zsharp_algos.order_stats as os_mod

    monkeypatch.setattr(os_mod, "chunk_size_for", lambda device, total: 16)
    shapes = SHAPES + [(40, 30)]
    grads = random_grads(seed, shapes)
    if seed % 2:
        grads[4] = torch.tensor([1.0, 1.0, 2.0, 2.0])  # keeps nothing under the global threshold
        grads[0] = torch.full((8, 5), 3.0)  # filtered gradient all zero (tensor scope)
        grads[0][0, 0] = 0.0
    results = []
    for reads_host in (True, False):
        for stored in (True, False):
            monkeypatch.setattr(os_mod, "reads_host", lambda device, r=reads_host: r)
            direction = ZScoreDirection(70, scope)
            gs = [g.clone() for g in grads]
            storage = torch.full((sum(g.numel() for g in gs) + 3,), float("nan")) if stored else None
            norms = direction([torch.zeros(s) for s in shapes], gs, adaptive=[False] * len(gs), storage=storage)
            assert norms.shape == (len(gs),) and norms.dtype == torch.float32
            results.append([g * (0.05 / (n + 1e-12)) for g, n in zip(gs, norms.unbind())])
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


@pytest.mark.parametrize("q", [0.7, 0.95, 0.5, 0.01, 0.999])
def test_linear_rank_matches_torch_quantile(q):
    gen = torch.Generator().manual_seed(1)
    for n in [1, 2, 3, 10, 11, 101, 4097]:
        x = torch.rand(n, generator=gen)
        lo, hi, w = linear_rank(q, n)
        s = x.sort().values
        assert torch.equal(torch.lerp(s[lo], s[hi], w) if w else s[lo], torch.quantile(x, q)), (n, q)


def test_threshold_beyond_torch_quantile_limit():
    """22M entries in one tensor: torch.quantile refuses (> 2^24); we compute the exact order
    statistic, checked against kthvalue."""
    n = 22_000_000
    g = torch.randn(n, generator=torch.Generator().manual_seed(0))
    with pytest.raises(RuntimeError):
        torch.quantile(g.abs(), 0.7)
    from zsharp_algos.directions import _ZScores

    z = _ZScores([g], storage=torch.empty(n))
    lo, hi, w = linear_rank(0.7, n)
    got = select([n], z.values, [(GLOBAL, lo), (GLOBAL, hi)], torch.device("cpu"))
    absz = ((g - g.mean()) / (g.std() + 1e-8)).abs()
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


def test_accelerator_path_does_not_sync_with_host(monkeypatch):
    """No .item(), bool(tensor), float(tensor)... anywhere on the step path that accelerators
    take (run here on CPU tensors; the CPU strategy may read small results on the host)."""
    import zsharp_algos.order_stats as os_mod

    monkeypatch.setattr(os_mod, "reads_host", lambda device: False)
    grads = random_grads(0, SHAPES)
    opts = [perturbation_of(c, [torch.zeros(s) for s in SHAPES], grads, rho=0.05, **kw)[1]
            for c, kw in [(SAM, {}), (SAM, {"adaptive": True}), (ZSharp, {}), (ZSharp, {"scope": "tensor", "adaptive": True})]]

    def forbidden(*args, **kwargs):
        raise AssertionError("host sync on the optimizer step path")

    for opt in opts:
        opt.restore()
        for p, g in zip([p for grp in opt.param_groups for p in grp["params"]], grads):
            p.grad = g.clone()
    for name in ["item", "__bool__", "__float__", "__int__", "__index__", "tolist", "cpu", "numpy"]:
        monkeypatch.setattr(torch.Tensor, name, forbidden)
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
    norms = GradientDirection()(weights, gs, adaptive=flags)
    want = torch.stack([((w.abs() if a else 1) * g).norm() for w, g, a in zip(weights, grads, flags)]).norm()
    assert norms.shape == (len(SHAPES),) and norms.dtype == torch.float32
    torch.testing.assert_close(norms, want.expand(len(SHAPES)))
    assert all(torch.equal(a, b) for a, b in zip(gs, grads))  # d = g

    gs = [g.clone() for g in grads]
    norms = ZScoreDirection(95, "tensor")(weights, gs, adaptive=flags)
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
    norms = make()([torch.ones_like(g) for g in grads], [g.clone() for g in grads], adaptive=[True] * len(grads))
    assert norms.dtype == torch.float64 and norms.shape == (len(SHAPES),)
