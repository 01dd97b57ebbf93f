"""Memory claims of the README, counted op by op over tensors (``benchmarks/common.py``'s
``TensorMemory``, the CPU side of the memory benchmarks): SAM keeps no buffer and peaks one
parameter size above SGD; ZSharp keeps one float32 buffer and its filter's temporaries stay
a small fraction of the parameter bytes, on a single large tensor too."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from common import TensorMemory, memory_of  # noqa: E402

from zsharp_algos import SAM, ZSharp  # noqa: E402

CPU = torch.device("cpu")


def test_tensor_memory_counts_allocations_and_frees():
    kept = [torch.ones(1000)]  # exists before the mode (4000 bytes): freeing it counts out

    with TensorMemory(CPU) as mem:
        a = torch.empty(2000)  # +8000
        b = a * 2  # +8000: 16000 live
        del a  # 8000
        c = b[:1000] + kept[0]  # +4000: 12000, peak still 16000
        kept.clear()  # read by an op above, so watched: 8000
        assert (mem.peak, mem.live) == (16000, 8000)
        del b, c
        assert mem.live == -4000
    assert memory_of(lambda: torch.empty(10).add_(1), CPU) == (40, 0)


@pytest.mark.parametrize("scope", ["global", "tensor"])
def test_zsharp_filter_temporaries_stay_small_on_one_large_tensor(scope):
    torch.manual_seed(0)
    p = nn.Parameter(torch.randn(2048, 2048))
    grad = torch.randn_like(p)
    opt = ZSharp(torch.optim.SGD([p], lr=0.1), rho=0.05, scope=scope)
    param_bytes = p.numel() * 4

    def first_step_and_restore():
        p.grad = grad.clone()
        opt.first_step(zero_grad=True)
        opt.restore()

    peak, kept = memory_of(first_step_and_restore, CPU)  # allocates the persistent buffer
    # the buffer (the gradient copy is freed by zero_grad); a few bytes of 0-dim tensors aside
    assert kept == pytest.approx(param_bytes, abs=1024)
    p.grad = grad.clone()
    with TensorMemory(CPU) as mem:
        opt.first_step(zero_grad=True)
        opt.restore()
    # nothing persistent is added; the gradient is freed (w' lives in the buffer)
    assert mem.live == pytest.approx(-param_bytes, abs=1024)
    assert mem.peak < 0.2 * param_bytes  # |z| is in the buffer; the select streams bounded pieces


def _train_two_steps(make_opt):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))
    x, y = torch.randn(8, 256), torch.randint(0, 10, (8,))
    opt = make_opt(model)

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    peak, kept = memory_of(lambda: (opt.step(closure), opt.step(closure)), CPU)
    return peak, kept, sum(p.numel() * 4 for p in model.parameters())


def test_whole_step_memory_beyond_sgd():
    sgd = _train_two_steps(lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9))
    sam = _train_two_steps(lambda m: SAM(torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9), rho=0.05))
    zsharp = _train_two_steps(lambda m: ZSharp(torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9), rho=0.05))
    param_bytes = sgd[2]
    # SAM: w' lives in the first gradient's memory during the second backward, nothing is kept
    assert sam[1] - sgd[1] == pytest.approx(0, abs=1024)
    assert sam[0] - sgd[0] == pytest.approx(param_bytes, rel=0.01)
    # ZSharp: the one persistent buffer, and a transient peak under half the parameter bytes beyond
    # it (here 0.38: this model is smaller than the filter's smallest scan chunk; 0.04 on resnet18)
    assert zsharp[1] - sgd[1] == pytest.approx(param_bytes, abs=1024)
    assert param_bytes <= zsharp[0] - sgd[0] < 1.5 * param_bytes
