"""``zsharp_algos.accelerate_loop``: the two-pass helper in accelerate loops, and the example script
``integrations/accelerate/train.py``; checked against plain-PyTorch math (``two_pass_reference``)."""
from __future__ import annotations

import copy
import functools
import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from launch_env import clean_env, free_port
import torch
import torch.nn.functional as F

accelerate = pytest.importorskip("accelerate")

from accelerate import Accelerator  # noqa: E402
from accelerate.state import AcceleratorState, GradientState  # noqa: E402

from zsharp_algos import SAM, ZSharp  # noqa: E402
from zsharp_algos.accelerate_loop import TwoPassBackward  # noqa: E402

from reference import sam_perturbation, zsharp_global_perturbation  # noqa: E402
from two_pass_reference import (  # noqa: E402
    accumulated_step,
    assert_same,
    data_parallel_run,
    data_parallel_step,
    mlp,
    two_pass_gradient,
)

ROOT = Path(__file__).resolve().parents[1]
TRAIN_SCRIPT = ROOT / "integrations" / "accelerate" / "train.py"


def reset_accelerate_state():
    """accelerate keeps process-wide singletons; each Accelerator here starts afresh."""
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    reset_accelerate_state()
    yield
    reset_accelerate_state()


def batches(n, seed=0, size=12):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 6, generator=gen), torch.randint(0, 3, (size,), generator=gen)) for _ in range(n)]


def train_with_helper(accelerator, model, optimizer, data, grad_accum=1, scheduler=None):
    """The loop from the zsharp_algos.accelerate_loop docstring."""
    sharp = TwoPassBackward(accelerator, optimizer)
    prepared = accelerator.prepare(model, sharp.optimizer, *([scheduler] if scheduler else []))
    model, opt = prepared[:2]
    for x, y in data:
        with accelerator.accumulate(model):
            sharp.backward(model, lambda: F.cross_entropy(model(x), y))
            opt.step()
            if scheduler is not None:
                prepared[2].step()
            opt.zero_grad()
    return sharp, opt


# --------------------------------------------------------------------------- one process
@pytest.mark.parametrize("name,interval", [("zsharp", 1), ("sam", 2)])
def test_helper_step_equals_core_closure_step(name, interval):
    model, data = mlp(), batches(4)
    ref = copy.deepcopy(model)
    cls = ZSharp if name == "zsharp" else SAM

    def make(m, **kw):
        return cls(torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9), rho=0.1, interval=interval, **kw)

    train_with_helper(Accelerator(cpu=True), model, make(model), data)

    core = make(ref, model=ref)
    for x, y in data:
        def closure(x=x, y=y):
            core.zero_grad()
            loss = F.cross_entropy(ref(x), y)
            loss.backward()
            return loss
        core.step(closure)
    assert_same(model.state_dict(), ref.state_dict())


def test_gradient_accumulation_perturbs_each_micro_batch_by_its_own_gradient():
    model, data = mlp(), batches(4)
    ref = copy.deepcopy(model)
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    train_with_helper(accelerator, model, SAM(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), rho=0.2), data,
                      grad_accum=2)
    opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    for k in range(0, 4, 2):
        accumulated_step(ref, data[k:k + 2], functools.partial(sam_perturbation, rho=0.2), opt)
    assert_same(model.state_dict(), ref.state_dict(), exact=False)


def test_bf16_autocast_matches_the_math_under_autocast():
    model, data = mlp(bn=False), batches(2)
    ref = copy.deepcopy(model)
    train_with_helper(Accelerator(cpu=True, mixed_precision="bf16"), model,
                      ZSharp(torch.optim.SGD(model.parameters(), lr=0.1), rho=0.2), data)
    opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    perturbation = lambda params, grads: zsharp_global_perturbation(grads, rho=0.2)  # noqa: E731
    def loss_fn(m, x, y):  # accelerate autocasts the model's forward and returns fp32 outputs
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = m(x).float()
        return F.cross_entropy(logits, y)

    for x, y in data:
        grads = two_pass_gradient(ref, functools.partial(loss_fn, x=x, y=y), perturbation)
        for p, g in zip(ref.parameters(), grads):
            p.grad = g
        opt.step()
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert_same(model.state_dict(), ref.state_dict(), exact=False, rtol=1e-4, atol=1e-5)


def _fp16_accelerator(device):
    """fp16 loss scaling: accelerate's own on CUDA; on the CPU (where accelerate has no fp16
    scaler) the same torch GradScaler, handed to the Accelerator before prepare."""
    if device == "cuda":
        if not torch.cuda.is_available():
            pytest.skip("needs a CUDA GPU")
        return Accelerator(mixed_precision="fp16")
    accelerator = Accelerator(cpu=True)
    accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    return accelerator


@pytest.mark.filterwarnings(r"ignore:Detected call of `lr_scheduler.step\(\)` before")
@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("bad_pass", [1, 2])
def test_fp16_overflow_in_either_pass_skips_step_and_scheduler(device, bad_pass):
    accelerator = _fp16_accelerator(device)
    model = mlp()
    start = copy.deepcopy(model.state_dict())
    optimizer = ZSharp(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), rho=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    sharp = TwoPassBackward(accelerator, optimizer)
    model, opt, sched = accelerator.prepare(model, sharp.optimizer, scheduler)
    (x, y), = batches(1)
    x, y = x.to(accelerator.device), y.to(accelerator.device)
    scale_before = accelerator.scaler.get_scale()
    calls = []

    def loss_fn():
        calls.append(1)
        inputs = x * float("inf") if len(calls) == bad_pass else x
        return F.cross_entropy(model(inputs), y)

    with accelerator.accumulate(model):
        sharp.backward(model, loss_fn)
        opt.step()
        sched.step()
        opt.zero_grad()
    assert len(calls) == 2
    assert opt.step_was_skipped
    assert accelerator.scaler.get_scale() == scale_before / 2
    assert sched.get_last_lr() == [0.1]  # the scheduler did not step
    assert optimizer.step_count == 0 and not optimizer.state  # no momentum buffer was made
    # the weights are the unperturbed ones (BatchNorm stats move in the first pass, as always)
    now = accelerator.unwrap_model(model).state_dict()
    assert_same({k: v.cpu() for k, v in now.items() if "running" not in k and "num_batches" not in k},
                {k: v for k, v in start.items() if "running" not in k and "num_batches" not in k})
    # and the next, clean step trains
    with accelerator.accumulate(model):
        sharp.backward(model, lambda: F.cross_entropy(model(x), y))
        opt.step()
        sched.step()
        opt.zero_grad()
    assert not opt.step_was_skipped and optimizer.step_count == 1 and sched.get_last_lr() == [0.05]


def test_step_without_the_passes_is_refused_and_bad_setups_too():
    model = mlp()
    sam = SAM(torch.optim.SGD(model.parameters(), lr=0.1), rho=0.1)
    (x, y), = batches(1)
    F.cross_entropy(model(x), y).backward()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(RuntimeError, match="without a closure on a sharpness step"):
        sam.step()  # what a loop that bypassed TwoPassBackward.backward would do
    assert_same(model.state_dict(), before)

    class FakeAccelerator:
        distributed_type = accelerate.utils.DistributedType.DEEPSPEED

    with pytest.raises(ValueError, match="DEEPSPEED mode; supported: .* FSDP2 .*fsdp_version: 2"):
        TwoPassBackward(FakeAccelerator(), SAM(torch.optim.SGD(model.parameters(), lr=0.1)))


def _fsdp_accelerator(**plugin):
    """An Accelerator in accelerate's FSDP mode with ``plugin``'s settings, set on the state as
    integrations/accelerate/train.py does on CPUs (accelerate sets FSDP up only on accelerators)."""
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    accelerator = Accelerator(cpu=True)
    accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin(**plugin)
    accelerator.state.distributed_type = DistributedType.FSDP
    return accelerator


def test_fsdp1_and_fsdp2_with_cpu_offload_are_refused_fsdp2_accepted():
    model = mlp()
    before = copy.deepcopy(model.state_dict())
    make = lambda: ZSharp(torch.optim.SGD(model.parameters(), lr=0.1))  # noqa: E731
    with pytest.raises(ValueError, match=r"FSDP version 1 .*use FSDP2: `fsdp_version: 2` in the accelerate config"):
        TwoPassBackward(_fsdp_accelerator(fsdp_version=1), make())
    reset_accelerate_state()
    with pytest.raises(ValueError, match="FSDP2 with CPU offload"):
        TwoPassBackward(_fsdp_accelerator(fsdp_version=2, cpu_offload=True), make())
    reset_accelerate_state()
    accelerator = _fsdp_accelerator(fsdp_version=2)
    assert accelerator.is_fsdp2
    assert TwoPassBackward(accelerator, make()).sharpness is not None
    assert_same(model.state_dict(), before)


def test_state_dict_roundtrip_keeps_interval_phase():
    model = mlp()
    sam = SAM(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), interval=2)
    _, opt = train_with_helper(Accelerator(cpu=True), model, sam, batches(3))
    state = opt.state_dict()
    assert state["sharpness"]["step_count"] == 3 and state["state"]  # momentum buffers too
    other = SAM(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), interval=2)
    other.load_state_dict(state)
    assert other.step_count == 3 and other.is_sharpness_step()
    assert other.param_groups is other.base_optimizer.param_groups


# --------------------------------------------------------------------------- two processes
WORKER = r'''
import json
import sys
import torch, torch.nn.functional as F
from accelerate import Accelerator
from torch.nn.parallel import DistributedDataParallel
from zsharp_algos import GCSAM, GSAM, SAM, FriendlySAM, ZSharp
from zsharp_algos.accelerate_loop import TwoPassBackward
sys.path.insert(0, sys.argv[2])
from two_pass_reference import mlp

accelerator = Accelerator(cpu=True)  # gloo; also the process group of the core's own DDP run
saved = {"world": accelerator.num_processes}
for name, cfg in json.loads(sys.argv[3]).items():
    model = mlp(bn=False)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    cls = {"sam": SAM, "zsharp": ZSharp, "friendlysam": FriendlySAM, "gsam": GSAM, "gcsam": GCSAM}[cfg["optimizer"]]
    opt = cls(torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9), **cfg["options"])
    gen = torch.Generator().manual_seed(100 + accelerator.process_index)  # every rank its own batches
    seen = [[(torch.randn(8, 6, generator=gen), torch.randint(0, 3, (8,), generator=gen))
             for _ in range(cfg["accumulate"])] for _ in range(cfg["steps"])]
    if cfg["driver"] == "core":  # torch's DDP and the closure step: both passes all-reduced by backward
        ddp = DistributedDataParallel(model)
        for (x, y), in seen:
            def closure():
                opt.zero_grad()
                loss = F.cross_entropy(ddp(x), y)
                loss.backward()
                return loss
            opt.step(closure)
    else:
        accelerator.gradient_accumulation_steps = cfg["accumulate"]
        accelerator.step = 0  # the micro-batch counter of accumulate(), left over from the previous run
        sharp = TwoPassBackward(accelerator, opt)
        prepared, optimizer = accelerator.prepare(model, sharp.optimizer)
        for micro in seen:
            for x, y in micro:
                with accelerator.accumulate(prepared):
                    sharp.backward(prepared, lambda: F.cross_entropy(prepared(x), y))
                    optimizer.step()
                    optimizer.zero_grad()
    saved[name] = {"init": init, "seen": seen, "final": {k: v.clone() for k, v in model.state_dict().items()},
                   "state": [{k: v.clone() for k, v in opt.state[p].items()} for p in model.parameters()],
                   "step_count": opt.step_count}
torch.save(saved, f"{sys.argv[1]}/rank{accelerator.process_index}.pt")
'''

#: One launch, four runs: the first as before; LookSAM with 2 micro-batches a step (accelerate
#: puts the first under no_sync, and the first pass must be all-reduced anyway); random
#: intervals (seed 10 draws S . S . for steps 0-3, where the fixed phase is . S . S); the core's
#: step(closure) on torch's own DDP with both.
DDP_RUNS = {
    "zsharp": dict(driver="accelerate", optimizer="zsharp", options=dict(rho=0.5), accumulate=1, steps=3),
    "sam_looksam_accumulate2": dict(driver="accelerate", optimizer="sam", accumulate=2, steps=4,
                                    options=dict(rho=0.5, interval=2, reuse="looksam", reuse_alpha=0.7)),
    "zsharp_random": dict(driver="accelerate", optimizer="zsharp", accumulate=1, steps=4,
                          options=dict(rho=0.5, interval=2, interval_mode="random", interval_seed=10)),
    "core_looksam_random": dict(driver="core", optimizer="sam", accumulate=1, steps=4,
                                options=dict(rho=0.5, interval=2, interval_mode="random", interval_seed=10,
                                             reuse="looksam", reuse_alpha=0.7)),
    # the SAM family: FriendlySAM's m and GSAM's step from each micro-batch's first pass, which
    # they make all-reduced (first_pass_must_sync); GCSAM's keeps each rank's own
    "friendlysam_accumulate2": dict(driver="accelerate", optimizer="friendlysam", accumulate=2, steps=3,
                                    options=dict(rho=0.5)),
    "gsam": dict(driver="accelerate", optimizer="gsam", accumulate=1, steps=3, options=dict(rho=0.5, alpha=0.3)),
    "gcsam": dict(driver="accelerate", optimizer="gcsam", accumulate=1, steps=3, options=dict(rho=0.5)),
}


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("ddp")
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    launcher = Path(sys.executable).with_name("accelerate")
    # `--multi_gpu` is accelerate's torchrun-based launcher; the worker's Accelerator(cpu=True) makes it gloo DDP.
    cmd = [str(launcher), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", free_port(),
           str(script), str(tmp_path), str(Path(__file__).parent), json.dumps(DDP_RUNS)]
    done = subprocess.run(cmd, env=clean_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    assert ranks[0]["world"] == 2
    return ranks


def test_two_processes_end_bitwise_equal_and_match_per_rank_first_pass_math(two_processes):
    r0, r1 = (r["zsharp"] for r in two_processes)
    assert_same(r0["final"], r1["final"])  # replicas identical, bitwise

    model = mlp(bn=False)
    model.load_state_dict(r0["init"])
    other = copy.deepcopy(model)
    perturbation = lambda params, grads: zsharp_global_perturbation(grads, rho=0.5)  # noqa: E731
    opt, other_opt = (torch.optim.SGD(m.parameters(), lr=0.2, momentum=0.9) for m in (model, other))
    for step in range(3):
        rank_batches = [r0["seen"][step][0], r1["seen"][step][0]]
        data_parallel_step(model, rank_batches, perturbation, opt)
        data_parallel_step(other, rank_batches, perturbation, other_opt, sync_first_pass=True)
    assert_same(r0["final"], model.state_dict(), exact=False)
    # and it is really the per-rank first pass: the all-reduced one ends elsewhere
    assert max((a - b).abs().max().item() for a, b in zip(r0["final"].values(), other.state_dict().values())) > 1e-4


@pytest.mark.parametrize("name", ["sam_looksam_accumulate2", "zsharp_random", "core_looksam_random"])
def test_two_processes_with_looksam_and_random_intervals_end_bitwise_equal_and_match_the_math(two_processes, name):
    """Bitwise equal replicas (weights, momentum, LookSAM's g_v), and the weights of
    ``data_parallel_run``: LookSAM with each micro-batch's first pass averaged over the ranks
    (also the one accelerate runs under no_sync), random intervals on the draws of
    ``sharpness_due`` with each rank's own first pass. Each reference ends elsewhere without
    what is tested (no reuse, or the fixed phase), so the comparison tells them apart."""
    from zsharp_algos.rules import REUSE_KEY
    from zsharp_algos.schedule import sharpness_due

    cfg = DDP_RUNS[name]
    r0, r1 = (r[name] for r in two_processes)
    assert r0["step_count"] == r1["step_count"] == cfg["steps"]
    assert_same(r0["final"], r1["final"])
    for a, b in zip(r0["state"], r1["state"]):
        assert_same(a, b)
    options = cfg["options"]
    looksam = options.get("reuse") == "looksam"
    assert all((REUSE_KEY in s) == looksam for s in r0["state"])

    rho, k = options["rho"], options["interval"]
    if cfg["optimizer"] == "sam":
        perturbation = lambda params, grads: sam_perturbation(params, grads, rho)  # noqa: E731
    else:
        perturbation = lambda params, grads: zsharp_global_perturbation(grads, rho=rho)  # noqa: E731
    mode, seed = options.get("interval_mode", "fixed"), options.get("interval_seed", 0)
    # the core driver all-reduces both passes; two_pass_backward keeps the first local unless LookSAM needs it
    sync = looksam or cfg["driver"] == "core"

    def reference(due, alpha):
        model = mlp(bn=False)
        model.load_state_dict(r0["init"])
        opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
        steps = [[r0["seen"][t], r1["seen"][t]] for t in range(cfg["steps"])]
        data_parallel_run(model, steps, perturbation, opt, due, sync_first_pass=sync, reuse_alpha=alpha)
        return model.state_dict()

    def apart(a, b):
        return max((a[key] - b[key]).abs().max().item() for key in a) > 1e-4

    drawn = lambda t: sharpness_due(t, k, mode, seed)  # noqa: E731
    alpha = options.get("reuse_alpha") if looksam else None
    assert_same(r0["final"], reference(drawn, alpha), exact=False)
    if looksam:
        assert apart(r0["final"], reference(drawn, None))
    if mode == "random":
        fixed = lambda t: (t + 1) % k == 0  # noqa: E731
        assert [drawn(t) for t in range(cfg["steps"])] != [fixed(t) for t in range(cfg["steps"])]
        assert apart(r0["final"], reference(fixed, alpha))


@pytest.mark.parametrize("name", ["friendlysam_accumulate2", "gsam", "gcsam"])
def test_two_processes_with_each_variant_end_bitwise_equal(two_processes, name):
    """Replicas bitwise equal (weights, momentum, FriendlySAM's m) and trained: the weights moved."""
    r0, r1 = (r[name] for r in two_processes)
    assert r0["step_count"] == r1["step_count"] == DDP_RUNS[name]["steps"]
    assert_same(r0["final"], r1["final"])
    for a, b in zip(r0["state"], r1["state"]):
        assert_same(a, b)
    assert any((r0["final"][k] - r0["init"][k]).abs().max() > 0 for k in r0["init"])
    assert all(("sharpness_friendly_m" in s) == (name == "friendlysam_accumulate2") for s in r0["state"])


# --------------------------------------------------------------------------- the example script
def _train_main():
    pytest.importorskip("timm")
    pytest.importorskip("sklearn")
    spec = importlib.util.spec_from_file_location("accelerate_train_example", TRAIN_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module.main


def _run(main, out, *extra):
    args = ["--model", "test_resnet", "--train-subset", "96", "--batch-size", "16", "--max-steps", "4",
            "--optim", "zsharp", "--interval", "2", "--grad-accum", "2", "--cpu", "--no-progress",
            "--output-dir", str(out), *extra]
    summary = main(args)
    reset_accelerate_state()
    return summary


def test_example_script_routes_eps_to_the_base_and_perturb_eps_to_us():
    main = _train_main()
    module = sys.modules[main.__module__]
    model = torch.nn.Linear(3, 2)
    args = module.parse_args(["--optim", "sam", "--base-optim", "adamw", "--eps", "1e-3", "--perturb-eps", "1e-5"])
    group = module.make_optimizer(args, model).param_groups[0]
    assert (group["eps"], group["sharpness_perturb_eps"]) == (1e-3, 1e-5)
    with pytest.raises(SystemExit, match="--eps: sgd takes no epsilon"):
        module.make_optimizer(module.parse_args(["--base-optim", "sgd", "--eps", "1e-3"]), model)


@pytest.mark.parametrize("options, checkpoint", [
    # resume at step 1: the next step (2) is a sharpness step only if the interval counter was saved
    ((), 1),
    # seed 8 draws S S . S for the steps (0-based): the resumed step 2 steps with the g_v of
    # step 1, which must come back from the checkpoint, and step 3's draw from the step counter
    (("--reuse", "looksam", "--interval-mode", "random", "--interval-seed", "8"), 2),
], ids=["interval2", "looksam_random"])
def test_example_script_resume_is_bitwise_equal_to_uninterrupted_run(tmp_path, options, checkpoint):
    from safetensors.torch import load_file

    main = _train_main()
    full = _run(main, tmp_path / "full", "--checkpoint-every", "1", *options)
    assert full["steps"] == 4 and full["final"]["test_accuracy"] >= 0
    assert "sharpness/perturbation_norm" in full["final"]
    _run(main, tmp_path / "full", "--resume", str(tmp_path / "full" / "checkpoints" / f"step_{checkpoint}"),
         "--output-dir", str(tmp_path / "resumed"), *options)
    uninterrupted = load_file(tmp_path / "full" / "model.safetensors")
    resumed = load_file(tmp_path / "resumed" / "model.safetensors")
    assert_same(resumed, uninterrupted)
    if "looksam" in options:  # the checkpoint the resumed run started from holds every g_v
        from zsharp_algos.rules import REUSE_KEY

        saved = torch.load(tmp_path / "full" / "checkpoints" / f"step_{checkpoint}" / "optimizer.bin",
                           weights_only=True)
        assert saved["state"] and all(REUSE_KEY in s for s in saved["state"].values())


def test_example_script_under_fsdp2_equals_the_single_process_run(tmp_path):
    """``accelerate launch --config_file yamls/accelerate/fsdp2_cpu.yaml``: 2 CPU processes,
    ZSharp with interval 2 and 2 micro-batches per step (sharpness steps reduce-scatter both
    passes of the first micro-batch although accelerate put it under no_sync), against one
    process on the same global batches. torch 2.7's FSDP2 on gloo sums the ranks' gradients
    (2 x the mean): the perturbation does not see the factor, SGD does, so the single process
    runs with lr x 2 and weight decay / 2, which is the same update."""
    from safetensors.torch import load_file

    main = _train_main()
    common = ["--model", "test_vit", "--train-subset", "128", "--grad-accum", "2", "--max-steps", "3",
              "--optim", "zsharp", "--interval", "2", "--percentile", "70", "--cpu", "--no-progress"]
    launcher = Path(sys.executable).with_name("accelerate")
    cmd = [str(launcher), "launch", "--config_file", str(ROOT / "yamls" / "accelerate" / "fsdp2_cpu.yaml"),
           "--main_process_port", free_port(), str(TRAIN_SCRIPT), *common, "--batch-size", "16",
           "--lr", "0.05", "--weight-decay", "5e-4", "--output-dir", str(tmp_path / "fsdp2")]
    done = subprocess.run(cmd, env=clean_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert "FSDP2 on 2 CPU processes" in done.stdout
    sharded = json.loads((tmp_path / "fsdp2" / "summary.json").read_text())
    assert sharded["num_processes"] == 2 and sharded["steps"] == 3
    stats = sharded["history"][0]
    assert stats["sharpness/perturbed_fraction"] == pytest.approx(1 - 70 / 100, abs=0.01)
    assert math.isfinite(sharded["final"]["test_loss"])

    single = _run(main, tmp_path / "single", *common, "--batch-size", "32", "--lr", "0.1", "--weight-decay", "2.5e-4")
    got, ref = (load_file(tmp_path / run / "model.safetensors") for run in ("fsdp2", "single"))
    assert got.keys() == ref.keys()
    for name in ref:
        assert (got[name] - ref[name]).norm() <= 1e-5 * ref[name].norm(), name
    assert single["history"][0]["sharpness/grad_norm"] == pytest.approx(stats["sharpness/grad_norm"] / 2, rel=1e-4)
    init = _initial_weights(main, common)
    assert any(not torch.equal(init[k], got[k]) for k in got)  # it trained


def _initial_weights(main, argv):
    """The script's model before training (same seed, same draws before it)."""
    script = main.__globals__
    args = script["parse_args"](argv)
    accelerate.utils.set_seed(args.seed)
    _, _, num_classes = script["load_datasets"](args)
    return script["build_model"](args.model, num_classes, args.image_size).state_dict()


def test_accelerate_config_files_load():
    from accelerate.commands.config.config_args import load_config_from_file

    configs = sorted((ROOT / "yamls" / "accelerate").glob("*.yaml"))
    assert {c.stem for c in configs} >= {"cpu_multiprocess", "single_gpu", "multi_gpu", "apple_mps", "fsdp2_cpu",
                                         "fsdp2_multi_gpu"}
    for path in configs:
        config = load_config_from_file(str(path))
        assert config.mixed_precision in ("no", "bf16", "fp16"), path
        if path.stem.startswith("fsdp2"):
            assert config.distributed_type == "FSDP" and config.fsdp_config["fsdp_version"] == 2, path
