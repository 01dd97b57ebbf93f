"""Options never meet the base optimizer's: keyword routing, param-group keys, attributes,
checks of values set mid-run, old checkpoints, and misuse detection.

References: plain ``torch.optim`` optimizers (bitwise where no perturbation is involved), the
hand-written two-pass step of ``tests/reference.py``, hand computation of ``||e||``, and a
checkpoint written by an earlier version (``tests/fixtures``).
"""
from __future__ import annotations

import copy
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import zsharp_algos
from zsharp_algos import SAM, ZSharp, create_optimizer, no_perturbation_groups

from reference import sam_perturbation, sharpness_step, zsharp_global_perturbation

FIXTURES = Path(__file__).resolve().parent / "fixtures"


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))


def data(seed=0, n=12):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=gen), torch.randint(0, 3, (n,), generator=gen)


def loss_of(model, x, y):
    return nn.functional.cross_entropy(model(x), y)


def closure_for(model, opt, x, y, calls=None):
    def closure():
        if calls is not None:
            calls.append(1)
        opt.zero_grad()
        loss = loss_of(model, x, y)
        loss.backward()
        return loss

    return closure


def weights(model):
    return [p.detach().clone() for p in model.parameters()]


def perturbation_norm(model, opt, x, y) -> float:
    """``||e||`` of the coming step's perturbation, read off the weights."""
    before = weights(model)
    opt.zero_grad()
    loss_of(model, x, y).backward()
    opt.first_step(zero_grad=True)
    e = [p.detach() - w for p, w in zip(model.parameters(), before)]
    opt.restore()
    return float(torch.linalg.vector_norm(torch.stack([t.norm() for t in e])))


# --------------------------------------------------------------------------- keywords reach their optimizer
@pytest.mark.parametrize("base", [torch.optim.Adam, torch.optim.AdamW])
@pytest.mark.parametrize("how", ["class", "instance", "by_name"])
def test_eps_reaches_the_base_and_a_rho_zero_run_equals_plain_torch_bitwise(base, how):
    ours, plain = mlp(), mlp()
    x, y = data()
    if how == "class":
        opt = SAM(ours.parameters(), base, rho=0.0, lr=1e-3, eps=1e-6)
    elif how == "instance":
        opt = SAM(base(ours.parameters(), lr=1e-3, eps=1e-6), rho=0.0)
    else:
        opt = create_optimizer("sam", ours.parameters(), base=base.__name__.lower(), rho=0.0, lr=1e-3, eps=1e-6)
    ref = base(plain.parameters(), lr=1e-3, eps=1e-6)
    assert opt.param_groups[0]["eps"] == 1e-6 and opt.param_groups[0]["sharpness_perturb_eps"] == 1e-12
    for _ in range(4):
        opt.step(closure_for(ours, opt, x, y))
        ref.zero_grad()
        loss_of(plain, x, y).backward()
        ref.step()
    assert all(torch.equal(a, b) for a, b in zip(ours.parameters(), plain.parameters()))


def test_a_sharpness_step_over_adam_uses_adams_eps_and_our_norm_epsilon():
    ours, ref = mlp(), mlp()
    x, y = data()
    opt = SAM(ours.parameters(), torch.optim.Adam, rho=0.05, lr=1e-2, eps=1e-3)
    ref_opt = torch.optim.Adam(ref.parameters(), lr=1e-2, eps=1e-3)
    for _ in range(3):
        opt.step(closure_for(ours, opt, x, y))
        sharpness_step(ref, lambda m: loss_of(m, x, y), ref_opt, lambda p, g: sam_perturbation(p, g, 0.05))
    for a, b in zip(ours.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_a_wrapped_adadelta_keeps_its_rho_while_e_has_norm_rho():
    ours, ref = mlp(), mlp()
    x, y = data()
    opt = SAM(torch.optim.Adadelta(ours.parameters(), lr=1.0, rho=0.8), rho=0.05)
    assert opt.param_groups[0]["rho"] == 0.8 and opt.param_groups[0]["sharpness_rho"] == 0.05
    assert perturbation_norm(ours, opt, x, y) == pytest.approx(0.05, rel=1e-5)
    ref_opt = torch.optim.Adadelta(ref.parameters(), lr=1.0, rho=0.8)
    for _ in range(3):
        opt.step(closure_for(ours, opt, x, y))
        sharpness_step(ref, lambda m: loss_of(m, x, y), ref_opt, lambda p, g: sam_perturbation(p, g, 0.05))
    for a, b in zip(ours.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    # a plain "rho" in a group of this base is Adadelta's, also when set mid-run
    opt.param_groups[0]["rho"] = 0.7
    opt.step(closure_for(ours, opt, x, y))
    assert opt.param_groups[0]["rho"] == 0.7 and opt.param_groups[0]["sharpness_rho"] == 0.05


def test_a_keyword_both_take_is_refused_naming_the_fix():
    model = mlp()
    with pytest.raises(TypeError, match=r"Adadelta takes rho= itself.*SAM\(Adadelta\(params, rho=...\), rho=...\)"):
        SAM(model.parameters(), torch.optim.Adadelta, rho=0.05, lr=1.0)
    opt = SAM(model.parameters(), torch.optim.Adadelta, lr=1.0)  # not given: no doubt, both defaults
    assert (opt.param_groups[0]["rho"], opt.rho) == (0.9, 0.05)
    with pytest.raises(TypeError, match="SGD takes none.*perturb_eps="):
        SAM(model.parameters(), torch.optim.SGD, lr=0.1, eps=1e-6)
    with pytest.raises(TypeError, match="eps= belongs to the optimizer you built; the norm epsilon is perturb_eps="):
        SAM(torch.optim.Adam(model.parameters()), eps=1e-6)


def test_e_has_norm_rho_on_tiny_gradients_whatever_the_bases_eps():
    model = mlp()
    opt = SAM(torch.optim.Adam(model.parameters(), lr=1e-3, eps=1e-6), rho=0.05)
    before = weights(model)
    gen = torch.Generator().manual_seed(1)
    grads = [torch.randn(p.shape, generator=gen) for p in model.parameters()]
    total = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))
    for p, g in zip(model.parameters(), grads):
        p.grad = g * (1e-7 / total)  # ||g|| = 1e-7, far below Adam's eps
    opt.first_step(zero_grad=True)
    e = torch.cat([(p.detach() - w).flatten() for p, w in zip(model.parameters(), before)])
    assert float(e.norm()) == pytest.approx(0.05 * 1e-7 / (1e-7 + 1e-12), rel=1e-5)


@pytest.mark.skipif(not hasattr(torch.optim, "Adafactor"), reason="torch.optim.Adafactor needs torch >= 2.5")
def test_adafactor_whose_eps_is_a_pair_steps_as_the_reference():
    ours, ref = mlp(), mlp()
    x, y = data()
    opt = ZSharp(ours.parameters(), torch.optim.Adafactor, lr=0.01)
    assert isinstance(opt.param_groups[0]["eps"], tuple)
    ref_opt = torch.optim.Adafactor(ref.parameters(), lr=0.01)
    for _ in range(3):
        opt.step(closure_for(ours, opt, x, y))
        sharpness_step(ref, lambda m: loss_of(m, x, y), ref_opt, lambda p, g: zsharp_global_perturbation(g, 0.05))
    for a, b in zip(ours.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_group_keys_are_prefixed_and_plain_spellings_are_moved():
    model = mlp()
    w, b = [p for p in model.parameters() if p.dim() > 1], [p for p in model.parameters() if p.dim() == 1]
    opt = ZSharp([{"params": w, "percentile": 90}, {"params": b, "rho": 0.0}], torch.optim.SGD, lr=0.1)
    assert [(g["sharpness_rho"], g["sharpness_percentile"]) for g in opt.param_groups] == [(0.05, 90.0), (0.0, 70.0)]
    assert not {"rho", "percentile", "scope", "interval", "adaptive", "eps"} & {k for g in opt.param_groups for k in g}
    with pytest.raises(ValueError, match="both 'rho' and 'sharpness_rho'"):
        SAM([{"params": w, "rho": 0.1, "sharpness_rho": 0.2}], torch.optim.SGD, lr=0.1)
    with pytest.raises(TypeError, match="SAM does not take 'percentile'"):
        SAM([{"params": w, "sharpness_percentile": 90.0}], torch.optim.SGD, lr=0.1)
    # the recipe's own groups use the prefixed key: right over any base, Adadelta too
    groups = no_perturbation_groups(model)
    opt = SAM(torch.optim.Adadelta(groups, lr=1.0), rho=0.1)
    assert [(g["rho"], g["sharpness_rho"]) for g in opt.param_groups] == [(0.9, 0.1), (0.9, 0.0)]


# --------------------------------------------------------------------------- attributes
def test_attributes_read_and_set_the_groups_values():
    model = mlp()
    x, y = data()
    opt = ZSharp(model.parameters(), torch.optim.SGD, lr=0.1, rho=0.05, percentile=70)
    assert (opt.rho, opt.interval, opt.adaptive, opt.perturb_eps, opt.percentile, opt.scope) == (
        0.05, 1, False, 1e-12, 70.0, "global")
    opt.param_groups[0]["sharpness_percentile"] = 90.0
    assert opt.percentile == 90.0
    opt.percentile = 80
    assert opt.param_groups[0]["sharpness_percentile"] == 80.0 and type(opt.percentile) is float
    sam = SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    for rho in (0.2, 0.1):  # a schedule written as opt.rho = ...
        sam.rho = rho
        assert perturbation_norm(model, sam, x, y) == pytest.approx(rho, rel=1e-5)
    with pytest.raises(ValueError, match="rho must be a finite number >= 0"):
        sam.rho = -1.0
    assert sam.rho == 0.1  # unchanged
    sam.add_param_group({"params": [nn.Parameter(torch.zeros(2))]})
    assert sam.param_groups[-1]["sharpness_rho"] == 0.1  # new groups get the value set last


def test_attributes_refuse_when_the_groups_differ():
    model = mlp()
    opt = SAM(no_perturbation_groups(model), torch.optim.SGD, lr=0.1, rho=0.05)
    with pytest.raises(ValueError, match=r"different rho \(0.05, 0.0\).*param_groups\[i\]\['sharpness_rho'\]"):
        opt.rho
    with pytest.raises(ValueError, match="param_groups"):
        opt.rho = 0.1
    assert [g["sharpness_rho"] for g in opt.param_groups] == [0.05, 0.0]
    assert opt.interval == 1  # the groups agree on this one


# --------------------------------------------------------------------------- values set mid-run
@pytest.mark.parametrize(
    "key, value, expects",
    [
        ("sharpness_rho", float("inf"), "a finite number >= 0"),
        ("sharpness_rho", -1.0, "a finite number >= 0"),
        ("sharpness_rho", "0.1", "a finite number >= 0"),
        ("sharpness_rho", torch.tensor(0.1), "a finite number >= 0"),
        ("sharpness_interval", 0, "an integer >= 1"),
        ("sharpness_adaptive", 1, "True or False"),
        ("sharpness_perturb_eps", float("nan"), "a finite number >= 0"),
        ("sharpness_percentile", 100.0, r"a number in \(0, 100\)"),
        ("sharpness_scope", "layer", "'global' or 'tensor'"),
        ("rho", float("inf"), "a finite number >= 0"),  # the plain spelling is checked as well
    ],
)
def test_a_bad_value_set_mid_run_raises_before_anything_runs(key, value, expects):
    model = mlp()
    x, y = data()
    opt = ZSharp(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    opt.step(closure_for(model, opt, x, y))
    before, state = weights(model), copy.deepcopy(opt.state_dict())
    opt.param_groups[0][key] = value
    calls = []
    with pytest.raises(ValueError, match=rf"ZSharp: param_groups\[0\]\['{key}'\] must be {expects}"):
        opt.step(closure_for(model, opt, x, y, calls))
    assert not calls and all(torch.equal(a, b) for a, b in zip(model.parameters(), before))
    assert torch.equal(opt.state_dict()["state"][0]["momentum_buffer"], state["state"][0]["momentum_buffer"])
    with pytest.raises(ValueError, match="must be"):
        opt.is_sharpness_step()


def test_a_plain_key_set_mid_run_takes_effect_at_the_next_step():
    model = mlp()
    x, y = data()
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    opt.param_groups[0]["rho"] = 0.2
    assert perturbation_norm(model, opt, x, y) == pytest.approx(0.2, rel=1e-5)
    assert "rho" not in opt.param_groups[0] and opt.rho == 0.2


# --------------------------------------------------------------------------- old checkpoints
def fixture_models():
    torch.manual_seed(0)
    return [nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)) for _ in range(2)]


def test_a_checkpoint_of_the_earlier_layout_loads_with_every_value():
    """tests/fixtures/checkpoint_c37bde6.pt was written by zsharp-algos at c37bde6, when the
    options were plain group keys and the norm epsilon was ``eps`` (see its ``written_by``): a
    ZSharp over SGD (two groups, scope tensor, eps 1e-10) and a SAM over Adam, 3 steps each."""
    saved = torch.load(FIXTURES / "checkpoint_c37bde6.pt", weights_only=True)
    m1, m2 = fixture_models()
    m1.load_state_dict(saved["zsharp_model"])
    m2.load_state_dict(saved["sam_adam_model"])
    w = [p for p in m1.parameters() if p.dim() > 1]
    b = [p for p in m1.parameters() if p.dim() == 1]
    z = ZSharp([{"params": w}, {"params": b}], torch.optim.SGD, lr=0.5, momentum=0.5)
    z.load_state_dict(copy.deepcopy(saved["zsharp"]))
    s = SAM(m2.parameters(), torch.optim.Adam, lr=0.5)
    s.load_state_dict(copy.deepcopy(saved["sam_adam"]))

    old = saved["zsharp"]["param_groups"]
    for group, was in zip(z.param_groups, old):
        for name in ("rho", "interval", "adaptive", "percentile", "scope"):
            assert group[f"sharpness_{name}"] == was[name] and name not in group
        assert group["sharpness_perturb_eps"] == was["eps"] == 1e-10 and "eps" not in group
        for name in ("lr", "momentum", "weight_decay", "dampening", "nesterov"):
            assert group[name] == was[name]
    assert z.step_count == 3 and [g["sharpness_percentile"] for g in z.param_groups] == [90.0, 70.0]
    for i, state in saved["zsharp"]["state"].items():
        assert torch.equal(z.state_dict()["state"][i]["momentum_buffer"], state["momentum_buffer"])
    adam, was = s.param_groups[0], saved["sam_adam"]["param_groups"][0]
    assert adam["eps"] == was["eps"] == 1e-8  # Adam's own, as it was
    assert (adam["lr"], adam["betas"], s.rho, s.perturb_eps, s.step_count) == (was["lr"], was["betas"], 0.05, 1e-12, 3)
    for i, state in saved["sam_adam"]["state"].items():
        assert all(torch.equal(s.state_dict()["state"][i][k], v) for k, v in state.items())
    # and they train on, the interval's phase kept (3 steps taken: the 4th is interval 2's sharpness step)
    x, y = saved["x"], saved["y"]
    assert z.is_sharpness_step()
    z.step(closure_for(m1, z, x, y))
    s.step(closure_for(m2, s, x, y))
    assert z.step_count == 4 and all(torch.isfinite(p).all() for p in [*m1.parameters(), *m2.parameters()])


# --------------------------------------------------------------------------- misuse
def test_a_loop_ported_from_other_sam_code_warns_once():
    model = mlp()
    x, y = data()
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    calls = []

    def second_pass_only():  # their closure
        calls.append(1)
        loss = loss_of(model, x, y)
        loss.backward()
        return loss

    with pytest.warns(UserWarning, match="found gradients already computed.*Coming from other SAM code"):
        loss_of(model, x, y).backward()  # their first pass, outside
        opt.step(second_pass_only)
        opt.zero_grad()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once only
        loss_of(model, x, y).backward()
        opt.step(second_pass_only)


@pytest.mark.parametrize("after_step", ["nothing", "zero_grad", "zero_grad_in_place"])
def test_loops_written_for_this_library_do_not_warn(after_step):
    model = mlp()
    x, y = data()
    opt = ZSharp(model.parameters(), torch.optim.SGD, lr=0.1, interval=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(4):
            opt.step(closure_for(model, opt, x, y))
            if after_step == "zero_grad":
                opt.zero_grad()
            elif after_step == "zero_grad_in_place":
                opt.zero_grad(set_to_none=False)


def test_messages_name_the_fix():
    model = mlp()
    with pytest.raises(ValueError, match="did you mean .sam.*choose one of friendlysam, gcsam, gsam, sam, zsharp, adam"):
        create_optimizer("sam ", model.parameters(), lr=0.1)
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    opt.record_loss_gap(1.25, 2.0)  # Composer's closure returns floats
    assert opt.stats.pop()["sharpness/loss_gap"] == pytest.approx(0.75)


def test_option_table_and_keys_agree():
    from zsharp_algos.options import KEY_PREFIX, OPTIONS

    keys = {o.key for o in OPTIONS.values()}
    assert all(k.startswith(KEY_PREFIX) for k in keys)
    base_keys = set()
    for name in dir(torch.optim):
        cls = getattr(torch.optim, name)
        if isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer) and cls is not torch.optim.Optimizer:
            try:
                base_keys |= set(cls([nn.Parameter(torch.zeros(2, 2))]).defaults)
            except Exception:  # optimizers needing arguments (LBFGS's line search, ...)
                continue
    assert not keys & base_keys  # no torch optimizer uses our keys
    assert zsharp_algos.SAM.rho.__doc__ and "param_groups" in zsharp_algos.ZSharp.percentile.__doc__
