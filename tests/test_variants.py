"""The SAM family on the one engine: FriendlySAM, GSAM, GCSAM and their composition with
ZSharp's filter, against hand-written references (float64, plain SGD without momentum so each
step's gradient is read off the weights), the ZSharp paper's official FriendlySAM (as
tests/reference.py transcribes its description), and the capabilities every optimizer has
(closure and manual steps, interval, per-group rho, fp16 overflow, resume, BatchNorm)."""
from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

from zsharp_algos import GCSAM, GSAM, SAM, ClosureGradScaler, FriendlySAM, ZSharp, create_optimizer
from zsharp_algos.rules import FRIENDLY_KEY

from reference import PaperFriendlySAM, centred, sam_perturbation, zsharp_global_perturbation
from test_efficiency import batch, flat, loss_at, run_steps, tiny
from test_grad_scaler import scaled_closure
from test_optimizer import batches, closure_for, make_model

LR, RHO, SIGMA, LMBDA, ALPHA = 0.1, 0.05, 1.0, 0.9, 0.2


def reference_run(steps, variant, filtered=False):
    """Hand-written steps of ``variant`` (SAM's scaling, or ZSharp's global filter when
    ``filtered``), plain SGD without momentum. Per step: the weights and the gradient stepped with."""
    model = tiny()
    w = [p.detach().clone() for p in model.parameters()]
    m = None
    out = []
    for t in range(steps):
        x, y = batch(t)
        _, g = loss_at(model, w, x, y)
        if variant == "friendly":
            d = g if m is None else [gi - SIGMA * mi for gi, mi in zip(g, m)]
        elif variant == "gcsam":
            d = [centred(gi) for gi in g]
        else:
            d = g
        e = zsharp_global_perturbation(d, RHO, 70) if filtered else sam_perturbation(w, d, RHO)
        _, g_s = loss_at(model, [wi + ei for wi, ei in zip(w, e)], x, y)
        used = g_s
        if variant == "gsam":
            fg, fs = flat(g), flat(g_s)
            g_perp = [gi - (fg @ fs) / (fs @ fs) * si for gi, si in zip(g, g_s)]
            used = [si - ALPHA * pi for si, pi in zip(g_s, g_perp)]
        if variant == "friendly":
            m = [gi.clone() for gi in g] if m is None else [LMBDA * mi + (1 - LMBDA) * gi for mi, gi in zip(m, g)]
        w = [wi - LR * u for wi, u in zip(w, used)]
        out.append(([wi.clone() for wi in w], used, None if m is None else [mi.clone() for mi in m]))
    return out


def run(opt, model, steps):
    """Per step: the weights, the gradient stepped with, FriendlySAM's ``m`` (as reference_run)."""
    return [(w, used, m) for w, m, used in run_steps(opt, model, steps, state_key=FRIENDLY_KEY)]


def assert_same(got, want, tol=1e-11):
    for t, ((w1, u1, m1), (w2, u2, m2)) in enumerate(zip(got, want)):
        for a, b in zip(u1, u2):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=tol, msg=f"step {t}: the step's gradient")
        for a, b in zip(w1, w2):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=tol, msg=f"step {t}: weights")
        assert (m1 is None) == (m2 is None)
        for a, b in zip(m1 or [], m2 or []):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=tol, msg=f"step {t}: FriendlySAM's m")


MAKERS = {
    "friendly": lambda m, **kw: FriendlySAM(m.parameters(), torch.optim.SGD, lr=LR, rho=RHO, sigma=SIGMA, lmbda=LMBDA, **kw),
    "gsam": lambda m, **kw: GSAM(m.parameters(), torch.optim.SGD, lr=LR, rho=RHO, alpha=ALPHA, **kw),
    "gcsam": lambda m, **kw: GCSAM(m.parameters(), torch.optim.SGD, lr=LR, rho=RHO, **kw),
}


@pytest.mark.parametrize("variant", ["friendly", "gsam", "gcsam"])
def test_each_variant_matches_its_hand_written_reference(variant):
    model = tiny()
    assert_same(run(MAKERS[variant](model), model, 6), reference_run(6, variant))


@pytest.mark.parametrize("variant", ["friendly", "gsam", "gcsam"])
def test_zsharp_filters_each_variants_direction(variant):
    model = tiny()
    own = {"friendly": dict(sigma=SIGMA, lmbda=LMBDA), "gsam": dict(alpha=ALPHA), "gcsam": {}}[variant]
    opt = ZSharp(model.parameters(), torch.optim.SGD, lr=LR, rho=RHO, variant=variant, **own)
    assert_same(run(opt, model, 5), reference_run(5, variant, filtered=True), tol=1e-10)


def test_the_same_variant_through_sam_and_its_class():
    a, b = tiny(), tiny()
    assert_same(run(SAM(a.parameters(), torch.optim.SGD, lr=LR, rho=RHO, variant="gsam", alpha=ALPHA), a, 4),
                run(MAKERS["gsam"](b), b, 4), tol=0)
    opt = create_optimizer("friendlysam", tiny().parameters(), lr=LR, sigma=0.5)
    assert isinstance(opt, FriendlySAM) and opt.param_groups[0]["sharpness_sigma"] == 0.5


@pytest.mark.parametrize("base", ["sgd", "adam"])
def test_friendlysam_steps_as_the_zsharp_papers_official_code(base):
    """float32, 8 steps, a momentum-SGD or Adam base (the paper's): within float32 round-off."""
    torch.manual_seed(0)
    ours_model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 4))
    ref_model = copy.deepcopy(ours_model)
    make_base = {"sgd": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9),
                 "adam": lambda ps: torch.optim.Adam(ps, lr=1e-3)}[base]
    ours = FriendlySAM(make_base(ours_model.parameters()), rho=0.05)
    ref = PaperFriendlySAM(ref_model.parameters(), make_base(ref_model.parameters()), rho=0.05)
    gen = torch.Generator().manual_seed(1)
    for _ in range(8):
        x, y = torch.randn(32, 10, generator=gen), torch.randint(0, 4, (32,), generator=gen)
        ours.step(closure_for(ours_model, ours, x, y))
        ref_model.zero_grad()
        nn.functional.cross_entropy(ref_model(x), y).backward()
        ref.first_step()
        ref_model.zero_grad()
        nn.functional.cross_entropy(ref_model(x), y).backward()
        ref.second_step()
    for a, b in zip(ours_model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for p, q in zip(ours_model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(ours.state[p][FRIENDLY_KEY], ref.momentum[q], rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------------------- the capabilities every optimizer has
VARIANT_OPTS = {
    "friendly": lambda ps, **kw: FriendlySAM(ps, torch.optim.SGD, lr=0.1, momentum=0.9, **kw),
    "gsam": lambda ps, **kw: GSAM(ps, torch.optim.SGD, lr=0.1, momentum=0.9, **kw),
    "gcsam": lambda ps, **kw: GCSAM(ps, torch.optim.SGD, lr=0.1, momentum=0.9, **kw),
    "zsharp_friendly": lambda ps, **kw: ZSharp(ps, torch.optim.SGD, lr=0.1, momentum=0.9, variant="friendly", **kw),
    "zsharp_gsam": lambda ps, **kw: ZSharp(ps, torch.optim.SGD, lr=0.1, momentum=0.9, variant="gsam", **kw),
}


def sharp_state(opt):
    return {k: [v.clone() for v in (s.get(k) for s in opt.state.values()) if v is not None]
            for k in (FRIENDLY_KEY, "momentum_buffer")}


@pytest.mark.parametrize("name", list(VARIANT_OPTS))
@pytest.mark.parametrize("bad_pass", [1, 2])
def test_fp16_overflow_in_either_pass_leaves_weights_and_variant_state_as_they_were(name, bad_pass):
    model = make_model()
    opt = VARIANT_OPTS[name](model.parameters(), model=model)
    scaler = ClosureGradScaler(init_scale=1024.0)
    (x, y), (x2, y2) = batches(2)
    assert scaler.step(opt, scaled_closure(model, opt, scaler, x, y)) is not None  # a clean step: state exists
    scaler.update()
    weights, state = [p.detach().clone() for p in model.parameters()], sharp_state(opt)
    assert state[FRIENDLY_KEY] or "friendly" not in name
    assert scaler.step(opt, scaled_closure(model, opt, scaler, x2, y2, {bad_pass})) is None
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights))
    after = sharp_state(opt)
    assert all(torch.equal(a, b) for k in state for a, b in zip(after[k], state[k])) and opt.skipped_steps == 1


@pytest.mark.parametrize("name", list(VARIANT_OPTS))
def test_resume_is_bitwise_and_manual_steps_equal_closure_steps(name):
    data = batches(6)
    a = make_model()
    opt_a = VARIANT_OPTS[name](a.parameters(), model=a, interval=2)
    b = copy.deepcopy(a)
    opt_b = VARIANT_OPTS[name](b.parameters(), model=b, interval=2)
    for i, (x, y) in enumerate(data):
        opt_a.step(closure_for(a, opt_a, x, y))
        if i == 2:  # checkpoint b halfway and continue it in fresh objects
            buffer = io.BytesIO()
            torch.save({"model": b.state_dict(), "opt": opt_b.state_dict()}, buffer)
            buffer.seek(0)
            saved = torch.load(buffer, weights_only=True)
            b = make_model(seed=5)
            b.load_state_dict(saved["model"])
            opt_b = VARIANT_OPTS[name](b.parameters(), model=b, interval=2)
            opt_b.load_state_dict(saved["opt"])
        nn.functional.cross_entropy(b(x), y).backward()  # the manual two-step loop
        if opt_b.is_sharpness_step():
            opt_b.first_step(zero_grad=True)
            from zsharp_algos import frozen_norm_stats
            with frozen_norm_stats(b):
                nn.functional.cross_entropy(b(x), y).backward()
            opt_b.second_step(zero_grad=True)
        else:
            opt_b.step()
            opt_b.zero_grad()
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k  # weights and BatchNorm statistics
    assert opt_a.step_count == opt_b.step_count == 6


def test_per_group_rho_and_state_only_where_perturbed():
    model = make_model(bn=False)
    weights = [p for p in model.parameters() if p.dim() > 1]
    biases = [p for p in model.parameters() if p.dim() == 1]
    opt = FriendlySAM([{"params": weights}, {"params": biases, "rho": 0.0}], torch.optim.SGD, lr=0.1)
    for x, y in batches(2):
        opt.step(closure_for(model, opt, x, y))
    assert all(FRIENDLY_KEY in opt.state[p] for p in weights) and not any(FRIENDLY_KEY in opt.state[p] for p in biases)


def test_e_has_norm_rho_for_gcsam_the_centred_direction():
    model = make_model(bn=False)
    opt = GCSAM(model.parameters(), torch.optim.SGD, lr=0.1, rho=0.3)
    x, y = batches(1)[0]
    nn.functional.cross_entropy(model(x), y).backward()
    before = [p.detach().clone() for p in model.parameters()]
    opt.first_step()
    e = flat([p.detach() - w for p, w in zip(model.parameters(), before)])
    assert float(e.norm()) == pytest.approx(0.3, rel=1e-5)
    assert opt.stats.pop()["sharpness/perturbation_norm"] == pytest.approx(0.3, rel=1e-5)


def test_variant_options_are_refused_where_they_do_nothing():
    ps = tiny().parameters()
    with pytest.raises(TypeError, match="alpha is the option of variant='gsam'"):
        SAM(ps, torch.optim.SGD, lr=LR, alpha=0.1)
    with pytest.raises(TypeError, match="GCSAM does not take 'sigma'"):
        GCSAM(tiny().parameters(), torch.optim.SGD, lr=LR, sigma=0.5)
    with pytest.raises(TypeError, match="RMSprop takes alpha= itself"):
        GSAM(tiny().parameters(), torch.optim.RMSprop, lr=LR, alpha=0.1)
    opt = GSAM(torch.optim.RMSprop(tiny().parameters(), lr=LR, alpha=0.95), alpha=0.1)
    assert (opt.param_groups[0]["alpha"], opt.alpha) == (0.95, 0.1)
    with pytest.raises(ValueError, match="lmbda must be a number in \\[0, 1\\]"):
        FriendlySAM(tiny().parameters(), torch.optim.SGD, lr=LR, lmbda=1.5)
    assert SAM(tiny().parameters(), torch.optim.SGD, lr=LR, variant="friendly").first_pass_must_sync
    assert not GCSAM(tiny().parameters(), torch.optim.SGD, lr=LR).first_pass_must_sync
