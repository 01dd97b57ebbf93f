"""Where the perturbed weights w' = w + e live: in the first-pass gradient's memory with the
parameter re-pointed at it (``step()``), or in place with w saved (shared storage, gradient
views, ``first_step(zero_grad=False)``). Both must give the same bits and restore w exactly."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from zsharp_algos import SAM, ZSharp
from zsharp_algos.placement import Placement, storage_sole_owner

from test_optimizer import batches, closure_for, flat_state, make_model


def _moved(params, ptrs) -> list[bool]:
    """Which parameters point at other memory than they did (re-pointed at w')."""
    return [p.data_ptr() != ptr for p, ptr in zip(params, ptrs)]


def test_sole_owner_reads_torch_storage_use_count():
    own = torch.randn(3, 4)
    assert storage_sole_owner(own)
    view = own[1]
    assert not storage_sole_owner(view) and not storage_sole_owner(own)  # shared now
    assert not storage_sole_owner(torch.randn(8)[2:])


def _first_pass(model, x, y):
    model.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(model(x), y).backward()


@pytest.mark.parametrize("cls", [SAM, ZSharp])
def test_repointed_and_in_place_perturbations_are_the_same_bits(cls):
    x, y = batches(1)[0]
    a, b = make_model(), make_model()
    opt_a = cls(torch.optim.SGD(a.parameters(), lr=0.1))
    opt_b = cls(torch.optim.SGD(b.parameters(), lr=0.1))
    w = [p.detach().clone() for p in a.parameters()]
    ptrs = [p.data_ptr() for p in b.parameters()]
    _first_pass(a, x, y)
    _first_pass(b, x, y)

    opt_a.first_step(zero_grad=False)  # in place: the gradients hold e
    opt_b.first_step(zero_grad=True)  # re-pointed: w' built in the gradients' memory
    assert all(_moved(b.parameters(), ptrs))
    assert not any(_moved(a.parameters(), [p.data_ptr() for p in a.parameters()]))
    for pa, pb, w0 in zip(a.parameters(), b.parameters(), w):
        # w' = w + e (on the CPU one fused multiply-add, w + c * d: within a rounding of the sum)
        torch.testing.assert_close(pa, w0 + pa.grad, rtol=2**-23, atol=0)
        assert torch.equal(pb, pa)  # the two placements: the same bits
        assert pb.grad is None

    opt_a.restore()
    opt_b.restore()
    for pa, pb, w0, ptr in zip(a.parameters(), b.parameters(), w, ptrs):
        assert torch.equal(pa, w0) and torch.equal(pb, w0)
        assert pb.data_ptr() == ptr  # the parameter's own memory, not a copy


def test_training_is_identical_without_repointing():
    """The fallback (save + perturb in place + copy back: what runs where torch does not report
    storage use counts) trains to the same bits."""
    runs = []
    for allow in (True, False):
        model = make_model()
        opt = ZSharp(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, model=model)
        if not allow:
            opt.engine.placement = Placement(sole_owner=lambda t: False)
        ptrs = [p.data_ptr() for p in model.parameters()]
        repointed = []
        for x, y in batches(5):
            closure = closure_for(model, opt, x, y)
            opt.step(lambda: (repointed.append(any(_moved(model.parameters(), ptrs))), closure())[1])
        runs.append(flat_state(model))
        assert repointed == [False, allow] * 5  # seen by each step's two closure calls
    assert torch.equal(runs[0], runs[1])


class _FlatBacked(nn.Module):
    """Weights that are views of one flat tensor, which is what the optimizer is given (the
    layout of contiguous-parameter tricks): re-pointing the flat tensor would leave the model's
    views at w and silently make the second pass a first pass again."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.flat = torch.randn(6 * 3 + 3)
        self.weight = nn.Parameter(self.flat[:18].view(3, 6))
        self.bias = nn.Parameter(self.flat[18:])

    def forward(self, x):
        return nn.functional.linear(x, self.weight, self.bias)

    def gather_grads(self):
        self.flat.grad = torch.cat([self.weight.grad.flatten(), self.bias.grad])


def test_parameters_backed_by_shared_storage_are_perturbed_in_place():
    model = _FlatBacked()
    opt = SAM(torch.optim.SGD([model.flat], lr=0.1))
    x, y = batches(1)[0]
    w = model.flat.clone()
    _first_pass(model, x, y)
    model.gather_grads()
    e = model.flat.grad * (0.05 / (model.flat.grad.norm() + 1e-12))
    ptr = model.flat.data_ptr()
    opt.first_step(zero_grad=True)
    assert model.flat.data_ptr() == ptr
    assert torch.equal(torch.cat([model.weight.detach().flatten(), model.bias.detach()]), w + e)  # the model sees w'
    opt.restore()
    assert torch.equal(model.flat, w) and torch.equal(model.weight.detach().flatten(), w[:18])


def test_gradient_views_are_never_adopted_as_weights():
    """DDP's gradient_as_bucket_view makes each .grad a view of a bucket it writes every
    backward: weights living there would be overwritten."""
    model = make_model()
    opt = SAM(torch.optim.SGD(model.parameters(), lr=0.1))
    x, y = batches(1)[0]
    _first_pass(model, x, y)
    params = list(model.parameters())
    bucket = torch.cat([p.grad.flatten() for p in params])
    offset = 0
    for p in params:
        p.grad = bucket[offset : offset + p.numel()].view_as(p)
        offset += p.numel()
    ptrs = [p.data_ptr() for p in params]
    opt.first_step(zero_grad=True)
    assert not any(_moved(params, ptrs))
    perturbed = [p.detach().clone() for p in params]
    bucket.fill_(1e3)  # the next backward's all-reduce
    assert all(torch.equal(p, q) for p, q in zip(params, perturbed))
    opt.restore()


def test_channels_last_parameter_keeps_its_layout():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3).to(memory_format=torch.channels_last)
    ref = copy.deepcopy(conv)
    opt = SAM(torch.optim.SGD(conv.parameters(), lr=0.1))
    ref_opt = SAM(torch.optim.SGD(ref.parameters(), lr=0.1))
    x = torch.randn(2, 3, 8, 8).to(memory_format=torch.channels_last)
    for m in (conv, ref):
        m(x).square().sum().backward()
    strides = conv.weight.stride()
    opt.first_step(zero_grad=True)
    ref_opt.first_step(zero_grad=False)
    assert conv.weight.stride() == strides
    assert torch.equal(conv.weight, ref.weight)
    opt.restore()
    ref_opt.restore()
    assert conv.weight.stride() == strides and torch.equal(conv.weight, ref.weight)


def test_zsharp_builds_w_prime_in_its_buffer_so_the_peak_stays_one_buffer():
    """ZSharp keeps a parameter-sized |z| buffer anyway: w' goes there (|z| is dead by then) and
    the first-pass gradients are freed, so the second backward runs with w, that buffer and its
    own gradients, as with SAM's w, w' and gradients."""
    model, twin = make_model(), make_model()
    opt = ZSharp(torch.optim.SGD(model.parameters(), lr=0.1))
    twin_opt = ZSharp(torch.optim.SGD(twin.parameters(), lr=0.1))
    x, y = batches(1)[0]
    _first_pass(model, x, y)
    _first_pass(twin, x, y)
    twin_opt.first_step(zero_grad=False)  # in place: w' in the parameters' own memory
    grads = [p.grad for p in model.parameters()]
    w = [p.detach().clone() for p in model.parameters()]
    ptrs = [p.data_ptr() for p in model.parameters()]
    grad_memory = {g.data_ptr() for g in grads}
    opt.first_step(zero_grad=True)
    assert all(_moved(model.parameters(), ptrs))  # all re-pointed ...
    assert not any(p.data_ptr() in grad_memory for p in model.parameters())  # ... not into the gradients
    assert opt.engine.placement.buffer.nbytes == sum(p.numel() * 4 for p in w)  # but into the one buffer
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), twin.parameters()))
    opt.restore()
    assert not any(_moved(model.parameters(), ptrs))
