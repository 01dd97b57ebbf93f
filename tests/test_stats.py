"""``zsharp_algos.stats``: the ``sharpness/*`` statistics, against counts and norms taken by hand."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from reference import sam_perturbation, zsharp_global_perturbation
from zsharp_algos import SAM, ZSharp, order_stats
from zsharp_algos.stats import COUNT_PIECE, nonzero_count

STRATEGIES = ("cpu", "accelerator")


def exact_count(tensors):
    return sum(int(torch.count_nonzero(t)) for t in tensors)


def sparse(shape, zeros, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(shape, generator=g)
    return (values * (torch.rand(shape, generator=g) >= zeros)).to(dtype)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_nonzero_count_is_exact_on_sparse_dense_and_empty_tensors(strategy, dtype):
    tensors = [
        sparse((COUNT_PIECE + 1000,), 0.7, dtype),  # more than one piece
        sparse((37, 5), 0.0, dtype, seed=1),
        torch.zeros(0, dtype=dtype),
        torch.zeros(11, dtype=dtype),
        sparse((3,), 1.0, dtype),  # all zero
    ]
    tensors[1][0, :2] = torch.tensor([-0.0, 5e-45 if dtype == torch.float32 else 0.0], dtype=dtype)
    with order_stats.strategy(strategy):
        got = nonzero_count(tensors)
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert int(got) == exact_count(tensors)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_nonzero_count_counts_nan_and_infinities(strategy):
    # sign() maps NaN to 0, so the CPU strategy's pieces with a NaN sum are counted another way
    a = sparse((COUNT_PIECE * 2,), 0.5)
    a[5] = float("nan")
    a[COUNT_PIECE + 7] = float("inf")
    a[COUNT_PIECE + 8] = float("-inf")  # +inf and -inf in one piece: its sum is NaN too
    b = sparse((100,), 0.5, seed=3)
    b[0] = float("inf")
    with order_stats.strategy(strategy):
        got = nonzero_count([a, b])
    assert int(got) == exact_count([a, b])


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("method", ["sam", "zsharp"])
def test_recorded_statistics_equal_the_norms_and_counts_of_g_and_e(strategy, method):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    with torch.no_grad():
        model[0].weight[:2] = 0.0  # two dead units: exact zeros in the gradient
    params = list(model.parameters())
    if method == "sam":
        opt = SAM(params, torch.optim.SGD, lr=0.1, rho=0.2)
    else:
        opt = ZSharp(params, torch.optim.SGD, lr=0.1, rho=0.2, percentile=60)
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    F.cross_entropy(model(x), y).backward()
    g = [p.grad.clone() for p in params]
    if method == "sam":
        e = sam_perturbation(params, g, rho=0.2)
    else:
        e = zsharp_global_perturbation(g, rho=0.2, percentile=60)
    with order_stats.strategy(strategy):
        opt.first_step()
        stats = opt.stats.pop()
    opt.restore()
    numel = sum(t.numel() for t in g)
    moved = exact_count(e)
    if method == "sam":
        assert moved == exact_count(g) < numel  # every non-zero entry; the dead units' stay
        kept = numel  # SAM's direction keeps every entry
    else:
        assert 0 < moved < exact_count(g)  # the filter drops some (the reference's mask: no ties here)
        kept = moved
    assert stats["sharpness/grad_norm"] == pytest.approx(float(torch.cat([t.reshape(-1) for t in g]).norm()), rel=1e-6)
    assert stats["sharpness/perturbation_norm"] == pytest.approx(0.2, rel=1e-5)
    assert stats["sharpness/perturbed_fraction"] == pytest.approx(kept / numel, rel=1e-6)
