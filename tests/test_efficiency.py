"""Sharpness-aware training below two passes a step: random intervals (RST) and LookSAM reuse.

References: hand-written loops with plain SGD without momentum, so that each step's gradient
is read off the weights (``(w_t - w_{t+1}) / lr``), in float64 where that makes the comparison
exact; the schedule's decisions against their stated properties; an uninterrupted run for resume.
"""
from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

from zsharp_algos import SAM, ZSharp, create_optimizer
from zsharp_algos.rules import REUSE_KEY
from zsharp_algos.schedule import sharpness_due, uniform

from reference import sam_perturbation, sharpness_step, zsharp_global_perturbation
from test_optimizer import closure_for

LR, RHO, ALPHA = 0.1, 0.05, 0.7


def tiny(seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).to(dtype)


def batch(t, dtype=torch.float64):
    gen = torch.Generator().manual_seed(1000 + t)
    return torch.randn(16, 5, generator=gen).to(dtype), torch.randint(0, 3, (16,), generator=gen)


def loss_at(model, params_values, x, y):
    """The loss and its gradient at weights ``params_values`` (the model's weights are restored)."""
    saved = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        for p, v in zip(model.parameters(), params_values):
            p.copy_(v)
    model.zero_grad(set_to_none=True)
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    grads = [p.grad.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        for p, v in zip(model.parameters(), saved):
            p.copy_(v)
    return loss.detach(), grads


def flat(ts):
    return torch.cat([t.reshape(-1) for t in ts])


def reference_run(steps, due, perturbation, reuse=True):
    """A hand-written LookSAM loop (Liu et al., CVPR 2022) over plain SGD without momentum.
    Returns the weights after every step and, per step, the g_v in force after it."""
    model = tiny()
    w = [p.detach().clone() for p in model.parameters()]
    g_v = None
    history = []
    for t in range(steps):
        x, y = batch(t)
        _, g = loss_at(model, w, x, y)
        if due(t):
            e = perturbation(w, g)
            _, g_s = loss_at(model, [wi + ei for wi, ei in zip(w, e)], x, y)
            fg, fs = flat(g), flat(g_s)
            g_v = [s - (fg @ fs) / (fg @ fg) * gi for s, gi in zip(g_s, g)]
            used = g_s
        elif reuse and g_v is not None:
            fg, fv = flat(g), flat(g_v)
            used = [gi + ALPHA * fg.norm() / fv.norm() * vi for gi, vi in zip(g, g_v)]
        else:
            used = g
        w = [wi - LR * u for wi, u in zip(w, used)]
        history.append(([wi.clone() for wi in w], None if g_v is None else [v.clone() for v in g_v], used))
    return history


def run_steps(opt, model, steps, start=0, state_key=REUSE_KEY):
    """Steps ``start`` to ``steps`` on the batches above: per step, the weights after it, the
    optimizer state ``state_key`` of every parameter (None before it exists), and the gradient
    the step used, read off the weights (plain SGD, no momentum)."""
    out = []
    for t in range(start, steps):
        x, y = batch(t)
        before = [p.detach().clone() for p in model.parameters()]
        opt.step(closure_for(model, opt, x, y))
        used = [(b - p.detach()) / LR for b, p in zip(before, model.parameters())]
        state = [opt.state[p].get(state_key) for p in model.parameters()]
        out.append(([p.detach().clone() for p in model.parameters()],
                    None if state[0] is None else [None if s is None else s.clone() for s in state], used))
    return out


def run_ours(opt_factory, steps, start=0, model=None, opt=None):
    model = model if model is not None else tiny()
    opt = opt if opt is not None else opt_factory(model)
    return run_steps(opt, model, steps, start), model, opt


def assert_runs_equal(got, want, tol=1e-12):
    for t, ((w1, v1, u1), (w2, v2, u2)) in enumerate(zip(got, want)):
        for a, b in zip(u1, u2):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=tol, msg=f"step {t}: the gradient stepped with")
        for a, b in zip(w1, w2):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=tol, msg=f"step {t}: weights")
        # before the first sharpness step the reference has no g_v, ours a zero one (adding nothing)
        v2 = v2 if v2 is not None else [torch.zeros_like(w) for w in w2]
        for a, b in zip(v1, v2):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=tol, msg=f"step {t}: stored g_v")


# --------------------------------------------------------------------------- LookSAM
@pytest.mark.parametrize("interval", [1, 3])
def test_looksam_with_sam_matches_the_hand_written_loop(interval):
    steps = 8
    want = reference_run(steps, lambda t: (t + 1) % interval == 0, lambda w, g: sam_perturbation(w, g, RHO))
    got, _, _ = run_ours(lambda m: SAM(m.parameters(), torch.optim.SGD, lr=LR, rho=RHO, interval=interval,
                                       reuse="looksam", reuse_alpha=ALPHA), steps)
    assert_runs_equal(got, want)
    if interval == 3:  # before the first sharpness step (step 2): plain g, g_v zero
        assert not any(v.any() for t in (0, 1) for v in got[t][1]) and all(v.any() for v in got[2][1][::2])


def test_looksam_with_zsharp_uses_zsharps_perturbation():
    steps, interval = 7, 2
    want = reference_run(steps, lambda t: (t + 1) % interval == 0, lambda w, g: zsharp_global_perturbation(g, RHO, 70))
    got, _, _ = run_ours(lambda m: ZSharp(m.parameters(), torch.optim.SGD, lr=LR, rho=RHO, interval=interval,
                                          reuse="looksam", reuse_alpha=ALPHA), steps)
    assert_runs_equal(got, want, tol=1e-10)


def test_reuse_none_is_plain_steps_between_sharpness_steps():
    steps, interval = 6, 3
    want = reference_run(steps, lambda t: (t + 1) % interval == 0, lambda w, g: sam_perturbation(w, g, RHO), reuse=False)
    got, _, _ = run_ours(lambda m: SAM(m.parameters(), torch.optim.SGD, lr=LR, rho=RHO, interval=interval), steps)
    for (w1, _, _), (w2, _, _) in zip(got, want):
        for a, b in zip(w1, w2):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_plain_steps_cost_one_pass_and_g_v_is_orthogonal_to_g():
    model = tiny()
    opt = SAM(model.parameters(), torch.optim.SGD, lr=LR, rho=RHO, interval=4, reuse="looksam")
    passes = []
    for t in range(8):
        calls = []
        opt.step(closure_for(model, opt, *batch(t), calls))
        passes.append(len(calls))
    assert passes == [1, 1, 1, 2, 1, 1, 1, 2]


def test_looksam_state_resumes_bitwise():
    make = lambda m: ZSharp(m.parameters(), torch.optim.SGD, lr=LR, rho=RHO, interval=3, reuse="looksam",  # noqa: E731
                            interval_mode="random", interval_seed=7)
    whole, _, _ = run_ours(make, 12)
    first, model, opt = run_ours(make, 5)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    model2 = tiny(seed=3)
    model2.load_state_dict(saved["model"])
    opt2 = make(model2)
    opt2.load_state_dict(saved["opt"])
    rest, _, _ = run_ours(None, 12, start=5, model=model2, opt=opt2)
    for (w1, v1, _), (w2, v2, _) in zip(first + rest, whole):
        assert all(torch.equal(a, b) for a, b in zip(w1, w2))
        assert all(torch.equal(a, b) for a, b in zip(v1, v2))


def test_looksam_options_are_checked_and_per_group():
    model = tiny()
    with pytest.raises(ValueError, match="reuse must be 'none' or 'looksam'"):
        SAM(model.parameters(), torch.optim.SGD, lr=LR, reuse="look")
    with pytest.raises(ValueError, match="reuse_alpha must be a finite number >= 0"):
        SAM(model.parameters(), torch.optim.SGD, lr=LR, reuse_alpha=-1)
    with pytest.raises(ValueError, match="interval_mode must be 'fixed' or 'random'"):
        SAM(model.parameters(), torch.optim.SGD, lr=LR, interval_mode="rst")
    weights = [p for p in model.parameters() if p.dim() > 1]
    biases = [p for p in model.parameters() if p.dim() == 1]
    opt = create_optimizer("sam", [{"params": weights, "reuse": "looksam"}, {"params": biases}], lr=LR, interval=2)
    assert [g["sharpness_reuse"] for g in opt.param_groups] == ["looksam", "none"]
    assert opt.first_pass_must_sync and not SAM(tiny().parameters(), torch.optim.SGD, lr=LR).first_pass_must_sync
    run_steps(opt, model, 4)
    assert all(opt.state[p][REUSE_KEY].any() for p in weights) and not any(REUSE_KEY in opt.state[p] for p in biases)


# --------------------------------------------------------------------------- random intervals
@pytest.mark.parametrize("interval", [2, 5, 10])
def test_random_decisions_have_the_share_are_not_periodic_and_are_pure(interval):
    n = 20_000
    decisions = [sharpness_due(t, interval, "random", seed=3) for t in range(n)]
    share = sum(decisions) / n
    assert abs(share - 1 / interval) < 4 * (1 / interval * (1 - 1 / interval) / n) ** 0.5  # four sigmas
    gaps = [b - a for a, b in zip([t for t, d in enumerate(decisions) if d], [t for t, d in enumerate(decisions) if d][1:])]
    assert len(set(gaps)) > 5  # not every k-th step
    # consecutive decisions are independent: P(due at t+1 | due at t) is the share itself
    both = sum(a and b for a, b in zip(decisions, decisions[1:])) / max(1, sum(decisions[:-1]))
    assert abs(both - 1 / interval) < 0.05
    assert decisions == [sharpness_due(t, interval, "random", seed=3) for t in range(n)]  # reproducible
    assert [sharpness_due(t, interval, "random", seed=3) for t in reversed(range(100))][::-1] == decisions[:100]
    assert decisions[:200] != [sharpness_due(t, interval, "random", seed=4) for t in range(200)]  # the seed matters
    assert all(0 <= uniform(s, t) < 1 for s in (0, 2**62) for t in (0, 1, 2**40))


def test_random_interval_optimizer_decides_by_seed_and_step():
    model = tiny()
    a = SAM(model.parameters(), torch.optim.SGD, lr=LR, interval=3, interval_mode="random", interval_seed=11)
    b = SAM(tiny().parameters(), torch.optim.SGD, lr=LR, interval=3, interval_mode="random", interval_seed=11)
    seen = []
    for t in range(30):
        a.step_count = b.step_count = t
        seen.append(a.is_sharpness_step())
        assert a.is_sharpness_step() == b.is_sharpness_step() == sharpness_due(t, 3, "random", 11)
    assert 3 <= sum(seen) <= 18
    a.schedule = lambda: 17  # a framework's own counter
    assert a.is_sharpness_step() == sharpness_due(17, 3, "random", 11)


def test_looksam_over_adam_leaves_adams_lazy_state_alone():
    """Adam creates its state when a parameter's entry is empty: g_v, made before Adam's first
    step, must not stop that (its steps equal a hand-written SAM step over Adam)."""
    ours, ref = tiny(), tiny()
    opt = SAM(ours.parameters(), torch.optim.Adam, lr=1e-3, rho=RHO, reuse="looksam")
    ref_opt = torch.optim.Adam(ref.parameters(), lr=1e-3)
    for t in range(3):
        x, y = batch(t)
        opt.step(closure_for(ours, opt, x, y))
        sharpness_step(ref, lambda m: nn.functional.cross_entropy(m(x), y), ref_opt,
                       lambda p, g: sam_perturbation(p, g, RHO), bn_frozen=False)
    for p, q in zip(ours.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)
        assert {"exp_avg", "exp_avg_sq", "step", REUSE_KEY} <= set(opt.state[p])
