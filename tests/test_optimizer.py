"""The two-pass step: against a hand-written PyTorch loop, interval, resume, restore, BN, errors."""
from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

import zsharp_algos
from zsharp_algos import SAM, ZSharp, create_optimizer, frozen_norm_stats, list_optimizers

from reference import sam_perturbation, sharpness_step, zsharp_global_perturbation, zsharp_tensor_perturbation


def make_model(seed=0, bn=True):
    torch.manual_seed(seed)
    # No bias before BatchNorm (as in ResNets): its true gradient is 0, so its .grad would be
    # rounding noise whose z-scores (and ZSharp's mask) depend on the order of float operations.
    layers = [nn.Linear(6, 16, bias=not bn)] + ([nn.BatchNorm1d(16)] if bn else []) + [nn.ReLU(), nn.Linear(16, 3)]
    return nn.Sequential(*layers)


def batches(n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(12, 6, generator=gen), torch.randint(0, 3, (12,), generator=gen)) for _ in range(n)]


def closure_for(model, opt, x, y, calls=None):
    def closure():
        if calls is not None:
            calls.append(1)
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    return closure


def weights_of(model):
    return torch.cat([p.detach().flatten().float() for p in model.parameters()])


def flat_state(model):
    return torch.cat([t.detach().flatten().float() for t in list(model.parameters()) + list(model.buffers())])


REFERENCES = {
    "sam": lambda params, grads: sam_perturbation(params, grads, 0.05),
    "zsharp": lambda params, grads: zsharp_global_perturbation(grads, 0.05, 70),
    "zsharp_tensor": lambda params, grads: zsharp_tensor_perturbation(grads, 0.05, 70),
}
OURS = {
    "sam": dict(name="sam"),
    "zsharp": dict(name="zsharp"),
    "zsharp_tensor": dict(name="zsharp", scope="tensor"),
}


@pytest.mark.parametrize("which", sorted(REFERENCES))
@pytest.mark.parametrize("interval", [1, 3])
def test_training_matches_plain_pytorch_loop(which, interval):
    """Ten steps with momentum and BatchNorm equal a loop written by hand from the definitions."""
    ours, ref = make_model(), make_model()
    kw = dict(OURS[which])
    opt = create_optimizer(kw.pop("name"), ours.parameters(), base="sgd", lr=0.1, momentum=0.9, weight_decay=1e-4,
                           rho=0.05, interval=interval, model=ours, **kw)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    for step, (x, y) in enumerate(batches(10), start=1):
        opt.step(closure_for(ours, opt, x, y))
        loss_fn = lambda m: nn.functional.cross_entropy(m(x), y)  # noqa: E731
        if step % interval == 0:
            sharpness_step(ref, loss_fn, ref_opt, REFERENCES[which])
        else:
            ref_opt.zero_grad()
            loss_fn(ref).backward()
            ref_opt.step()
    torch.testing.assert_close(flat_state(ours), flat_state(ref), rtol=1e-5, atol=1e-6)


def test_closure_and_manual_steps_are_identical():
    a, b = make_model(), make_model()
    opt_a = ZSharp(a.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, model=a)
    opt_b = ZSharp(torch.optim.SGD(b.parameters(), lr=0.1, momentum=0.9))
    for x, y in batches(4):
        opt_a.step(closure_for(a, opt_a, x, y))
        nn.functional.cross_entropy(b(x), y).backward()
        opt_b.first_step(zero_grad=True)
        with frozen_norm_stats(b):
            nn.functional.cross_entropy(b(x), y).backward()
        opt_b.second_step(zero_grad=True)
    assert torch.equal(flat_state(a), flat_state(b))


def test_interval_calls_closure_twice_every_kth_step():
    model = make_model()
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1, interval=3)
    counts = []
    for x, y in batches(7):
        calls = []
        opt.step(closure_for(model, opt, x, y, calls))
        counts.append(len(calls))
    assert counts == [1, 1, 2, 1, 1, 2, 1]
    assert opt.step_count == 7


RESUME_CASES = {
    "sam": ("sam", dict(interval=2)),
    "zsharp": ("zsharp", dict(interval=2)),
    # LookSAM: g_v from step 4, in the checkpoint, is reused by the resumed steps 5 to 8
    "zsharp_looksam": ("zsharp", dict(interval=5, reuse="looksam")),
    # random intervals: seed 4 draws . . S S S . . S S . for steps 0-9; after the checkpoint the
    # draws come from the restored step counter, and steps 5 and 6 reuse step 4's g_v
    "sam_looksam_random": ("sam", dict(interval=2, interval_mode="random", interval_seed=4, reuse="looksam")),
}


@pytest.mark.parametrize("case", sorted(RESUME_CASES))
def test_resume_is_bitwise(case):
    """Save after 5 steps (mid-phase), load into fresh objects, continue: identical weights, BN
    buffers, momentum and LookSAM's g_v to the uninterrupted run. With LookSAM, a checkpoint
    without g_v continues elsewhere: the comparison sees whether it came back."""
    from zsharp_algos.rules import REUSE_KEY

    name, options = RESUME_CASES[case]
    data = batches(10)

    def build():
        model = make_model()
        opt = create_optimizer(name, model.parameters(), lr=0.1, momentum=0.9, model=model, **options)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
        return model, opt, sched

    def run(model, opt, sched, part):
        for x, y in part:
            opt.step(closure_for(model, opt, x, y))
            sched.step()

    full = build()
    run(*full, data)

    first = build()
    run(*first, data[:5])
    buf = io.BytesIO()
    torch.save({"model": first[0].state_dict(), "opt": first[1].state_dict(), "sched": first[2].state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)

    def resume(opt_state):
        resumed = build()
        resumed[0].load_state_dict(ckpt["model"])
        resumed[1].load_state_dict(opt_state)
        resumed[2].load_state_dict(ckpt["sched"])
        assert resumed[1].step_count == 5
        run(*resumed, data[5:])
        return resumed

    resumed = resume(ckpt["opt"])
    assert torch.equal(flat_state(full[0]), flat_state(resumed[0]))
    for p_full, p_res in zip(full[0].parameters(), resumed[0].parameters()):
        want, got = full[1].state[p_full], resumed[1].state[p_res]
        assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    looksam = options.get("reuse") == "looksam"
    assert all((REUSE_KEY in s) == looksam for s in ckpt["opt"]["state"].values())
    if looksam:
        dropped = copy.deepcopy(ckpt["opt"])
        for s in dropped["state"].values():
            del s[REUSE_KEY]
        assert not torch.equal(flat_state(full[0]), flat_state(resume(dropped)[0]))


def test_failing_second_pass_restores_weights_exactly():
    model = make_model()
    opt = ZSharp(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, model=model)
    x, y = batches(1)[0]
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    calls = []

    def closure():
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("out of memory in the second pass")
        return closure_for(model, opt, x, y)()

    with pytest.raises(RuntimeError, match="second pass"):
        opt.step(closure)
    for k, v in model.named_parameters():
        assert torch.equal(v, before[k]), k
    assert opt.step_count == 0 and not opt.state  # the base optimizer never stepped
    assert all(m.track_running_stats for m in model.modules() if isinstance(m, nn.BatchNorm1d))


def test_batchnorm_statistics_count_one_pass():
    model = make_model()
    reference = copy.deepcopy(model)
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.0, model=model)
    x, y = batches(1)[0]
    opt.step(closure_for(model, opt, x, y))
    reference(x)  # one training-mode forward at the same weights
    for (name, b), b_ref in zip(model.named_buffers(), reference.buffers()):
        assert torch.equal(b, b_ref), name


def test_without_model_batchnorm_is_frozen_by_default():
    """Without model=, the layers seen updating in the first pass are frozen in the second."""
    model = make_model()
    reference = copy.deepcopy(model)
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.0)
    x, y = batches(1)[0]
    opt.step(closure_for(model, opt, x, y))
    reference(x)
    for b, b_ref in zip(model.buffers(), reference.buffers()):
        assert torch.equal(b, b_ref)


def test_manual_loop_without_frozen_stats_updates_batchnorm_twice():
    """What the default prevents (so the two tests above are not vacuous)."""
    model = make_model()
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.0)
    x, y = batches(1)[0]
    nn.functional.cross_entropy(model(x), y).backward()
    opt.first_step()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.second_step()
    assert int(model[1].num_batches_tracked) == 2


def test_lr_scheduler_on_wrapper_and_base():
    for attach in ("wrapper", "base"):
        model = make_model(bn=False)
        opt = SAM(model.parameters(), torch.optim.SGD, lr=1.0)
        sched = torch.optim.lr_scheduler.StepLR(opt if attach == "wrapper" else opt.base_optimizer, 1, gamma=0.1)
        x, y = batches(1)[0]
        opt.step(closure_for(model, opt, x, y))
        sched.step()
        assert opt.param_groups[0]["lr"] == pytest.approx(0.1)
        assert opt.base_optimizer.param_groups[0]["lr"] == pytest.approx(0.1)


def test_wrapping_adamw_instance_matches_class_style():
    a, b = make_model(), make_model()
    opt_a = ZSharp(torch.optim.AdamW(a.parameters(), lr=1e-2), rho=0.05, model=a)
    opt_b = ZSharp(b.parameters(), torch.optim.AdamW, rho=0.05, lr=1e-2, model=b)
    for x, y in batches(3):
        opt_a.step(closure_for(a, opt_a, x, y))
        opt_b.step(closure_for(b, opt_b, x, y))
    assert torch.equal(flat_state(a), flat_state(b))


def test_param_groups_frozen_params_and_no_grads():
    model = make_model(bn=False)
    model[0].bias.requires_grad_(False)  # frozen
    frozen = model[0].bias.detach().clone()
    opt = ZSharp([{"params": [model[0].weight]}, {"params": model[2].parameters(), "lr": 0.0}], torch.optim.SGD, lr=0.1)
    head = [p.detach().clone() for p in model[2].parameters()]
    x, y = batches(1)[0]
    opt.step(closure_for(model, opt, x, y))
    assert torch.equal(model[0].bias, frozen)
    assert all(torch.equal(p, h) for p, h in zip(model[2].parameters(), head))  # lr 0: restored exactly
    # a step where no parameter has a gradient: nothing moves, nothing fails
    opt.zero_grad(set_to_none=True)
    before = flat_state(model)
    opt.step(lambda: torch.zeros(()))
    assert torch.equal(flat_state(model), before)


def test_mixed_dtypes_bf16_model():
    model = make_model(bn=False).to(torch.bfloat16)
    opt = ZSharp(model.parameters(), torch.optim.SGD, lr=0.1)
    x, y = batches(1)[0]
    before = flat_state(model)
    loss = opt.step(lambda: (opt.zero_grad(), nn.functional.cross_entropy(model(x.bfloat16()), y))[1].backward() or torch.ones(()))
    assert loss is not None and torch.isfinite(flat_state(model)).all() and not torch.equal(flat_state(model), before)


def test_bf16_autocast_step():
    model = make_model()
    opt = ZSharp(model.parameters(), torch.optim.SGD, lr=0.1, model=model)
    x, y = batches(1)[0]

    def closure():
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    before = flat_state(model)
    assert torch.isfinite(opt.step(closure))
    after = flat_state(model)
    assert torch.isfinite(after).all() and not torch.equal(after, before)


def test_max_grad_norm_clips_the_second_pass_gradient():
    ours, ref = make_model(bn=False), make_model(bn=False)
    opt = SAM(ours.parameters(), torch.optim.SGD, lr=0.5, rho=0.05, max_grad_norm=0.01)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.5)
    x, y = batches(1)[0]
    opt.step(closure_for(ours, opt, x, y))
    loss_fn = lambda m: nn.functional.cross_entropy(m(x), y)  # noqa: E731

    class Clipped:
        def zero_grad(self):
            ref_opt.zero_grad()

        def step(self):
            torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.01)
            ref_opt.step()

    sharpness_step(ref, loss_fn, Clipped(), lambda p, g: sam_perturbation(p, g, 0.05), bn_frozen=False)
    torch.testing.assert_close(flat_state(ours), flat_state(ref), rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(rho=-0.1), "rho"),
        (dict(interval=0), "interval"),
        (dict(interval=1.5), "interval"),
        (dict(perturb_eps=-1.0), "perturb_eps"),
        (dict(percentile=0), "percentile"),
        (dict(percentile=100), "percentile"),
        (dict(percentile=-5), "percentile"),
        (dict(percentile=150), "percentile"),
        (dict(scope="layer"), "scope"),
        (dict(max_grad_norm=0.0), "max_grad_norm"),
    ],
)
def test_bad_hyperparameters_raise(kwargs, match):
    model = make_model()
    with pytest.raises(ValueError, match=match):
        ZSharp(model.parameters(), torch.optim.SGD, lr=0.1, **kwargs)


def test_bad_construction_raises():
    model = make_model()
    with pytest.raises(TypeError, match="base_optimizer"):
        SAM(model.parameters(), "sgd", lr=0.1)
    with pytest.raises(TypeError, match="not both"):
        SAM(torch.optim.SGD(model.parameters(), lr=0.1), torch.optim.SGD)
    with pytest.raises(TypeError, match="cannot wrap"):
        SAM(SAM(model.parameters(), torch.optim.SGD, lr=0.1))
    with pytest.raises(ValueError, match="choose one of"):
        create_optimizer("zsharpp", model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="choose one of"):
        create_optimizer("sam", model.parameters(), base="lion", lr=0.1)
    assert {"sam", "zsharp", "sgd", "adamw"} <= set(list_optimizers())


def test_missing_closure_and_sparse_gradients_fail_before_weights_change():
    model = make_model()
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    before = weights_of(model)
    x, y = batches(1)[0]
    nn.functional.cross_entropy(model(x), y).backward()
    with pytest.raises(RuntimeError, match="without a closure on a sharpness step"):
        opt.step()
    emb = nn.Embedding(10, 4, sparse=True)
    opt2 = ZSharp(emb.parameters(), torch.optim.SGD, lr=0.1)
    emb_before = emb.weight.detach().clone()

    def closure():
        opt2.zero_grad()
        loss = emb(torch.tensor([1, 2])).sum()
        loss.backward()
        return loss

    with pytest.raises(RuntimeError, match="sparse"):
        opt2.step(closure)
    assert torch.equal(weights_of(model), before) and torch.equal(emb.weight, emb_before)


def test_repr_and_state_dict_are_plain():
    opt = ZSharp(make_model().parameters(), torch.optim.SGD, lr=0.1, percentile=95, scope="tensor")
    assert repr(opt) == (
        "ZSharp(rho=0.05, percentile=95.0, scope='tensor', base=SGD)"
    )
    state = opt.state_dict()
    assert state["sharpness"] == {"optimizer": "ZSharp", "format": 2, "step_count": 0, "skipped_steps": 0}
    group = state["param_groups"][0]
    assert group["sharpness_percentile"] == 95.0 and group["sharpness_scope"] == "tensor"
    assert not {"rho", "percentile", "scope", "interval", "adaptive", "eps"} & set(group)  # SGD's keys only
    with pytest.raises(ValueError, match="from a ZSharp optimizer"):
        SAM(make_model().parameters(), torch.optim.SGD, lr=0.1).load_state_dict(opt.state_dict())


def test_import_is_light():
    import subprocess
    import sys

    code = (
        "import sys, zsharp_algos; heavy = [m for m in ('composer', 'transformers', 'accelerate', 'timm', "
        "'torchvision', 'sklearn', 'matplotlib') if m in sys.modules]; print(heavy); assert not heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    assert zsharp_algos.__version__


# --------------------------------------------------------------------------- options in param groups
@pytest.mark.parametrize("name", ["sam", "zsharp"])
def test_rho_zero_group_is_neither_perturbed_nor_in_the_norm(name):
    """Two groups, biases at rho=0: against a plain-PyTorch reference on the weights alone."""
    torch.manual_seed(0)
    model = make_model(bn=False)
    weights = [p for p in model.parameters() if p.dim() > 1]
    biases = [p for p in model.parameters() if p.dim() == 1]
    cls = SAM if name == "sam" else ZSharp
    opt = cls([{"params": weights, "rho": 0.1}, {"params": biases, "rho": 0.0}], torch.optim.SGD, lr=0.1)
    x, y = batches(1)[0]
    nn.functional.cross_entropy(model(x), y).backward()
    w0 = [p.detach().clone() for p in model.parameters()]
    grads = [p.grad.clone() for p in weights]
    opt.first_step(zero_grad=True)
    want = REFERENCES[name](weights, grads)
    want = [e * 2 for e in want]  # rho 0.1 against the references' 0.05
    for p, w, e in zip(weights, [w for w, p in zip(w0, model.parameters()) if p.dim() > 1], want):
        torch.testing.assert_close(p.detach() - w, e, rtol=1e-5, atol=1e-7)
    for p, w in zip(biases, [w for w, p in zip(w0, model.parameters()) if p.dim() == 1]):
        assert torch.equal(p, w)  # not perturbed
    opt.restore()
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), w0))


def test_options_round_trip_through_state_dict_per_group():
    model = make_model(bn=False)
    groups = [{"params": [model[0].weight], "rho": 0.2, "percentile": 90.0}, {"params": [model[2].weight], "rho": 0.0}]
    opt = ZSharp(groups, torch.optim.SGD, lr=0.1, rho=0.05, interval=2)
    keys = ("sharpness_rho", "sharpness_percentile", "sharpness_interval")
    assert [tuple(g[k] for k in keys) for g in opt.param_groups] == [(0.2, 90.0, 2), (0.0, 70.0, 2)]
    state = copy.deepcopy(opt.state_dict())
    other = ZSharp(
        [{"params": [make_model(bn=False)[0].weight]}, {"params": [make_model(bn=False)[2].weight]}],
        torch.optim.SGD, lr=0.1,
    )
    other.load_state_dict(state)  # the saved options win, as torch restores lr
    assert [tuple(g[k] for k in keys) for g in other.param_groups] == [(0.2, 90.0, 2), (0.0, 70.0, 2)]
    with pytest.raises(ValueError, match="rho"):
        opt.add_param_group({"params": [model[2].bias], "rho": -1.0})


def test_no_perturbation_groups_splits_weights_from_biases_and_norms():
    model = make_model()
    groups = zsharp_algos.no_perturbation_groups(model, weight_decay=0.0)
    assert [p.dim() for p in groups[0]["params"]] == [2, 2]
    assert groups[1]["sharpness_rho"] == 0.0 and groups[1]["weight_decay"] == 0.0
    assert {id(p) for p in groups[1]["params"]} == {id(model[1].weight), id(model[1].bias), id(model[3].bias)}
    SAM(groups, torch.optim.SGD, lr=0.1, weight_decay=5e-4)  # builds


def test_all_groups_at_rho_zero_take_one_pass():
    model = make_model()
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1, rho=0.0)
    calls = []
    x, y = batches(1)[0]
    opt.step(closure_for(model, opt, x, y, calls))
    assert len(calls) == 1 and opt.step_count == 1


# --------------------------------------------------------------------------- first contact
def test_closure_without_return_steps_like_torch_optimizers():
    import torch.nn.functional as F

    m = nn.Linear(6, 3)
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    ref = copy.deepcopy(m)
    opt = ZSharp(m.parameters(), torch.optim.SGD, lr=0.1)
    ref_opt = ZSharp(ref.parameters(), torch.optim.SGD, lr=0.1)

    def c():
        opt.zero_grad()
        F.cross_entropy(m(x), y).backward()  # no return

    for _ in range(3):
        assert opt.step(c) is None
        ref_opt.step(closure_for(ref, ref_opt, x, y))
    assert opt.step_count == 3 and opt.skipped_steps == 0
    assert all(torch.equal(a, b) for a, b in zip(m.parameters(), ref.parameters()))


def test_skip_step_from_a_closure_is_counted_and_restores_exactly():
    model = make_model()
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    x, y = batches(1)[0]
    before = flat_state(model)
    calls = []

    def overflowing():
        closure_for(model, opt, x, y)()
        calls.append(1)
        if len(calls) == 2:
            raise zsharp_algos.SkipStep("second pass overflowed")

    assert opt.step(overflowing) is None
    params = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert torch.equal(params, before[: params.numel()])  # weights exactly as they were
    assert opt.skipped_steps == 1 and opt.step_count == 0 and not opt.state


def test_misuse_of_the_manual_steps_says_what_happened():
    model = make_model()
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    x, y = batches(1)[0]
    before = weights_of(model)
    with pytest.raises(RuntimeError, match="second_step\\(\\) without first_step\\(\\)"):
        opt.second_step()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.first_step()
    with pytest.raises(RuntimeError, match="weights are perturbed .* second_step\\(\\)"):
        opt.step(closure_for(model, opt, x, y))
    with pytest.raises(RuntimeError, match="first_step\\(\\) called twice"):
        opt.first_step()
    opt.restore()
    assert torch.equal(weights_of(model), before)


def test_manual_loop_follows_the_interval():
    """first_step() perturbs only on sharpness steps; is_sharpness_step() lets a loop skip the
    second pass on the others (the documented manual loop)."""
    model = make_model(bn=False)
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1, interval=3)
    perturbed = []
    for x, y in batches(6):
        nn.functional.cross_entropy(model(x), y).backward()
        if opt.is_sharpness_step():
            w = [p.detach().clone() for p in model.parameters()]
            opt.first_step(zero_grad=True)
            perturbed.append(any(not torch.equal(p, q) for p, q in zip(model.parameters(), w)))
            nn.functional.cross_entropy(model(x), y).backward()
            opt.second_step(zero_grad=True)
        else:
            perturbed.append(False)
            opt.step()
            opt.zero_grad()
    assert perturbed == [False, False, True, False, False, True]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["sam", "zsharp", "zsharp_tensor"])
def test_every_dtype_steps_and_float64_matches_the_reference(dtype, name):
    model = make_model(bn=False).to(dtype)
    opt = create_optimizer(OURS[name]["name"], model.parameters(), lr=0.1,
                           **{k: v for k, v in OURS[name].items() if k != "name"})
    x, y = batches(1)[0]
    nn.functional.cross_entropy(model(x.to(dtype)), y).backward()
    params = list(model.parameters())
    w = [p.detach().clone() for p in params]
    grads = [p.grad.clone() for p in params]
    opt.first_step(zero_grad=True)
    assert all(torch.isfinite(p).all() for p in params)
    if dtype == torch.float64:
        want = REFERENCES[name](w, grads)
        for p, w0, e in zip(params, w, want):
            torch.testing.assert_close(p.detach() - w0, e.to(dtype), rtol=1e-9, atol=1e-12)
    opt.restore()
    assert all(torch.equal(p, w0) for p, w0 in zip(params, w))


def test_drop_in_spellings_and_values_from_other_libraries():
    import numpy as np

    model = make_model()
    opt = SAM(params=model.parameters(), base_optimizer=torch.optim.SGD, lr=0.1, rho=np.float32(0.1))
    assert opt.rho == pytest.approx(0.1) and type(opt.param_groups[0]["sharpness_rho"]) is float
    create_optimizer("zsharp", model.parameters(), base=torch.optim.SGD, lr=0.1)  # a class, not a name
    with pytest.warns(UserWarning, match="percent in \\(0, 100\\), not a fraction.*percentile=70"):
        ZSharp(model.parameters(), torch.optim.SGD, lr=0.1, percentile=0.7)
    with pytest.raises(ValueError, match="rho must be a finite number"):
        SAM(model.parameters(), torch.optim.SGD, lr=0.1, rho=float("inf"))
    with pytest.raises(ValueError, match="adaptive must be True or False"):
        SAM(model.parameters(), torch.optim.SGD, lr=0.1, adaptive="no")
    with pytest.raises(TypeError, match="SAM does not take 'percentile' \\(ZSharp's option\\)"):
        SAM(model.parameters(), torch.optim.SGD, lr=0.1, percentile=70)


def test_star_import_needs_only_torch():
    import subprocess
    import sys

    code = (
        "import sys; from zsharp_algos import *; help_text = __import__('pydoc').render_doc('zsharp_algos'); "
        "heavy = [m for m in ('composer', 'transformers', 'accelerate', 'timm', 'lightning') if m in sys.modules]; "
        "sys.exit(repr(heavy) if heavy else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
