"""CUDA checks: results equal the CPU's, no host sync on the optimizer's step path, fp16 autocast
with the closure-aware scaler, bf16 autocast. Every test is skipped without a CUDA device.

``ZSHARP_CUDA_TESTS_ON_CPU=1`` (on a machine without CUDA) runs them on the CPU instead, a dry
run of this file's code: the "device" side then runs the sync-free selection strategy GPUs take
(``order_stats.strategy("accelerator")``), and where CUDA's sync debug mode would be "error" the
tensor methods that read values on the host raise instead (as in
``test_directions.test_accelerator_path_does_not_sync_with_host``).

``ZSHARP_CUDA_TEST_RECORD=FILE`` writes the measured differences (largest deviation from the CPU,
bf16 / fp16 against fp32) to FILE as JSON, for ``benchmarks/gpu_summary.py``.

Optimizers are built from a base optimizer instance and the sharpness options only
(``rho``, ``percentile``, ``scope``, ``interval``, ``adaptive``, ``model=``, ``record_stats=``).
"""
from __future__ import annotations

import copy
import json
import math
import os
from contextlib import contextmanager, nullcontext

import pytest
import torch
from torch import nn

from zsharp_algos import GCSAM, GSAM, SAM, ClosureGradScaler, FriendlySAM, ZSharp, order_stats
from zsharp_algos.batchnorm import frozen_norm_stats

if torch.cuda.is_available():
    DEVICE = torch.device("cuda")
elif os.environ.get("ZSHARP_CUDA_TESTS_ON_CPU") == "1":
    DEVICE = torch.device("cpu")
else:
    DEVICE = None

pytestmark = pytest.mark.skipif(
    DEVICE is None, reason="needs CUDA (ZSHARP_CUDA_TESTS_ON_CPU=1 runs these tests on the CPU, as a dry run)"
)

#: name -> (class, sharpness options)
KINDS = {
    "sam": (SAM, {}),
    "sam_adaptive": (SAM, {"rho": 0.5, "adaptive": True}),
    "zsharp_global": (ZSharp, {}),
    "zsharp_tensor": (ZSharp, {"scope": "tensor"}),
    "zsharp_tensor_adaptive": (ZSharp, {"rho": 0.5, "scope": "tensor", "adaptive": True}),
    "zsharp_p95_tensor": (ZSharp, {"percentile": 95, "scope": "tensor"}),
    # the SAM family and the cheaper modes: their rules and state on the device, no host read
    "friendlysam": (FriendlySAM, {}),
    "gsam": (GSAM, {}),
    "gcsam": (GCSAM, {}),
    "zsharp_friendly": (ZSharp, {"variant": "friendly"}),
    "zsharp_looksam": (ZSharp, {"reuse": "looksam"}),  # random intervals decide on the host: nothing to add
}
MAIN_KINDS = ["sam", "zsharp_global", "zsharp_tensor"]

# ------------------------------------------------------------------ recorded figures
MEASURED: dict[str, dict] = {}


@pytest.fixture(scope="module", autouse=True)
def _write_record():
    yield
    path = os.environ.get("ZSHARP_CUDA_TEST_RECORD")
    if path and MEASURED:
        info = {"device": str(DEVICE), "torch": torch.__version__}
        if DEVICE is not None and DEVICE.type == "cuda":
            info["gpu"] = torch.cuda.get_device_name(DEVICE)
        with open(path, "w") as f:
            json.dump({"machine": info, "measured": MEASURED}, f, indent=2)


def record(test: str, **values) -> None:
    MEASURED.setdefault(test, {}).update(values)


# ------------------------------------------------------------------ helpers
def make_opt(kind: str, params, lr=0.05, **extra):
    cls, options = KINDS[kind]
    base = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=5e-4)
    return cls(base, **{"rho": 0.05, **options, **extra})


def device_strategy():
    """The selection strategy of the device side: the GPU's own (auto), or on the CPU dry run
    the sync-free one a GPU would take."""
    return order_stats.strategy("accelerator") if DEVICE.type == "cpu" else nullcontext()


def synchronize() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


class NoHostSync:
    """Between :meth:`on` and :meth:`off`, a host synchronisation is an error: on CUDA through
    ``torch.cuda.set_sync_debug_mode("error")`` (a RuntimeError from the op that syncs), on the
    CPU dry run by making the tensor methods that read values on the host raise."""

    HOST_READS = ("item", "__bool__", "__float__", "__int__", "__index__", "tolist", "cpu", "numpy")

    def __init__(self):
        self._patch: pytest.MonkeyPatch | None = None

    def on(self) -> None:
        if DEVICE.type == "cuda":
            synchronize()  # work queued before the check is not the checked code's
            torch.cuda.set_sync_debug_mode("error")
            return
        self._patch = pytest.MonkeyPatch()

        def forbidden(*args, **kwargs):
            raise AssertionError("host read on the optimizer step path")

        for name in self.HOST_READS:
            self._patch.setattr(torch.Tensor, name, forbidden)

    def off(self) -> None:
        if DEVICE.type == "cuda":
            torch.cuda.set_sync_debug_mode("default")
        elif self._patch is not None:
            self._patch.undo()
            self._patch = None

    @contextmanager
    def checking(self):
        self.on()
        try:
            yield
        finally:
            self.off()

    @contextmanager
    def paused(self):
        """Inside a closure that runs under :meth:`checking`: forward and backward may sync on
        their own (a loss function's checks, cuDNN's choices); only the optimizer's work is checked."""
        self.off()
        try:
            yield
        finally:
            self.on()


def small_net(seed: int = 0, dtype=torch.float32) -> nn.Module:
    """Convolutions with BatchNorm (the second pass freezes its statistics) and a linear head."""
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    )
    return net.to(DEVICE, dtype)


def batch(seed: int = 0, n: int = 16, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 8, 8, generator=gen).to(DEVICE, dtype)
    y = torch.randint(0, 10, (n,), generator=gen).to(DEVICE)
    return x, y


def loss_of(model, x, y, autocast=None):
    ctx = torch.autocast(DEVICE.type, dtype=autocast) if autocast is not None else nullcontext()
    with ctx:
        out = model(x)
    return nn.functional.cross_entropy(out.float(), y)


def params_of(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def relative_distance(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """``||a - b|| / ||b||`` over all tensors together."""
    diff = math.sqrt(sum(float((x.float() - y.float()).square().sum()) for x, y in zip(a, b)))
    norm = math.sqrt(sum(float(y.float().square().sum()) for y in b))
    return diff / norm


# ------------------------------------------------------------------ the sync check itself
def test_cuda_sync_check_catches_a_host_read():
    """Without this the sync tests below could pass because the check does nothing."""
    guard = NoHostSync()
    t = torch.ones(3, device=DEVICE)
    with pytest.raises((RuntimeError, AssertionError)):
        with guard.checking():
            t.sum().item()
    t.sum().item()  # and the check is off again


# ------------------------------------------------------------------ no host sync on the step path
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16_weights"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_cuda_step_path_has_no_host_sync(kind, dtype):
    """The optimizer's part of a step, statistics recorded (the default): ``step(closure)`` on a
    sharpness step (perturb, restore, base step, loss gap, BatchNorm freezing) and on an off step
    of ``interval=2`` (the plain base step), the same by hand (``first_step`` / ``second_step``,
    closure-less ``step()``), and reading the statistics as device tensors."""
    model = small_net(dtype=dtype)
    opt = make_opt(kind, model.parameters(), interval=2, model=model, record_stats=True)
    x, y = batch(dtype=dtype)
    guard = NoHostSync()

    def closure():
        with guard.paused():
            opt.zero_grad()
            loss = loss_of(model, x, y)
            loss.backward()
        return loss

    def plain_closure():
        opt.zero_grad()
        loss = loss_of(model, x, y)
        loss.backward()
        return loss

    with device_strategy():
        for _ in range(2):  # an off step and a sharpness step: optimizer state and cached layouts exist
            opt.step(plain_closure)
        guard.on()
        try:
            opt.step(closure)  # step 3: off step, the base step alone
            opt.step(closure)  # step 4: sharpness step
            guard.off()
            loss = plain_closure()  # step 5 by hand: off step
            guard.on()
            opt.step()
            guard.off()
            first = plain_closure()  # step 6 by hand: sharpness step
            guard.on()
            opt.first_step()
            guard.off()
            with frozen_norm_stats(model):
                second = plain_closure()
            guard.on()
            opt.record_loss_gap(first, second)
            opt.second_step()
            stats = opt.stats.pop_tensors()
        finally:
            guard.off()
    synchronize()
    assert opt.step_count == 6 and opt.skipped_steps == 0
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert set(stats) == {f"sharpness/{n}" for n in ("grad_norm", "perturbation_norm", "perturbed_fraction",
                                                      "loss_gap")}
    assert all(torch.isfinite(v) for v in stats.values()) and torch.isfinite(loss)


# ------------------------------------------------------------------ CUDA results equal the CPU's
SHAPES = [(32, 3, 3, 3), (32,), (1,), (64, 32), (120, 96), (10, 64), (10,)]


def quadratic(seed: int = 0):
    """``L(w) = sum(a w + b w^2 / 2)`` per tensor, gradient ``a + b w``: the same elementwise
    arithmetic on both devices, so their results differ by round-off only (no cuDNN / TF32
    kernel choices), and the second pass's gradient depends on the perturbation.

    The data are fixed, so whether round-off can move an entry across ZSharp's threshold is
    fixed too: at every perturbation of these runs, each gap between consecutive sorted |z|
    within two ranks of the cut is at least 10 times the largest difference between |z|
    computed in float32 and in float64 (a bound on either device's round-off; the two devices
    differ by at most twice that). Equal masks are therefore required, not hoped for."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for i, shape in enumerate(SHAPES):
        a = torch.randn(shape, generator=gen) * (1 + i)
        b = torch.rand(shape, generator=gen) + 0.5
        w = torch.randn(shape, generator=gen)
        rows.append((a, b, w))
    return rows


def run_quadratic(kind, interval, steps, reference):
    """First the perturbation of one ``first_step(zero_grad=False)`` (then restored), then
    ``steps`` steps of ``step(closure)``; returns (e, restored bitwise, weights, statistics of
    the first perturbation, statistics of the steps). ``reference``: on the CPU with its own
    host-reading selection strategy, else on the device with the device's."""
    device = torch.device("cpu") if reference else DEVICE
    rows = [tuple(t.to(device) for t in row) for row in quadratic()]
    params = [nn.Parameter(w.clone()) for _, _, w in rows]
    opt = make_opt(kind, params, interval=interval)

    def closure():
        opt.zero_grad()
        loss = sum((a * p + 0.5 * b * p * p).sum() for (a, b, _), p in zip(rows, params))
        loss.backward()
        return loss

    with order_stats.strategy("cpu") if reference else device_strategy():
        for (a, b, w), p in zip(rows, params):
            p.grad = a + b * w
        opt.first_step(zero_grad=False)
        e = [p.grad.detach().cpu().clone() for p in params]
        opt.restore()
        restored = all(torch.equal(p.detach(), w) for (_, _, w), p in zip(rows, params))
        first_stats = opt.stats.pop()
        for _ in range(steps):
            opt.step(closure)
        stats = opt.stats.pop()
    return e, restored, [p.detach().cpu() for p in params], first_stats, stats


@pytest.mark.parametrize("interval", [1, 2])
@pytest.mark.parametrize("kind", list(KINDS))
def test_cuda_matches_cpu(kind, interval):
    """The same perturbation (the same entries kept, values within float32 round-off) and, after
    four steps of ``step(closure)`` with momentum and weight decay, the same weights and
    statistics as the CPU (its own host-reading strategy: an independent implementation of the
    selection). Round-off allowed: relative 1e-5 on e and the weights, 1e-5 on the norms, the
    loss gap (a difference of two sums) relative 1e-3."""
    cpu = run_quadratic(kind, interval, steps=4, reference=True)
    dev = run_quadratic(kind, interval, steps=4, reference=False)
    e_cpu, restored_cpu, w_cpu, first_cpu, stats_cpu = cpu
    e_dev, restored_dev, w_dev, first_dev, stats_dev = dev
    assert restored_cpu and restored_dev  # restore() is exact on both
    mask_mismatch = sum(int(((a != 0) != (b != 0)).sum()) for a, b in zip(e_dev, e_cpu))
    record(f"test_cuda_matches_cpu[{kind}-{interval}]", mask_mismatch=mask_mismatch,
           e_max_abs_diff=max(float((a - b).abs().max()) for a, b in zip(e_dev, e_cpu)),
           weights_max_abs_diff=max(float((a - b).abs().max()) for a, b in zip(w_dev, w_cpu)),
           stats_cpu=stats_cpu, stats_device=stats_dev)
    assert mask_mismatch == 0
    for a, b in zip(e_dev, e_cpu):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-9)
    for a, b in zip(w_dev, w_cpu):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert set(first_dev) == set(first_cpu) and set(stats_dev) == set(stats_cpu)
    for name in first_cpu:
        assert first_dev[name] == pytest.approx(first_cpu[name], rel=1e-5), name
    for name in stats_cpu:
        rel = 1e-3 if name.endswith("loss_gap") else 1e-5
        assert stats_dev[name] == pytest.approx(stats_cpu[name], rel=rel), name


# ------------------------------------------------------------------ fp16 autocast, loss scaling
def scaled_closure(model, opt, scaler, x, y, inject_on=(), calls=None, autocast=torch.float16):
    calls = [] if calls is None else calls

    def closure():
        calls.append(1)
        opt.zero_grad()
        loss = loss_of(model, x, y, autocast=autocast)
        scaler.scale(loss).backward()
        if len(calls) in inject_on:
            next(model.parameters()).grad[0, 0, 0, 0] = float("inf")
        return loss

    return closure


@pytest.mark.parametrize("bad_pass", [1, 2], ids=["first_pass", "second_pass"])
@pytest.mark.parametrize("kind", MAIN_KINDS)
def test_cuda_fp16_overflow_skips_the_step(kind, bad_pass):
    """An inf in either pass under fp16 autocast: the step is skipped, every weight bitwise as it
    was, no optimizer state, ``skipped_steps`` counts it, the scale backs off. The next clean
    step goes through and is close to an fp32 step from the same point (fp16 round-off)."""
    model = small_net()
    opt = make_opt(kind, model.parameters(), model=model)
    scaler = ClosureGradScaler(init_scale=2.0**10)
    x, y = batch()
    before = params_of(model)
    calls = []
    with device_strategy():
        assert scaler.step(opt, scaled_closure(model, opt, scaler, x, y, {bad_pass}, calls)) is None
    scaler.update()
    assert len(calls) == bad_pass  # an overflowing first pass does not run the second
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert opt.skipped_steps == 1 and scaler.skipped_steps == 1
    assert opt.step_count == 0 and not opt.state  # no base step, no momentum
    assert scaler.get_scale() == 2.0**9

    reference = copy.deepcopy(model)  # the same point, BatchNorm statistics included
    ref_opt = make_opt(kind, reference.parameters(), model=reference)
    with device_strategy():
        loss = scaler.step(opt, scaled_closure(model, opt, scaler, x, y))
        scaler.update()
        ref_opt.step(scaled_closure(reference, ref_opt, ClosureGradScaler(enabled=False), x, y, autocast=None))
    assert loss is not None and torch.isfinite(loss)
    assert opt.step_count == 1 and opt.skipped_steps == 1 and scaler.get_scale() == 2.0**9
    after = params_of(model)
    assert all(torch.isfinite(p).all() for p in after)
    update = [a - b for a, b in zip(after, before)]
    ref_update = [a.detach() - b for a, b in zip(reference.parameters(), before)]
    distance = relative_distance(update, ref_update)
    record(f"test_cuda_fp16_overflow_skips_the_step[{kind}-{bad_pass}]", update_vs_fp32=distance)
    assert distance < 0.05


# ------------------------------------------------------------------ bf16 autocast
@pytest.mark.parametrize("kind", MAIN_KINDS)
def test_cuda_bf16_autocast_steps_close_to_fp32(kind):
    """Three steps under bf16 autocast (no scaler) run, keep everything finite, and move the
    weights as three fp32 steps do, within bf16's round-off (8-bit mantissa: a few percent of
    the update), with statistics of the same size."""
    models = {"bf16": small_net(), "fp32": small_net()}
    opts = {name: make_opt(kind, m.parameters(), model=m) for name, m in models.items()}
    start = params_of(models["fp32"])
    stats = {}
    with device_strategy():
        for i in range(3):
            x, y = batch(seed=i)
            for name, autocast in (("bf16", torch.bfloat16), ("fp32", None)):
                model, opt = models[name], opts[name]

                def closure(model=model, opt=opt, autocast=autocast):
                    opt.zero_grad()
                    loss = loss_of(model, x, y, autocast=autocast)
                    loss.backward()
                    return loss

                assert torch.isfinite(opt.step(closure))
    for name, opt in opts.items():
        stats[name] = opt.stats.pop()
    moved = {k: [p.detach() - s for p, s in zip(m.parameters(), start)] for k, m in models.items()}
    assert all(torch.isfinite(p).all() for m in models.values() for p in m.parameters())
    distance = relative_distance(moved["bf16"], moved["fp32"])
    record(f"test_cuda_bf16_autocast_steps_close_to_fp32[{kind}]", update_vs_fp32=distance,
           stats_bf16=stats["bf16"], stats_fp32=stats["fp32"])
    assert distance < 0.1
    assert all(math.isfinite(v) for v in stats["bf16"].values())
    for name in ("sharpness/grad_norm", "sharpness/perturbation_norm", "sharpness/perturbed_fraction"):
        assert stats["bf16"][name] == pytest.approx(stats["fp32"][name], rel=0.05), name
