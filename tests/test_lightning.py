"""PyTorch Lightning integration: SAM / ZSharp in automatic optimization (CPU).

References are independent of the integration: the core optimizer's ``step(closure)`` (or its
manual first_step / restore) driven by a plain PyTorch loop over the same batches, an
uninterrupted run (for resume), the other rank and a per-rank loop (for DDP), and the first
pass's own values (for what is logged).
"""
from __future__ import annotations

import copy
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

pytest.importorskip("lightning")

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from lightning.pytorch.loggers import Logger  # noqa: E402
from lightning.pytorch.plugins.precision import MixedPrecision  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from launch_env import clean_env, free_port  # noqa: E402

from zsharp_algos import SAM, ClosureGradScaler, SkipStep, ZSharp, frozen_norm_stats  # noqa: E402
from zsharp_algos.lightning import (  # noqa: E402
    LightningClosureScaler,
    LightningSAM,
    LightningZSharp,
    SAMCallback,
    SharpnessAwareCallback,
    ZSharpCallback,
    check_supported,
)

ROOT = Path(__file__).resolve().parents[1]
LR, MOMENTUM = 0.1, 0.9

warnings.filterwarnings("ignore", module="lightning")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")


# --------------------------------------------------------------------------- helpers
def make_data(n: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=gen), torch.randint(0, 3, (n,), generator=gen)


def bn_mlp(seed: int = 1) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


class Net(pl.LightningModule):
    """A LightningModule written without SAM in mind (logs its loss, keeps a metric, counts calls)."""

    def __init__(self, optimizer: str = "sgd", poison_call: int | None = None, **opt_kwargs):
        super().__init__()
        self.net = bn_mlp()
        self.optimizer, self.opt_kwargs = optimizer, opt_kwargs
        self.poison_call = poison_call  # training_step call (0-based) whose loss is made inf
        self.calls = 0
        self.losses: list[float] = []  # every training_step loss, in call order
        self.outputs: list[float] = []  # on_train_batch_end's outputs["loss"]
        self.before_step_hooks = 0
        from torchmetrics import MeanMetric

        self.mean_loss = MeanMetric()

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        if self.calls == self.poison_call:
            loss = loss * float("inf")
        self.calls += 1
        self.losses.append(loss.item())
        self.mean_loss.update(loss.detach())
        self.log("train_loss", loss, on_step=True, on_epoch=True)
        self.log("mean_loss", self.mean_loss, on_step=False, on_epoch=True)
        return loss

    def on_before_optimizer_step(self, optimizer):
        self.before_step_hooks += 1

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.outputs.append(float(outputs["loss"]))

    def configure_optimizers(self):
        kwargs = dict(lr=LR, momentum=MOMENTUM, **self.opt_kwargs)
        if self.optimizer == "sgd":
            return torch.optim.SGD(self.parameters(), lr=kwargs.pop("lr"), momentum=kwargs.pop("momentum"))
        cls = {"lightning_sam": LightningSAM, "lightning_zsharp": LightningZSharp, "sam": SAM, "zsharp": ZSharp}
        return cls[self.optimizer](self.parameters(), torch.optim.SGD, model=self, **kwargs)


class Collect(Logger):
    """Keeps what the trainer sends to its loggers."""

    def __init__(self):
        super().__init__()
        self.rows: list[tuple[int, dict]] = []

    @property
    def name(self):
        return "collect"

    @property
    def version(self):
        return 0

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        self.rows.append((step, dict(metrics)))

    def values(self, key: str) -> list[float]:
        return [m[key] for _, m in self.rows if key in m]


def fit(module, data, *, batch_size, steps=None, epochs=None, callbacks=(), ckpt_path=None, **kwargs) -> pl.Trainer:
    kwargs = {"logger": False, "log_every_n_steps": 1, **kwargs}
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_steps=steps if steps is not None else -1, max_epochs=epochs,
        callbacks=list(callbacks), enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, **kwargs,
    )
    trainer.fit(module, DataLoader(TensorDataset(*data), batch_size=batch_size, shuffle=False), ckpt_path=ckpt_path)
    return trainer


def batches(data, batch_size):
    x, y = data
    return [(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, len(y), batch_size)]


def reference_steps(model, opt, steps, *, accumulate=1, clip=None, clip_first=False, autocast=None, scaler=None):
    """The core optimizer's step(closure) driven by a plain loop: each step's closure runs
    ``accumulate`` micro-batches with their loss divided by ``accumulate`` (the whole batch's
    mean); ``clip`` = (algorithm, value) is applied to the gradient of the base step only."""
    steps = list(steps)
    for micro in [steps[i : i + accumulate] for i in range(0, len(steps), accumulate)]:
        passes = []

        def closure():
            opt.zero_grad()
            total = 0.0
            for x, y in micro:
                with torch.autocast("cpu", dtype=autocast, cache_enabled=False) if autocast else _null():
                    loss = F.cross_entropy(model(x), y) / accumulate
                (scaler.scale(loss) if scaler else loss).backward()
                total = total + loss.detach()
            if scaler is not None and scaler.unscale_(opt):
                raise SkipStep()
            passes.append(1)
            if clip is not None and (clip_first or len(passes) == (2 if opt.is_sharpness_step() else 1)):
                kind, value = clip
                params = [p for g in opt.param_groups for p in g["params"]]
                if kind == "norm":
                    torch.nn.utils.clip_grad_norm_(params, value)
                else:
                    torch.nn.utils.clip_grad_value_(params, value)
            return total

        opt.step(closure)
        if scaler is not None:
            scaler.update()


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def assert_same_state(a: nn.Module, b: nn.Module):
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), f"{name} differs by {(x.double() - y.double()).abs().max().item():.3g}"


def momentum(opt, module):
    return [opt.state[p]["momentum_buffer"] for p in module.parameters()]


# --------------------------------------------------------------------------- one step == the core
@pytest.mark.parametrize(
    "callback,core",
    [
        (
            lambda: SAMCallback(rho=0.05),
            lambda m: SAM(torch.optim.SGD(m.parameters(), lr=LR, momentum=MOMENTUM), rho=0.05),
        ),
        (
            lambda: ZSharpCallback(rho=0.05, percentile=70),
            lambda m: ZSharp(torch.optim.SGD(m.parameters(), lr=LR, momentum=MOMENTUM), rho=0.05, percentile=70),
        ),
    ],
    ids=["sam", "zsharp"],
)
def test_callback_steps_equal_core_step(callback, core):
    data = make_data(48)
    module = Net()
    ref = copy.deepcopy(module.net)
    trainer = fit(module, data, batch_size=16, steps=3, callbacks=[callback()])
    opt = core(ref)
    reference_steps(ref, opt, batches(data, 16))
    assert_same_state(module.net, ref)  # weights and BatchNorm buffers, bitwise
    assert all(torch.equal(a, b) for a, b in zip(momentum(trainer.optimizers[0], module.net), momentum(opt, ref)))
    assert trainer.optimizers[0].base_optimizer.__class__ is torch.optim.SGD


def test_batchnorm_statistics_move_once_per_step():
    data = make_data(48)
    module = Net()
    start_weights = []

    class Record(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            start_weights.append({k: v.clone() for k, v in pl_module.net.named_parameters()})

    fit(module, data, batch_size=16, steps=3, callbacks=[SAMCallback(rho=0.05), Record()])
    assert module.calls == 6  # two passes per step
    # Independent: one training-mode forward per batch at the weights the step started from.
    plain = bn_mlp()
    for weights, (x, _) in zip(start_weights, batches(data, 16)):
        with torch.no_grad():
            for name, p in plain.named_parameters():
                p.copy_(weights[name])
            plain(x)
    bn, ref = module.net[1], plain[1]
    assert int(bn.num_batches_tracked) == 3
    assert torch.equal(bn.running_mean, ref.running_mean) and torch.equal(bn.running_var, ref.running_var)


def test_configure_optimizers_alternative_equals_callback():
    data = make_data(48)
    via_callback, via_optimizer = Net(), Net("lightning_zsharp", rho=0.05, percentile=70, interval=2)
    fit(via_callback, data, batch_size=16, steps=3, callbacks=[ZSharpCallback(rho=0.05, percentile=70, interval=2)])
    trainer = fit(via_optimizer, data, batch_size=16, steps=3)
    assert_same_state(via_callback.net, via_optimizer.net)
    assert [type(c).__name__ for c in trainer.callbacks].count("SharpnessAwareCallback") == 1
    assert via_optimizer.calls == via_callback.calls == 4  # steps 0, 2 plain; step 1 two passes


def test_core_optimizer_with_bare_callback_equals_callback():
    data = make_data(32)
    a, b = Net(), Net("sam", rho=0.05)
    fit(a, data, batch_size=16, steps=2, callbacks=[SAMCallback(rho=0.05)])
    fit(b, data, batch_size=16, steps=2, callbacks=[SharpnessAwareCallback()])
    assert_same_state(a.net, b.net)


# --------------------------------------------------------------------------- logs and outputs
def test_second_pass_stays_out_of_logs_metrics_and_outputs():
    data = make_data(48)
    module = Net()
    logger = Collect()
    fit(module, data, batch_size=16, steps=3, callbacks=[SAMCallback(rho=0.05)], logger=logger)
    first, second = module.losses[0::2], module.losses[1::2]
    assert len(first) == len(second) == 3 and first != second
    assert logger.values("train_loss_step") == pytest.approx(first)
    assert logger.values("train_loss_epoch") == pytest.approx([sum(first) / 3])
    assert logger.values("mean_loss") == pytest.approx([sum(first) / 3])  # torchmetrics state: first passes only
    assert module.outputs == pytest.approx(first)  # training_step's output is the first pass's
    assert module.before_step_hooks == 3  # on_before_optimizer_step once per step
    gaps = logger.values("sharpness/loss_gap")
    assert gaps == pytest.approx([s - f for f, s in zip(first, second)], rel=1e-5, abs=1e-7)
    assert logger.values("sharpness/perturbation_norm") == pytest.approx([0.05] * 3, rel=1e-5)
    assert len(logger.values("sharpness/grad_norm")) == 3


def test_stats_follow_the_logging_cadence():
    data = make_data(64)
    logger = Collect()
    module = Net()
    fit(module, data, batch_size=16, steps=4, callbacks=[ZSharpCallback(rho=0.05, percentile=70)], logger=logger,
        log_every_n_steps=2)
    fractions = logger.values("sharpness/perturbed_fraction")
    assert len(fractions) == 2  # steps 2 and 4, each the mean of two steps
    assert all(0.2 < f < 0.4 for f in fractions)


def test_interval_follows_global_step():
    module = Net()
    fit(module, make_data(64), batch_size=16, steps=4, callbacks=[SAMCallback(rho=0.05, interval=2)])
    assert module.calls == 6  # steps 0 and 2 plain, 1 and 3 two passes


def test_lr_scheduler_steps_as_configured():
    class Scheduled(Net):
        def configure_optimizers(self):
            opt = torch.optim.SGD(self.parameters(), lr=LR, momentum=MOMENTUM)
            schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5**step)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    data = make_data(48)
    module = Scheduled()
    ref = copy.deepcopy(module.net)
    trainer = fit(module, data, batch_size=16, steps=3, callbacks=[SAMCallback(rho=0.05)])
    assert trainer.optimizers[0].param_groups[0]["lr"] == LR * 0.5**3
    opt = SAM(torch.optim.SGD(ref.parameters(), lr=LR, momentum=MOMENTUM), rho=0.05)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt.base_optimizer, lambda step: 0.5**step)
    for batch in batches(data, 16):
        reference_steps(ref, opt, [batch])
        schedule.step()
    assert_same_state(module.net, ref)


# --------------------------------------------------------------------------- accumulation, clipping
def test_accumulate_grad_batches_is_sam_on_the_whole_batch():
    data = make_data(64)
    module = Net()
    ref = copy.deepcopy(module.net)
    trainer = fit(module, data, batch_size=8, steps=4, accumulate_grad_batches=2, callbacks=[SAMCallback(rho=0.05)])
    assert trainer.global_step == 4 and module.calls == 16  # 2 micro-batches x 2 passes x 4 steps
    opt = SAM(torch.optim.SGD(ref.parameters(), lr=LR, momentum=MOMENTUM), rho=0.05)
    reference_steps(ref, opt, batches(data, 8), accumulate=2)
    assert_same_state(module.net, ref)
    # the step's output and log are the first pass's, one per micro-batch
    assert module.outputs == pytest.approx([l / 2 for i, l in enumerate(module.losses) if (i // 2) % 2 == 0])


@pytest.mark.parametrize("algorithm,value", [("norm", 0.05), ("value", 0.002)])
def test_gradient_clipping_applies_once_to_the_base_gradient(algorithm, value):
    data = make_data(48)
    module = Net()
    ref, both = copy.deepcopy(module.net), copy.deepcopy(module.net)
    fit(module, data, batch_size=16, steps=3, callbacks=[SAMCallback(rho=0.05)], gradient_clip_val=value,
        gradient_clip_algorithm=algorithm)
    opt = SAM(torch.optim.SGD(ref.parameters(), lr=LR, momentum=MOMENTUM), rho=0.05)
    reference_steps(ref, opt, batches(data, 16), clip=(algorithm, value))
    assert_same_state(module.net, ref)
    assert module.before_step_hooks == 3  # on_before_optimizer_step once per step
    if algorithm == "value":  # clipping the first pass as well changes e: a different result
        opt = SAM(torch.optim.SGD(both.parameters(), lr=LR, momentum=MOMENTUM), rho=0.05)
        reference_steps(both, opt, batches(data, 16), clip=(algorithm, value), clip_first=True)
        assert not torch.equal(both[0].weight, module.net[0].weight)


# --------------------------------------------------------------------------- precision
def test_bf16_mixed_equals_core_step_under_autocast():
    data = make_data(32)
    module = Net()
    ref = copy.deepcopy(module.net)
    fit(module, data, batch_size=16, steps=2, callbacks=[ZSharpCallback(rho=0.05)], precision="bf16-mixed")
    opt = ZSharp(torch.optim.SGD(ref.parameters(), lr=LR, momentum=MOMENTUM), rho=0.05)
    reference_steps(ref, opt, batches(data, 16), autocast=torch.bfloat16)
    assert_same_state(module.net, ref)
    assert module.calls == 4


@pytest.mark.parametrize("poison_call", [0, 1], ids=["first-pass", "second-pass"])
def test_16_mixed_overflow_in_either_pass_skips_the_step(poison_call):
    data = make_data(32)
    module = Net(poison_call=poison_call)
    init = copy.deepcopy(module.net)
    plugin = MixedPrecision("16-mixed", "cpu")
    torch_scaler = plugin.scaler
    seen = []

    class Watch(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append((copy.deepcopy(pl_module.net.state_dict()), trainer.optimizers[0].skipped_steps,
                         trainer.precision_plugin.scaler.get_scale()))

    trainer = fit(module, data, batch_size=16, steps=2, callbacks=[SAMCallback(rho=0.05), Watch()], plugins=[plugin])
    (after_skip, skipped, scale), (_, skipped_total, _) = seen
    for k, v in init.named_parameters():
        assert torch.equal(after_skip[k], v), k  # the overflowed step left every weight as it was
    assert trainer.optimizers[0].skipped_steps == skipped == skipped_total == 1
    assert scale == 2.0**15  # backed off once
    assert trainer.precision_plugin.scaler is torch_scaler  # handed back after fit ...
    assert torch_scaler.get_scale() == 2.0**15  # ... with the state it reached
    assert module.calls == (1 if poison_call == 0 else 2) + 2
    # The clean second step is the core step with a closure-aware scaler at the backed-off scale,
    # from the skipped step's state (weights as before; BatchNorm saw the first pass's batch).
    ref = copy.deepcopy(init)
    ref.load_state_dict(after_skip)
    opt = SAM(torch.optim.SGD(ref.parameters(), lr=LR, momentum=MOMENTUM), rho=0.05)
    scaler = ClosureGradScaler(init_scale=2.0**15)
    reference_steps(ref, opt, batches(data, 16)[1:], autocast=torch.float16, scaler=scaler)
    assert_same_state(module.net, ref)


def test_scaler_reads_a_torch_grad_scaler_state():
    torch_scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=7)
    ours = LightningClosureScaler.from_torch(torch_scaler)
    assert ours.get_scale() == 1024.0 and ours.growth_interval == 7
    ours.load_state_dict({"scale": 8.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 3,
                          "_growth_tracker": 2})
    assert ours.get_scale() == 8.0 and ours.state_dict()["growth_tracker"] == 2
    assert ours.to_torch(torch_scaler).get_scale() == 8.0


# --------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("options", [
    dict(interval=2),
    # LookSAM: g_v from step 2 (a sharpness step) is in the checkpoint and reused by steps 3 and 4
    dict(interval=3, reuse="looksam"),
    # seed 9 draws . S S . . S for steps 0-5: steps 3 and 4 reuse step 2's g_v, and the draws
    # after the checkpoint come from the restored global_step
    dict(interval=2, interval_mode="random", interval_seed=9, reuse="looksam"),
], ids=["interval2", "looksam", "looksam_random"])
def test_resume_from_checkpoint_is_bitwise_equal(tmp_path, options):
    from zsharp_algos.rules import REUSE_KEY
    from zsharp_algos.schedule import sharpness_due

    data = make_data(48)  # 3 steps per epoch: the checkpoint falls on an odd step, mid-phase for interval=2
    callback = lambda: ZSharpCallback(rho=0.05, percentile=70, **options)  # noqa: E731
    straight = Net()
    straight_trainer = fit(straight, data, batch_size=16, epochs=2, callbacks=[callback()])

    first = Net()
    fit(first, data, batch_size=16, epochs=1,
        callbacks=[callback(), ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1)])
    ckpt = tmp_path / "epoch=0-step=3.ckpt"
    saved = torch.load(ckpt, weights_only=False)
    assert saved["optimizer_states"][0]["sharpness"]["step_count"] == 3
    looksam = options.get("reuse") == "looksam"
    assert all((REUSE_KEY in s) == looksam for s in saved["optimizer_states"][0]["state"].values())
    resumed = Net()
    torch.manual_seed(123)
    resumed.net = bn_mlp(seed=7)  # different initial weights: everything must come from the checkpoint
    trainer = fit(resumed, data, batch_size=16, epochs=2, callbacks=[callback()], ckpt_path=str(ckpt))
    assert trainer.global_step == straight_trainer.global_step == 6
    assert_same_state(resumed.net, straight.net)
    for p_straight, p_resumed in zip(straight.net.parameters(), resumed.net.parameters()):
        want, got = straight_trainer.optimizers[0].state[p_straight], trainer.optimizers[0].state[p_resumed]
        assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)  # momentum, g_v
    due = [sharpness_due(t, options["interval"], options.get("interval_mode", "fixed"), options.get("interval_seed", 0))
           for t in range(3, 6)]
    assert resumed.calls == 3 + sum(due)  # the resumed steps 3 to 5, two passes on the sharpness steps
    if looksam:
        assert not due[0]  # the first resumed step is a plain one: it steps with the restored g_v


# --------------------------------------------------------------------------- several processes
def test_ddp_two_cpu_processes_bitwise_equal_and_per_rank_perturbation(tmp_path):
    import lightning_ddp_worker as worker

    env = clean_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=free_port(), PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "lightning_ddp_worker.py"), str(tmp_path)],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for run in ("sam", "zsharp"):
        a, b = ranks[0][run], ranks[1][run]
        for name, value in a["state"].items():
            if "running_" not in name:  # running stats follow DDP's broadcast_buffers (worker doc)
                assert torch.equal(value, b["state"][name]), (run, name)
        assert all(torch.equal(x, y) for x, y in zip(a["momentum"], b["momentum"]))
        stats = {k: v for k, v in a["metrics"].items() if k.startswith("sharpness/")}
        assert stats and stats == {k: b["metrics"][k] for k in stats}  # averaged over ranks
    # The SAM run against a per-rank loop: each rank perturbs along its own (unsynced) gradient
    # of its two micro-batches; the second pass's gradients are averaged.
    x, y = worker.ddp_data()
    shard = [list(range(r, len(y), worker.WORLD)) for r in range(worker.WORLD)]

    def micro(rank, i):
        idx = shard[rank][i * worker.BATCH : (i + 1) * worker.BATCH]
        return x[idx], y[idx]

    def per_rank_run(sync_first_pass: bool):
        model = worker.bn_mlp()
        base = torch.optim.SGD(model.parameters(), lr=worker.LR, momentum=0.9)
        params = list(model.parameters())
        for step in range(worker.STEPS):
            mbs = [[micro(r, step * worker.ACCUMULATE + j) for j in range(worker.ACCUMULATE)] for r in range(2)]
            first = []
            for r in range(2):
                base.zero_grad()
                for xb, yb in mbs[r]:
                    (F.cross_entropy(model(xb), yb) / worker.ACCUMULATE).backward()
                first.append([p.grad.clone() for p in params])
            second = []
            for r in range(2):
                for p, g0, g1, g in zip(params, *first, first[r]):
                    p.grad = (g0 / 2 + g1 / 2) if sync_first_pass else g.clone()
                perturb = SAM(torch.optim.SGD(params, lr=0.0), rho=worker.RHO)
                perturb.first_step(zero_grad=True)
                with frozen_norm_stats(model):
                    for xb, yb in mbs[r]:
                        (F.cross_entropy(model(xb), yb) / worker.ACCUMULATE).backward()
                perturb.restore()
                second.append([p.grad.clone() for p in params])
            for p, g0, g1 in zip(params, *second):
                p.grad = g0 / 2 + g1 / 2
            base.step()
        return dict(model.named_parameters())

    ddp = ranks[0]["sam"]["state"]
    unsynced, synced = per_rank_run(False), per_rank_run(True)
    # Up to the all-reduce's rounding: plain DDP SGD under Lightning differs from the same plain loop
    # by ~1e-8 here too (gloo's averaging); a synced first pass would be off by ~4e-3.
    for name, value in unsynced.items():
        torch.testing.assert_close(ddp[name], value.detach(), rtol=0, atol=1e-7)
    assert max((ddp[n] - v.detach()).abs().max().item() for n, v in synced.items()) > 1e-4  # the test tells them apart


# --------------------------------------------------------------------------- refused set-ups
def test_sharded_strategies_are_refused_when_fit_sets_up():
    # Lightning's FSDP needs CUDA and DeepSpeed is not installed, so the strategies are built
    # without their constructors and put into a CPU trainer; the callback's setup hook (the
    # first thing fit calls after the environment, before the model is wrapped) refuses them.
    from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy

    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    for cls in (FSDPStrategy, DeepSpeedStrategy, ModelParallelStrategy):
        trainer._accelerator_connector.strategy = cls.__new__(cls)
        with pytest.raises(ValueError, match=r"ZSharpCallback supports .*'ddp'.*" + cls.__name__ + ": sharded"):
            ZSharpCallback().setup(trainer, Net(), "fit")
        with pytest.raises(ValueError, match="LightningSAM supports"):
            check_supported(trainer, "LightningSAM")


def test_bad_set_ups_get_clear_errors():
    with pytest.raises(ValueError, match="rho"):
        SAMCallback(rho=-1.0)
    with pytest.raises(ValueError, match="percentile"):
        ZSharpCallback(percentile=150)
    with pytest.raises(TypeError, match="already sharpness-aware"):
        fit(Net("sam"), make_data(16), batch_size=16, steps=1, callbacks=[SAMCallback()])
    with pytest.raises(TypeError, match="runs the sharpness-aware optimizer configure_optimizers returns"):
        fit(Net(), make_data(16), batch_size=16, steps=1, callbacks=[SharpnessAwareCallback()])
    with pytest.raises(TypeError, match="model=self"):
        LightningSAM(nn.Linear(2, 2).parameters(), torch.optim.SGD, lr=0.1)

    class Manual(Net):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False

    with pytest.raises(ValueError, match="automatic_optimization = False"):
        fit(Manual(), make_data(16), batch_size=16, steps=1, callbacks=[SAMCallback()])


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
@pytest.mark.parametrize("optimizer", ["zsharp", "sam"])
def test_a_core_optimizer_without_the_callback_is_refused_before_any_change(optimizer, precision):
    """ZSharp(..., model=self) from configure_optimizers and no callback: Lightning's own step would
    run the closure's hooks and logging at the perturbed weights; it fails naming the callback."""
    module = Net(optimizer)
    start = copy.deepcopy(module.net.state_dict())
    with pytest.raises(RuntimeError, match="without zsharp_algos' callback.*SharpnessAwareCallback"):
        fit(module, make_data(16), batch_size=16, steps=1, precision=precision)
    assert module.calls == 0 and all(torch.equal(v, start[k]) for k, v in module.net.state_dict().items())


def test_options_reach_the_optimizer_they_are_meant_for():
    """perturb_eps is the callback's; the eps of Adam stays the one configure_optimizers set."""

    class AdamNet(Net):
        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-3, eps=1e-3)

    trainer = fit(AdamNet(), make_data(16), batch_size=16, steps=1, callbacks=[ZSharpCallback(perturb_eps=1e-5)])
    group = trainer.optimizers[0].param_groups[0]
    assert (group["eps"], group["sharpness_perturb_eps"]) == (1e-3, 1e-5)
    with pytest.raises(TypeError, match="eps is the base optimizer's; the norm epsilon is perturb_eps"):
        ZSharpCallback(eps=1e-5)
    callback = ZSharpCallback(rho=0.1)
    with pytest.raises(AttributeError, match="fixed when it is built.*optimizer.rho"):
        callback.rho = 0.2
    assert callback.rho == 0.1


# --------------------------------------------------------------------------- pytorch_lightning
def test_pytorch_lightning_package_same_step():
    ptl = pytest.importorskip("pytorch_lightning")
    from zsharp_algos.lightning.pytorch_lightning import SAMCallback as PTLSAMCallback

    class PTLNet(ptl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = bn_mlp()

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = F.cross_entropy(self.net(x), y)
            self.log("train_loss", loss)
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=LR, momentum=MOMENTUM)

    data = make_data(32)
    module = PTLNet()
    ref = copy.deepcopy(module.net)
    trainer = ptl.Trainer(accelerator="cpu", devices=1, max_steps=2, logger=False, enable_checkpointing=False,
                          enable_progress_bar=False, enable_model_summary=False, callbacks=[PTLSAMCallback(rho=0.05)])
    trainer.fit(module, DataLoader(TensorDataset(*data), batch_size=16, shuffle=False))
    opt = SAM(torch.optim.SGD(ref.parameters(), lr=LR, momentum=MOMENTUM), rho=0.05)
    reference_steps(ref, opt, batches(data, 16))
    assert_same_state(module.net, ref)


# --------------------------------------------------------------------------- the example script
def test_train_script_runs_the_papers_setting(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("lightning_train", ROOT / "integrations" / "lightning" / "train.py")
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    out = str(tmp_path / "run")
    small = ["--model", "test_resnet", "--batch-size", "16", "--train-subset", "64", "--test-subset", "32",
             "--output-dir", out, "--no-progress", "--accelerator", "cpu", "--log-every", "1"]
    paper_flags = ["--optim", "zsharp", "--base-optim", "adam", "--lr", "1e-3", "--weight-decay", "0", "--rho", "0.05",
                   "--percentile", "95", "--scope", "tensor"]  # as documented in integrations/lightning/README.md
    summary = train.main(paper_flags + small + ["--max-steps", "2"])
    args = summary["settings"]
    assert {k: args[k] for k in train.PAPER} == train.PAPER
    assert summary["steps"] == 2 and (tmp_path / "run" / "checkpoints" / "last.ckpt").exists()
    assert summary["sharpness"]["sharpness/perturbed_fraction"] < 0.2  # about 5% of the weight matrices' entries
    resumed = train.main(["--paper"] + small + ["--max-steps", "3", "--resume", "last"])  # --paper: the same flags
    assert resumed["steps"] == 3 and resumed["settings"]["scope"] == "tensor"
