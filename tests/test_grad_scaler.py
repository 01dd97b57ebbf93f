"""Closure-aware loss scaling: overflow in either pass skips the step with weights untouched."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from zsharp_algos import SAM, ClosureGradScaler, ZSharp

from test_optimizer import batches, closure_for, flat_state, make_model


def scaled_closure(model, opt, scaler, x, y, inject_inf_on=(), calls=None):
    calls = [] if calls is None else calls

    def closure():
        calls.append(1)
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        scaler.scale(loss).backward()
        if len(calls) in inject_inf_on:
            next(model.parameters()).grad[0, 0] = float("inf")
        return loss

    return closure


@pytest.mark.parametrize("opt_cls", [SAM, ZSharp])
@pytest.mark.parametrize("bad_pass", [1, 2])
def test_overflow_in_either_pass_skips_step(opt_cls, bad_pass):
    model = make_model()
    opt = opt_cls(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, model=model)
    scaler = ClosureGradScaler(init_scale=1024.0)
    x, y = batches(1)[0]
    params_before = [p.detach().clone() for p in model.parameters()]
    calls = []
    assert scaler.step(opt, scaled_closure(model, opt, scaler, x, y, {bad_pass}, calls)) is None
    scaler.update()
    assert len(calls) == bad_pass  # an overflowing first pass does not run the second
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), params_before))
    assert not opt.state and opt.step_count == 0  # no momentum, interval phase unchanged
    assert scaler.get_scale() == 512.0 and scaler.skipped_steps == 1
    # the next, clean step goes through
    assert scaler.step(opt, scaled_closure(model, opt, scaler, x, y)) is not None
    scaler.update()
    assert opt.step_count == 1 and scaler.get_scale() == 512.0


def test_scaled_step_equals_unscaled_step():
    """Power-of-two scales unscale exactly: the same weights as training without a scaler."""
    a, b = make_model(), make_model()
    opt_a = ZSharp(a.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, model=a, max_grad_norm=1.0)
    opt_b = ZSharp(b.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, model=b, max_grad_norm=1.0)
    scaler = ClosureGradScaler(init_scale=2.0**10, growth_interval=2)
    for x, y in batches(5):
        scaler.step(opt_a, scaled_closure(a, opt_a, scaler, x, y))
        scaler.update()
        opt_b.step(closure_for(b, opt_b, x, y))
    assert torch.equal(flat_state(a), flat_state(b))
    assert scaler.get_scale() == 2.0**12  # grew twice in five clean steps


def test_plain_optimizer_and_disabled_scaler():
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = ClosureGradScaler(init_scale=8.0)
    x, y = batches(1)[0]
    before = [p.detach().clone() for p in model.parameters()]
    assert scaler.step(opt, scaled_closure(model, opt, scaler, x, y, {1})) is None
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert scaler.step(opt, scaled_closure(model, opt, scaler, x, y)) is not None
    assert not all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    off = ClosureGradScaler(enabled=False)
    loss = off.step(opt, scaled_closure(model, opt, off, x, y))
    assert loss is not None and off.scale(loss) is loss


def test_state_dict_round_trip():
    model = make_model()
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    scaler = ClosureGradScaler(init_scale=64.0, growth_interval=3)
    x, y = batches(1)[0]
    scaler.step(opt, scaled_closure(model, opt, scaler, x, y, {2}))
    scaler.update()
    state = scaler.state_dict()
    assert state["scale"] == 32.0 and all(isinstance(v, (int, float)) for v in state.values())
    fresh = ClosureGradScaler()
    fresh.load_state_dict(state)
    assert fresh.get_scale() == 32.0 and fresh.state_dict() == state


@pytest.mark.parametrize("kwargs", [dict(init_scale=0), dict(growth_factor=1.0), dict(backoff_factor=1.5),
                                    dict(growth_interval=0)])
def test_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        ClosureGradScaler(**kwargs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("bad_pass", [0, 1, 2])
def test_cuda_fp16_autocast(bad_pass):
    model = make_model().cuda()
    opt = ZSharp(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, model=model)
    scaler = ClosureGradScaler()
    x, y = (t.cuda() for t in batches(1)[0])
    before = [p.detach().clone() for p in model.parameters()]
    calls = []

    def closure():
        calls.append(1)
        opt.zero_grad()
        with torch.autocast("cuda", dtype=torch.float16):
            loss = nn.functional.cross_entropy(model(x), y)
        scaler.scale(loss).backward()
        if len(calls) == bad_pass:
            next(model.parameters()).grad[0, 0] = float("inf")
        return loss

    loss = scaler.step(opt, closure)
    scaler.update()
    unchanged = all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert (loss is None) == (bad_pass > 0) == unchanged
    assert torch.isfinite(flat_state(model)).all()
