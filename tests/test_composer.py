"""Composer integration: ZSharpAlgorithm / SAMAlgorithm in the Composer Trainer (CPU).

References are independent of the integration: a hand-written PyTorch loop over the core
optimizer, an uninterrupted run (for resume), the other rank (for DDP), the same batch without
accumulation, and tests/reference.py for ZSharp's masks.
"""
from __future__ import annotations

import copy
import importlib.util
import json
import math
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

pytest.importorskip("composer")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from composer import Callback, Trainer  # noqa: E402
from composer.loggers import InMemoryLogger  # noqa: E402
from composer.models import ComposerClassifier  # noqa: E402
from composer.trainer._scaler import ClosureGradScaler  # noqa: E402
import composer_ddp_worker as worker  # noqa: E402
from composer_ddp_worker import small_bn_net  # noqa: E402
from launch_env import clean_env, free_port  # noqa: E402
from reference import zsharp_global_masks  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from zsharp_algos import SAM, ZSharp  # noqa: E402
from zsharp_algos.composer import ComposerZSharp, SAMAlgorithm, ZSharpAlgorithm  # noqa: E402
from zsharp_algos.rules import REUSE_KEY  # noqa: E402
from zsharp_algos.schedule import sharpness_due  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NUM_CLASSES = 5


# --------------------------------------------------------------------------- helpers
def make_data(n: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 8, 8, generator=gen), torch.randint(0, NUM_CLASSES, (n,), generator=gen)


def mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(192, 16), nn.ReLU(), nn.Linear(16, NUM_CLASSES))


def seeded(factory, seed: int = 1) -> nn.Module:
    torch.manual_seed(seed)
    return factory()


def sgd(params):
    return torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=5e-4)


def composer_fit(model, algorithm, data, *, batch_size, batches, loggers=(), **trainer_kwargs) -> Trainer:
    x, y = data
    trainer = Trainer(
        model=ComposerClassifier(model, num_classes=NUM_CLASSES),
        train_dataloader=DataLoader(TensorDataset(x, y), batch_size=batch_size),
        optimizers=sgd(model.parameters()),
        max_duration=f"{batches}ba",
        algorithms=[algorithm],
        loggers=list(loggers),
        device="cpu",
        progress_bar=False,
        log_to_console=False,
        seed=0,
        **trainer_kwargs,
    )
    trainer.fit()
    return trainer


def plain_loop(model, optimizer_cls, kwargs, data, *, batch_size, batches):
    """The core optimizer in a hand-written loop over the same batches. Returns, per step,
    whether it was a sharpness step, the first pass's loss and gradients, and the second pass's
    loss (None on plain steps)."""
    x, y = data
    opt = optimizer_cls(sgd(model.parameters()), model=model, **kwargs)
    model.train()
    steps = []
    for i in range(batches):
        j = i % (len(x) // batch_size)
        xb, yb = x[j * batch_size : (j + 1) * batch_size], y[j * batch_size : (j + 1) * batch_size]
        passes: list = []

        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(model(xb), yb)
            loss.backward()
            passes.append((loss.item(), [p.grad.clone() for p in model.parameters()]))
            return loss

        sharp = opt.is_sharpness_step()
        opt.step(closure)
        steps.append((sharp, passes[0][0], passes[0][1], passes[1][0] if sharp else None))
    return steps


def logged(logger: InMemoryLogger, key: str) -> list[float]:
    return [float(v) for _, v in logger.data.get(key, [])]


def assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def optimizer_tensors(opt) -> dict:
    """Every tensor of a (base) optimizer state dict, by 'param index/name'."""
    sd = opt.state_dict()
    return {f"{i}/{k}": v for i, s in sd["state"].items() for k, v in s.items() if torch.is_tensor(v)}


def load_train_script():
    spec = importlib.util.spec_from_file_location("composer_train", ROOT / "integrations" / "composer" / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------------------- packaging
def test_import_zsharp_algos_does_not_import_composer():
    code = "import sys, zsharp_algos; sys.exit('composer' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_algorithm_state_is_plain_and_repr_deterministic(tmp_path):
    algo = ZSharpAlgorithm(rho=0.1, percentile=80, scope="tensor", interval=2)
    assert repr(algo) == repr(ZSharpAlgorithm(rho=0.1, percentile=80, scope="tensor", interval=2))
    assert "0x" not in repr(algo) and "percentile=80.0" in repr(algo)
    torch.save(algo.state_dict(), tmp_path / "algo.pt")
    assert torch.load(tmp_path / "algo.pt", weights_only=True) == algo.state_dict()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        algo.load_state_dict(algo.state_dict())  # same hyper-parameters: silent
    with pytest.warns(UserWarning, match="rho: 0.1 -> 0.2"):
        ZSharpAlgorithm(rho=0.2, percentile=80, scope="tensor", interval=2).load_state_dict(algo.state_dict())
    with pytest.raises(ValueError, match="interval"):
        SAMAlgorithm(interval=0)
    with pytest.raises(ValueError, match="percentile"):
        ZSharpAlgorithm(percentile=100)


def test_refuses_fsdp1_and_sharpness_optimizers_at_construction():
    model = mlp()
    data = DataLoader(TensorDataset(*make_data(8)), batch_size=4)
    common = dict(model=ComposerClassifier(model, num_classes=NUM_CLASSES), train_dataloader=data, device="cpu")
    with pytest.raises(ValueError, match=r"supports single-process, DDP or FSDP2.*FSDP1.*FSDP2Config"):
        Trainer(**common, optimizers=sgd(model.parameters()), algorithms=[ZSharpAlgorithm()],
                parallelism_config={"fsdp": {}})  # Composer 0.32 reads a plain dict as FSDP1
    with pytest.raises(TypeError, match="plain base optimizer"):
        Trainer(**common, optimizers=ZSharp(sgd(model.parameters())), algorithms=[ZSharpAlgorithm()])


def test_check_supported_accepts_fsdp2_only():
    from types import SimpleNamespace

    from composer.utils.parallelism import FSDP2Config, FSDPConfig, TPConfig

    from zsharp_algos.composer.algorithm import check_supported

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="FSDP2 Config/APIs are experimental")
        fsdp2 = FSDP2Config()
    check_supported(SimpleNamespace(fsdp_config=fsdp2), "ZSharpAlgorithm")  # no error
    check_supported(SimpleNamespace(fsdp_config=None), "ZSharpAlgorithm")
    with pytest.raises(ValueError, match=r"FSDP1.*FSDP2Config"):
        check_supported(SimpleNamespace(fsdp_config=FSDPConfig()), "ZSharpAlgorithm")
    for state, what in [(SimpleNamespace(fsdp_config=fsdp2, tp_config=TPConfig()), "tensor parallelism"),
                        (SimpleNamespace(deepspeed_config={"zero": 3}), "DeepSpeed"),
                        (SimpleNamespace(device=SimpleNamespace(dist_backend="xla")), "XLA")]:
        with pytest.raises(ValueError, match=what):
            check_supported(state, "SAMAlgorithm")


# --------------------------------------------------------------------------- equivalence
@pytest.mark.parametrize("interval", [1, 3])
@pytest.mark.parametrize(
    "algorithm_cls, optimizer_cls, direction_kwargs",
    [(SAMAlgorithm, SAM, {}), (ZSharpAlgorithm, ZSharp, {"percentile": 70.0})],
    ids=["sam", "zsharp"],
)
def test_trainer_matches_plain_pytorch_loop(algorithm_cls, optimizer_cls, direction_kwargs, interval):
    data, batches, batch_size, rho = make_data(48), 6, 12, 0.05
    model = seeded(small_bn_net)
    reference_model = copy.deepcopy(model)
    logger = InMemoryLogger()
    algorithm = algorithm_cls(rho=rho, interval=interval, log_interval=1, **direction_kwargs)
    composer_fit(model, algorithm, data, batch_size=batch_size, batches=batches, loggers=[logger])
    steps = plain_loop(
        reference_model, optimizer_cls, dict(rho=rho, interval=interval, **direction_kwargs),
        data, batch_size=batch_size, batches=batches,
    )

    # Same weights and BatchNorm statistics (to fp32 round-off; in practice bit for bit).
    got, want = model.state_dict(), reference_model.state_dict()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=1e-7, msg=k)
    # The logged training loss is the first pass's (the perturbed pass is not logged).
    assert logged(logger, "loss/train/total") == pytest.approx([loss for _, loss, _, _ in steps], rel=1e-6)
    # Metrics of every sharpness step (log_interval=1), against the reference loop's gradients.
    sharp_grads = [grads for sharp, _, grads, _ in steps if sharp]
    gaps = [second - first for sharp, first, _, second in steps if sharp]
    assert logged(logger, "sharpness/loss_gap") == pytest.approx(gaps, rel=1e-5, abs=1e-7)
    assert len(sharp_grads) == batches // interval
    prefix = "sharpness"  # one namespace for every framework
    norms = [torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item() for grads in sharp_grads]
    assert logged(logger, f"{prefix}/grad_norm") == pytest.approx(norms, rel=1e-5)
    assert logged(logger, f"{prefix}/perturbation_norm") == pytest.approx([rho] * len(norms), rel=1e-5)
    if optimizer_cls is ZSharp:
        fractions = []
        for grads in sharp_grads:
            masks = zsharp_global_masks(grads, direction_kwargs["percentile"])
            kept = sum(int((m & (g != 0)).sum()) for m, g in zip(masks, grads))
            fractions.append(kept / sum(g.numel() for g in grads))
        assert logged(logger, "sharpness/perturbed_fraction") == pytest.approx(fractions, rel=1e-6)


def test_options_reach_the_optimizer_they_are_meant_for():
    """perturb_eps is the algorithm's; the trainer's Adam keeps its eps."""
    model = seeded(mlp)
    x, y = make_data(24)
    trainer = Trainer(
        model=ComposerClassifier(model, num_classes=NUM_CLASSES), train_dataloader=DataLoader(TensorDataset(x, y), batch_size=12),
        optimizers=torch.optim.Adam(model.parameters(), lr=1e-3, eps=1e-3), max_duration="1ba", device="cpu",
        algorithms=[ZSharpAlgorithm(perturb_eps=1e-5)], progress_bar=False, log_to_console=False,
    )
    trainer.fit()
    group = trainer.state.optimizers[0].param_groups[0]
    assert (group["eps"], group["sharpness_perturb_eps"]) == (1e-3, 1e-5)
    with pytest.raises(TypeError, match="eps is the base optimizer's"):
        ZSharpAlgorithm(eps=1e-5)
    with pytest.raises(AttributeError, match="fixed when it is built"):
        ZSharpAlgorithm().rho = 0.1


@pytest.mark.parametrize("algorithm_cls", [SAMAlgorithm, ZSharpAlgorithm], ids=["sam", "zsharp"])
def test_gradient_accumulation_matches_whole_batch(algorithm_cls):
    """The closure runs every micro-batch, so the perturbation uses the whole batch's gradient:
    with no BatchNorm (whose statistics are per micro-batch) accumulation 2 equals accumulation 1
    up to the round-off of summing the two halves' gradients."""
    data = make_data(24)
    runs = {}
    for microbatch in (12, 6):
        model = seeded(mlp)
        trainer = composer_fit(
            model, algorithm_cls(rho=0.1), data, batch_size=12, batches=4, device_train_microbatch_size=microbatch
        )
        runs[microbatch] = (model.state_dict(), trainer.state.total_loss_dict["loss/train/total"])
    (whole, whole_loss), (halves, halves_loss) = runs[12], runs[6]
    for k in whole:
        torch.testing.assert_close(halves[k], whole[k], rtol=1e-5, atol=1e-6, msg=k)
    assert halves_loss == pytest.approx(whole_loss, rel=1e-6)


# --------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("options", [
    dict(interval=3),
    # LookSAM: g_v from batch 4 (a sharpness step) is in the checkpoint and reused by batches 5 to 8
    dict(interval=5, reuse="looksam"),
    # seed 4 draws . . S S S . . S S for batches 0-8: batches 5 and 6 reuse batch 4's g_v, and the
    # draws after the checkpoint come from Composer's restored batch counter
    dict(interval=2, interval_mode="random", interval_seed=4, reuse="looksam"),
], ids=["interval3", "looksam", "looksam_random"])
def test_resume_is_bitwise_identical_to_uninterrupted_run(tmp_path, options):
    """A checkpoint at batch 5 (mid-phase, mid-epoch), BatchNorm, momentum (and LookSAM's g_v)."""
    data = make_data(16)

    def run(**kwargs):
        model = seeded(small_bn_net)
        trainer = composer_fit(model, ZSharpAlgorithm(**options), data, batch_size=4, batches=9, **kwargs)
        return model, trainer

    full_model, full = run(save_folder=str(tmp_path), save_interval="5ba", save_filename="ba{batch}.pt")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resumed_model, resumed = run(load_path=str(tmp_path / "ba5.pt"))
    messages = [str(w.message) for w in caught]
    assert not [m for m in messages if "not in the state_dict" in m or "different hyper-parameters" in m]

    assert int(resumed.state.timestamp.batch) == int(full.state.timestamp.batch) == 9
    assert_same_tensors(resumed_model.state_dict(), full_model.state_dict())  # weights + BN statistics
    base_full, base_resumed = full.state.optimizers[0].base_optimizer, resumed.state.optimizers[0].base_optimizer
    per_param = 2 if options.get("reuse") == "looksam" else 1  # momentum, and g_v
    assert len(optimizer_tensors(base_full)) == per_param * len(list(full_model.parameters()))
    assert_same_tensors(optimizer_tensors(base_resumed), optimizer_tensors(base_full))
    assert base_resumed.state_dict()["param_groups"] == base_full.state_dict()["param_groups"]
    saved = torch.load(tmp_path / "ba5.pt", weights_only=False)["state"]["optimizers"]["ComposerZSharp"]["state"]
    assert all((REUSE_KEY in s) == (per_param == 2) for s in saved.values())  # the resumed run started from it


# --------------------------------------------------------------------------- data parallel
def launch_two_ranks(script: Path, *args: str, timeout: float = 300) -> None:
    """Start ``script`` as ranks 0 and 1 of a gloo process group (the environment ``composer -n 2``
    and ``torchrun`` set up) and wait for both."""
    port = free_port()
    procs = []
    for rank in (0, 1):
        env = clean_env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                        NODE_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        procs.append(subprocess.Popen([sys.executable, str(script), *args], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    try:
        outputs = [p.communicate(timeout=timeout)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for rank, (p, out) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"rank {rank} failed:\n{out[-3000:]}"


def test_two_ranks_end_bitwise_equal(tmp_path):
    """2 processes (gloo), unsynced first passes: ours keep the replicas bitwise equal, where
    Composer's own SAM (restore by subtraction) has already drifted in the same run. In the same
    launch, LookSAM reuse (its first pass all-reduced, g_v the same on both ranks) and random
    intervals (both ranks draw the same steps, those of ``sharpness_due``) end bitwise equal too,
    and LookSAM's run is the core optimizer's on the ranks' averaged gradients."""
    steps, algorithms = 12, ["zsharp", "sam", "composer_sam", "sam_looksam", "zsharp_random"]
    launch_two_ranks(ROOT / "tests" / "composer_ddp_worker.py", str(tmp_path), str(steps), *algorithms)

    def params(state):  # BatchNorm running statistics are per rank under DDP (rank 0's are broadcast)
        return {k: v for k, v in state["model"].items() if "running" not in k and "num_batches" not in k}

    for name in algorithms:
        rank0, rank1 = (torch.load(tmp_path / f"{name}-rank{r}.pt", weights_only=True) for r in (0, 1))
        if name == "composer_sam":
            drift = max((params(rank0)[k] - params(rank1)[k]).abs().max().item() for k in params(rank0))
            assert drift > 0, "control: Composer's SAM was expected to drift in this setting"
            continue
        assert_same_tensors(params(rank0), params(rank1))
        states = [[s for _, s in sorted(r["optimizer"]["state"].items())] for r in (rank0, rank1)]
        assert len(states[0]) == len(params(rank0)) and all("momentum_buffer" in s for s in states[0])
        for a, b in zip(*states):  # momentum, and LookSAM's g_v where there is one
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
        options = worker.OPTIONS[name]
        sharp = [sharpness_due(t, options["interval"], options.get("interval_mode", "fixed"),
                               options.get("interval_seed", 0)) for t in range(steps)]
        assert rank0["forwards"] == rank1["forwards"] == steps + sum(sharp), name  # two passes on those steps
        if name == "zsharp_random":
            assert 0 < sum(sharp) < steps and sharp != [(t + 1) % 2 == 0 for t in range(steps)]  # not the fixed phase
        assert all(REUSE_KEY in s for s in states[0]) == (options.get("reuse") == "looksam"), name

    # LookSAM under DDP is the core optimizer on the mean of the ranks' gradients, both passes
    # (BatchNorm normalises each rank's batch by its own statistics in training mode); without
    # the reuse the same loop ends elsewhere, so the comparison sees it. (SAM: ZSharp's mask
    # would also depend on the round-off noise that is the gradient of the conv bias before
    # BatchNorm, whose true gradient is 0.)
    got = params(torch.load(tmp_path / "sam_looksam-rank0.pt", weights_only=True))
    for reuse, close in (("looksam", True), ("none", False)):
        ref = looksam_reference(steps, dict(worker.OPTIONS["sam_looksam"], reuse=reuse))
        if close:
            for k, v in ref.items():
                torch.testing.assert_close(got[k], v, rtol=1e-5, atol=1e-6, msg=k)
        else:
            assert max((got[k] - v).abs().max().item() for k, v in ref.items()) > 1e-4


def looksam_reference(steps: int, options: dict) -> dict:
    """The core SAM in one process, each pass's gradient the mean over the 2 ranks' batches."""
    x, y = worker.ddp_data()
    torch.manual_seed(1)
    model = worker.small_bn_net()
    opt = SAM(torch.optim.SGD(model.parameters(), lr=worker.LR, momentum=worker.MOMENTUM), model=model, **options)
    for t in range(steps):
        rank_batches = [worker.rank_batch(x, y, r, t) for r in range(worker.WORLD)]

        def closure():
            opt.zero_grad()
            loss = sum(F.cross_entropy(model(xb), yb) for xb, yb in rank_batches) / worker.WORLD
            loss.backward()
            return loss

        opt.step(closure)
    return {k: v.detach() for k, v in model.named_parameters()}


def test_fsdp2_on_two_ranks_matches_the_unsharded_loop(tmp_path):
    """2 gloo processes, Composer's FSDP2 (``fully_shard`` on the model's children and root):
    the optimizers step DTensor parameters, keep a work buffer of the local shard's size, and
    end at the weights of the core optimizer on the whole global batches (float32 round-off)."""
    steps, algorithms = 4, ["zsharp", "zsharp_tensor", "sam_interval2"]
    launch_two_ranks(ROOT / "tests" / "composer_fsdp_worker.py", str(tmp_path), str(steps), *algorithms)
    for name in algorithms:
        ranks = [json.loads((tmp_path / f"{name}-rank{r}.json").read_text()) for r in (0, 1)]
        for r in ranks:
            assert r["dtensor"] and r["same_as_model"] and r["step_count"] == steps, (name, r)
            assert r["buffer_nbytes"] == r["local_param_nbytes"] < r["global_param_nbytes"], (name, r)
        assert sum(r["local_param_nbytes"] for r in ranks) == ranks[0]["global_param_nbytes"]
        assert ranks[0]["max_rel_diff"] <= 1e-6, (name, ranks[0]["rel_diffs"])


def test_fsdp2_sharded_checkpoint_resume_is_bitwise_equal(tmp_path):
    """Composer's sharded checkpoint under FSDP2 (torch.distributed.checkpoint) halfway through
    4 batches, resumed in a fresh Trainer: the same weights bit for bit as the uninterrupted run,
    the step counter restored, ``interval=2`` in phase."""
    launch_two_ranks(ROOT / "tests" / "composer_fsdp_worker.py", str(tmp_path), "4", "resume:sam_interval2")
    for r in (0, 1):
        result = json.loads((tmp_path / f"resume-sam_interval2-rank{r}.json").read_text())
        assert result == {"bitwise_equal": True, "step_count_after_load": 2, "step_count": 4}


# --------------------------------------------------------------------------- fp16 protocol
def test_fp16_closure_protocol_with_composers_scaler():
    """What the trainer does under amp_fp16 (Composer allows fp16 on CUDA only, so this drives
    its ClosureGradScaler by hand on CPU): a clean step equals the unscaled core step bit for
    bit (the scale is a power of two), and an overflow in the second pass skips the step with
    weights and momentum exactly as they were, and backs the scale off."""
    x, y = make_data(8)
    model = seeded(small_bn_net)
    reference = copy.deepcopy(model)
    opt = ComposerZSharp(sgd(model.parameters()), model=model)
    ref_opt = ZSharp(sgd(reference.parameters()), model=reference)
    scaler = ClosureGradScaler(device="cpu", init_scale=2.0**10)
    blow_up = {"pass": None}
    calls = []

    def trainer_closure(loss_dict=None, ddp_sync=True):  # as Trainer._train_microbatches
        calls.append(len(calls) + 1)
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        if blow_up["pass"] == len(calls):
            loss = loss * float("inf")
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        return loss.detach()

    def reference_closure():
        ref_opt.zero_grad()
        loss = F.cross_entropy(reference(x), y)
        loss.backward()
        return loss

    for _ in range(2):  # clean steps
        calls.clear()
        assert scaler.step(opt, closure=trainer_closure) is not None
        scaler.update()
        ref_opt.step(reference_closure)
        assert calls == [1, 2]
    assert_same_tensors(model.state_dict(), reference.state_dict())
    assert_same_tensors(optimizer_tensors(opt), optimizer_tensors(ref_opt))

    def weights():  # (the skipped step's first forward still updates BatchNorm statistics, as with any AMP skip)
        return {k: v.detach().clone() for k, v in model.named_parameters()}

    before_weights, before_state = weights(), copy.deepcopy(optimizer_tensors(opt))
    calls.clear()
    blow_up["pass"] = 2
    assert scaler.step(opt, closure=trainer_closure) is None
    scaler.update()
    assert calls == [1, 2]
    assert_same_tensors(weights(), before_weights)
    assert_same_tensors(optimizer_tensors(opt), before_state)
    assert scaler.get_scale() == 2.0**9


@pytest.mark.skipif(not torch.cuda.is_available(), reason="Composer runs amp_fp16 on CUDA only")
def test_amp_fp16_trainer_on_cuda_matches_core_loop_and_skips_overflow_exactly():
    """The real trainer under amp_fp16 (Composer's ClosureGradScaler) against a hand-written
    autocast loop with the core ClosureGradScaler; then an inf injected into the second pass of
    a sharpness step: that step is skipped with the weights bitwise unchanged."""
    from zsharp_algos import ClosureGradScaler as CoreScaler

    torch.backends.cudnn.benchmark = False
    x, y = make_data(64)
    batch_size, batches = 16, 8
    bomb = {"batch": None, "current": -1, "calls": 0}
    snapshots, scales = [], []

    class Watch(Callback):
        def batch_start(self, state, logger):
            bomb["current"], bomb["calls"] = int(state.timestamp.batch), 0

        def batch_end(self, state, logger):
            snapshots.append({k: v.detach().clone() for k, v in state.model.named_parameters()})
            scales.append(state.scaler.get_scale())

    def loss_fn(outputs, targets):
        bomb["calls"] += 1
        loss = F.cross_entropy(outputs, targets)
        return loss * float("inf") if (bomb["current"], bomb["calls"]) == (bomb["batch"], 2) else loss

    def run():
        snapshots.clear()
        scales.clear()
        model = seeded(small_bn_net)
        trainer = Trainer(
            model=ComposerClassifier(model, num_classes=NUM_CLASSES, loss_fn=loss_fn),
            train_dataloader=DataLoader(TensorDataset(x, y), batch_size=batch_size),
            optimizers=sgd(model.parameters()), max_duration=f"{batches}ba",
            algorithms=[ZSharpAlgorithm(interval=2)], callbacks=[Watch()], device="gpu", precision="amp_fp16",
            progress_bar=False, log_to_console=False, seed=0,
        )
        trainer.fit()
        return model, trainer

    model, trainer = run()
    assert isinstance(trainer.state.scaler, ClosureGradScaler)
    reference = seeded(small_bn_net).cuda()
    step = {"i": 0}  # the trainer's phase counts batches, skipped (overflowed) ones included
    opt = ZSharp(sgd(reference.parameters()), model=reference, interval=2, schedule=lambda: step["i"])
    scaler = CoreScaler()
    for i in range(batches):
        j = i % (len(x) // batch_size)
        xb, yb = x[j * batch_size : (j + 1) * batch_size].cuda(), y[j * batch_size : (j + 1) * batch_size].cuda()

        def closure():
            opt.zero_grad()
            with torch.autocast("cuda", dtype=torch.float16):
                loss = F.cross_entropy(reference(xb), yb)
            scaler.scale(loss).backward()
            return loss

        step["i"] = i
        scaler.step(opt, closure)
        scaler.update()
    for k, v in reference.state_dict().items():
        torch.testing.assert_close(model.state_dict()[k], v, rtol=1e-5, atol=1e-6, msg=k)

    bomb["batch"] = 3  # a sharpness step (interval 2): its second pass overflows
    run()
    assert_same_tensors(snapshots[3], snapshots[2])
    assert any(not torch.equal(snapshots[4][k], snapshots[3][k]) for k in snapshots[3])
    assert scales[3] == scales[2] / 2  # backed off (scaler.update() runs before BATCH_END)


# --------------------------------------------------------------------------- YAML runs
@pytest.mark.parametrize("path", sorted((ROOT / "yamls" / "composer").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_yaml_config_builds(path):
    """Every config resolves its base chain and builds its optimizer, scheduler and algorithms
    (the constructors validate every option), each option reaching the algorithm as written;
    the runs themselves are two configs below and the README's commands."""
    train = load_train_script()
    cfg = train.load_config(path)
    assert {"model", "data", "optimizer", "trainer"} <= cfg.keys(), path.name
    assert cfg["trainer"]["run_name"].startswith(path.stem.replace("_", "-")), path.name
    train.build_optimizer(cfg["optimizer"], mlp())
    train.build_scheduler(cfg.get("scheduler"))
    algorithms = train.build_algorithms(cfg.get("algorithms"))
    assert [type(a) for a in algorithms] == [train.ALGORITHMS[name] for name in cfg.get("algorithms") or {}]
    for algorithm, written in zip(algorithms, (cfg.get("algorithms") or {}).values()):
        assert {k: algorithm.hparams()[k] for k in written} == written, path.name
    if "looksam" in path.stem:  # the configs the README's "Fewer passes" paragraph names
        assert written["reuse"] == "looksam" and written["interval"] == 5
    if "random" in path.stem:
        assert written["interval_mode"] == "random" and written["interval"] > 1


@pytest.mark.parametrize(
    "config, model_overrides",
    [("resnet18_zsharp.yaml", []), ("vit_tiny_zsharp_paper.yaml", ["model.kwargs.depth=2"])],  # 2 of 12 blocks
    ids=["resnet18", "vit_tiny"],
)
def test_yaml_run_trains_timm_model(config, model_overrides):
    pytest.importorskip("timm")
    pytest.importorskip("sklearn")
    train = load_train_script()
    path = str(ROOT / "yamls" / "composer" / config)
    overrides = [
        "trainer.max_duration=2ba", "trainer.log_to_console=false", "trainer.eval_interval=2ba",
        "scheduler={name: constant}",  # the configs warm up from lr 0 over the first epoch
        "data.batch_size=8", "data.train_subset=16", "data.test_subset=8", *model_overrides,
    ]
    cfg = train.load_config(path, overrides)
    torch.manual_seed(cfg["seed"])
    initial = dict(train.build_model(cfg["model"], 10).named_parameters())  # what build_trainer starts from
    trainer = train.main(["--config", path, *overrides])

    assert int(trainer.state.timestamp.batch) == 2
    assert [type(a).__name__ for a in trainer.state.algorithms] == ["ZSharpAlgorithm"]
    assert math.isfinite(trainer.state.total_loss_dict["loss/train/total"])
    assert 0.0 <= trainer.state.eval_metric_values["MulticlassAccuracy"] <= 1.0
    final = dict(trainer.state.model.named_parameters())
    assert final.keys() == initial.keys()
    assert all(torch.isfinite(p).all() for p in final.values())
    changed = [k for k in initial if not torch.equal(initial[k], final[k])]
    assert len(changed) >= len(initial) // 2, f"only {len(changed)} of {len(initial)} parameters were trained"
