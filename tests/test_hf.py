"""``zsharp_algos.hf``: ``--optim sam/zsharp`` (classes and launcher), the two-pass Trainer step
and the single-pass callbacks; checked against plain-PyTorch math (``two_pass_reference``)."""
from __future__ import annotations

import copy
import functools
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from launch_env import clean_env
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from transformers import HfArgumentParser, TrainerCallback  # noqa: E402

import zsharp_algos.hf as zhf  # noqa: E402
from zsharp_algos import SAM, ZSharp  # noqa: E402
from zsharp_algos.hf.arguments import unsupported_setup  # noqa: E402
from zsharp_algos.hf.launch import main as launch_main  # noqa: E402

from reference import sam_perturbation, zsharp_global_perturbation  # noqa: E402
from two_pass_reference import (  # noqa: E402
    Points,
    Recorder,
    accumulated_step,
    apply_gradient,
    assert_same,
    data_parallel_step,
    lookahead_run,
    mlp,
    two_pass_gradient,
)

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "integrations" / "hf" / "train_digits.py"


def live_transformers():
    """The ``transformers`` module a script importing it now gets (transformers re-executes its
    ``__init__`` while importing the Trainer, so ``sys.modules`` may hold a newer object than an
    earlier ``import transformers``)."""
    return sys.modules["transformers"]


def arguments(tmp_path, cls=None, **kw):
    settings = dict(
        output_dir=str(tmp_path), learning_rate=0.1, per_device_train_batch_size=8, max_steps=2,
        lr_scheduler_type="constant", max_grad_norm=0.0, report_to=[], use_cpu=True, logging_steps=1,
        save_strategy="no", disable_tqdm=True, seed=0, optim_args="momentum=0.9",
    )
    settings.update(kw)
    return (cls or zhf.TrainingArguments)(**settings)


def train(args, model, trainer_cls=None, **kw):
    trainer = (trainer_cls or zhf.Trainer)(model=model, args=args, train_dataset=Points(), **kw)
    trainer.train()
    return trainer


def sgd(model):
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


# --------------------------------------------------------------------------- --optim
def test_optim_parses_and_a_typo_is_rejected_listing_the_choices(tmp_path, capsys):
    parser = HfArgumentParser(zhf.TrainingArguments)
    args, = parser.parse_args_into_dataclasses([
        "--output_dir", str(tmp_path), "--optim", "zsharp", "--base_optim", "sgd", "--rho", "0.2",
        "--percentile", "80", "--scope", "tensor", "--interval", "2", "--adaptive",
    ])
    got = (args.optim.value, args.base_optim.value, args.rho, args.percentile, args.scope, args.interval, args.adaptive)
    assert got == ("zsharp", "sgd", 0.2, 80.0, "tensor", 2, True)
    args, = parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path), "--optim", "sam"])
    assert args.optim == "sam" and args.to_dict()["optim"] == "sam"
    assert zhf.TrainingArguments(output_dir=str(tmp_path)).optim == transformers.TrainingArguments.default_optim

    # a typo: one line with the nearest names and the choices, not argparse's whole usage text
    with pytest.raises(ValueError, match=r"--optim 'zsharpp' is not an optimizer name; did you mean 'zsharp'\?") as err:
        parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path), "--optim", "zsharpp"])
    assert "\n" not in str(err.value) and "sam, schedule_free_adamw" in str(err.value)
    assert "usage:" not in capsys.readouterr().err
    with pytest.raises(ValueError, match="did you mean 'zsharp'"):
        zhf.TrainingArguments(output_dir=str(tmp_path), optim="zsharpp")
    with pytest.raises(ValueError, match="--base_optim 'sgdd' is not an optimizer name; did you mean 'sgd'"):
        zhf.TrainingArguments(output_dir=str(tmp_path), optim="zsharp", base_optim="sgdd")
    with pytest.raises(ValueError, match="percentile"):
        zhf.TrainingArguments(output_dir=str(tmp_path), optim="zsharp", percentile=100)
    with pytest.raises(ValueError, match=r"FSDP version 1; use FSDP2 without CPU offload \(--fsdp;"):
        zhf.TrainingArguments(output_dir=str(tmp_path), optim="zsharp", fsdp=True, fsdp_config={"version": 1})
    with pytest.raises(ValueError, match="FSDP2 with CPU offload"):
        zhf.TrainingArguments(output_dir=str(tmp_path), optim="zsharp", fsdp=True, fsdp_config={"cpu_offload": True})
    args = zhf.TrainingArguments(output_dir=str(tmp_path), optim="zsharp", fsdp=True)  # FSDP2: transformers' default
    assert args.fsdp_plugin_args["fsdp_version"] == 2 and unsupported_setup(args) is None
    with zhf.patched_transformers():  # what the launcher does: Seq2Seq arguments too
        args, = HfArgumentParser(live_transformers().Seq2SeqTrainingArguments).parse_args_into_dataclasses(
            ["--output_dir", str(tmp_path), "--optim", "sam", "--base_optim", "sgd"])
        assert isinstance(args, zhf.Seq2SeqTrainingArguments) and args.optim == "sam"
        assert live_transformers().trainer.Trainer is zhf.Trainer
    assert live_transformers().Seq2SeqTrainingArguments is not zhf.Seq2SeqTrainingArguments


def test_launcher_runs_an_unmodified_script_with_two_pass_training(tmp_path, capsys):
    pytest.importorskip("sklearn")
    original = live_transformers().Trainer, live_transformers().TrainingArguments
    common = [str(EXAMPLE), "--output_dir", str(tmp_path), "--max_steps", "2", "--per_device_train_batch_size", "16",
              "--train_subset", "64", "--widths", "8,16", "--report_to", "none", "--save_strategy", "no",
              "--use_cpu", "--logging_steps", "1", "--disable_tqdm", "true"]
    launch_main(common + ["--optim", "zsharp", "--base_optim", "sgd", "--rho", "0.1"])
    out = capsys.readouterr().out
    assert "sharpness/loss_gap" in out and "eval_accuracy" in out  # two passes ran, the script finished
    assert (live_transformers().Trainer, live_transformers().TrainingArguments) == original  # put back afterwards
    assert original[0] is not zhf.Trainer
    with pytest.raises(ValueError, match="did you mean 'zsharp'"):
        launch_main(common + ["--optim", "zsharpp"])


# --------------------------------------------------------------------------- the two-pass step
@pytest.mark.parametrize("name,clip", [("zsharp", None), ("sam", None), ("zsharp", 0.05)])
def test_one_trainer_step_equals_the_core_closure_step(tmp_path, name, clip):
    """Bitwise; with clipping (small enough to act: once, on the second pass's gradient) up to
    the rounding of the two clipping implementations' norms."""
    model = Recorder(mlp())
    ref = copy.deepcopy(model)
    trainer = train(arguments(tmp_path, optim=name, base_optim="sgd", rho=0.1, max_steps=1, max_grad_norm=clip or 0.0),
                    model)
    (x, y), _ = model.seen  # one batch, two passes
    # the same parameter groups as the Trainer's (weight decay split): same order in every norm
    decay = trainer.get_decay_parameter_names(ref)
    groups = [[p for n, p in ref.named_parameters() if (n in decay) == wanted] for wanted in (True, False)]
    base = torch.optim.SGD([{"params": g} for g in groups], lr=0.1, momentum=0.9)
    core = (ZSharp if name == "zsharp" else SAM)(base, rho=0.1, model=ref, max_grad_norm=clip)

    def closure():
        core.zero_grad()
        loss = ref(x, y)["loss"]
        loss.backward()
        return loss

    core.step(closure)
    assert_same(model.body.state_dict(), ref.body.state_dict(), exact=clip is None, rtol=1e-6, atol=1e-9)


def test_a_sharpness_optimizer_instance_passed_to_the_trainer_runs_two_pass(tmp_path):
    model, by_flag = Recorder(mlp()), Recorder(mlp())
    optimizer = SAM(sgd(model), rho=0.1)
    train(arguments(tmp_path / "a", optim="sgd"), model, optimizers=(optimizer, None))
    train(arguments(tmp_path / "b", optim="sam", base_optim="sgd", rho=0.1), by_flag)
    assert len(model.seen) == 4  # two steps, two passes each
    assert_same(model.body.state_dict(), by_flag.body.state_dict(), exact=False)  # one vs two param groups


def test_gradient_accumulation_2_perturbs_each_micro_batch_by_its_own_gradient(tmp_path):
    model = Recorder(mlp())
    ref = copy.deepcopy(model.body)
    trainer = train(arguments(tmp_path, optim="sam", base_optim="sgd", rho=0.2, gradient_accumulation_steps=2), model)
    assert trainer.state.global_step == 2 and len(model.seen) == 8  # 2 steps x 2 micro-batches x 2 passes
    micro = model.seen[0::2]
    opt = sgd(ref)
    for k in (0, 2):
        accumulated_step(ref, micro[k:k + 2], functools.partial(sam_perturbation, rho=0.2), opt)
    assert_same(model.body.state_dict(), ref.state_dict(), exact=False)


def test_bf16_autocast_step_matches_the_math(tmp_path):
    model = Recorder(mlp(bn=False))
    ref = copy.deepcopy(model.body)
    train(arguments(tmp_path, optim="zsharp", base_optim="sgd", rho=0.2, bf16=True), model)
    opt = sgd(ref)

    def loss_fn(m, x, y):  # the Trainer autocasts the model's forward, loss included
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return F.cross_entropy(m(x), y)

    for x, y in model.seen[0::2]:
        grads = two_pass_gradient(ref, functools.partial(loss_fn, x=x, y=y),
                                  lambda params, grads: zsharp_global_perturbation(grads, rho=0.2))
        apply_gradient(ref, grads, opt)
    assert_same(model.body.state_dict(), ref.state_dict(), exact=False, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("optim, options, checkpoint", [
    ("sgd", {}, 1),
    ("zsharp", {}, 1),
    # LookSAM: g_v from step 1 (a sharpness step) is in checkpoint-2 and reused by step 2
    ("zsharp", dict(reuse="looksam"), 2),
    # seed 1 draws S . . for steps 0-2: steps 1 and 2 reuse step 0's g_v from checkpoint-1
    ("zsharp", dict(reuse="looksam", interval_mode="random", interval_seed=1), 1),
], ids=["sgd", "zsharp", "looksam", "looksam_random"])
def test_checkpoint_resume_is_bitwise_equal_to_the_uninterrupted_run(tmp_path, optim, options, checkpoint):
    """Stock SGD first (transformers' own resume is bitwise here), then ZSharp with interval 2
    resumed at step 1: step 2 is a sharpness step only if the interval counter was saved; with
    LookSAM, from a checkpoint whose g_v the resumed plain steps use."""
    from zsharp_algos.schedule import sharpness_due

    settings = dict(optim=optim, base_optim="sgd", rho=0.2, interval=2, max_steps=3, save_strategy="steps",
                    save_steps=1, **options)
    full = Recorder(mlp())
    resumed = copy.deepcopy(full)
    train(arguments(tmp_path / "full", **settings), full)
    trainer = zhf.Trainer(model=resumed, args=arguments(tmp_path / "full", **settings), train_dataset=Points())
    trainer.train(resume_from_checkpoint=str(tmp_path / "full" / f"checkpoint-{checkpoint}"))
    assert trainer.state.global_step == 3
    due = [optim == "zsharp" and sharpness_due(t, 2, options.get("interval_mode", "fixed"),
                                               options.get("interval_seed", 0)) for t in range(checkpoint, 3)]
    assert len(resumed.seen) == len(due) + sum(due)  # two passes on the sharpness steps
    assert_same(resumed.body.state_dict(), full.body.state_dict())
    if options.get("reuse") == "looksam":
        from zsharp_algos.rules import REUSE_KEY

        saved = torch.load(tmp_path / "full" / f"checkpoint-{checkpoint}" / "optimizer.pt", weights_only=True)
        assert saved["state"] and all(REUSE_KEY in s for s in saved["state"].values())
        assert not any(due[:1])  # the first resumed step is a plain one: it steps with the restored g_v


def test_fp16_overflow_in_the_first_pass_skips_the_step_with_clean_weights(tmp_path):
    """CPU fp16: accelerate has no CPU loss scaler, so the Trainer's Accelerator gets torch's."""
    model = Recorder(mlp())
    model.inject_inf_at = {0}  # first pass of step 1
    start = copy.deepcopy(model.body.state_dict())
    trainer = zhf.Trainer(model=model, args=arguments(tmp_path, optim="zsharp", base_optim="sgd", max_steps=2),
                          train_dataset=Points())
    trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    steps = []

    class Spy(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
            steps.append((optimizer.step_was_skipped, copy.deepcopy(model.body.state_dict()),
                          trainer.lr_scheduler.scheduler.last_epoch if hasattr(trainer.lr_scheduler, "scheduler")
                          else trainer.lr_scheduler.last_epoch))

    trainer.add_callback(Spy())
    trainer.train()
    (skipped, after_1, epoch_1), (skipped_2, after_2, _) = steps
    assert skipped and not skipped_2
    assert trainer.accelerator.scaler.get_scale() == 2.0**9
    weights = lambda sd: {k: v for k, v in sd.items() if "running" not in k and "num_batches" not in k}  # noqa: E731
    assert_same(weights(after_1), weights(start))  # unperturbed, unstepped
    assert epoch_1 == 0  # the scheduler did not step on the skipped step
    assert trainer.optimizer.optimizer.step_count == 1  # only step 2 counted
    assert any((a != b).any() for a, b in zip(weights(after_2).values(), weights(start).values()))


# --------------------------------------------------------------------------- several processes
WORKER = r'''
"""An ordinary transformers script (no zsharp_algos import), run through the launcher."""
import sys
import torch
from transformers import HfArgumentParser, Trainer, TrainingArguments

sys.path.insert(0, sys.argv.pop(1))  # the tests folder
from two_pass_reference import Points, Recorder, mlp

args, = HfArgumentParser(TrainingArguments).parse_args_into_dataclasses()
model = Recorder(mlp(bn=False))
init = {k: v.clone() for k, v in model.body.state_dict().items()}
trainer = Trainer(model=model, args=args, train_dataset=Points(n=64))
trainer.train()
torch.save({"init": init, "seen": model.seen, "final": model.body.state_dict(), "world": args.world_size},
           f"{args.output_dir}/rank{args.process_index}.pt")
'''


def test_two_processes_via_torchrun_and_the_launcher_end_bitwise_equal(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           "-m", "zsharp_algos.hf", str(script), str(Path(__file__).parent),
           "--output_dir", str(tmp_path), "--optim", "zsharp", "--base_optim", "sgd", "--optim_args", "momentum=0.9",
           "--rho", "0.5", "--learning_rate", "0.2", "--per_device_train_batch_size", "8", "--max_steps", "3",
           "--lr_scheduler_type", "constant", "--max_grad_norm", "0", "--use_cpu", "--report_to", "none",
           "--save_strategy", "no", "--disable_tqdm", "true"]
    done = subprocess.run(cmd, env=clean_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert r0["world"] == 2
    assert_same(r0["final"], r1["final"])

    model = mlp(bn=False)
    model.load_state_dict(r0["init"])
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    perturbation = lambda params, grads: zsharp_global_perturbation(grads, rho=0.5)  # noqa: E731
    for step in range(3):  # every rank perturbs with its own (unsynced) first-pass gradient
        data_parallel_step(model, [r0["seen"][2 * step], r1["seen"][2 * step]], perturbation, opt)
    assert_same(r0["final"], model.state_dict(), exact=False)


FSDP_WORKER = r'''
"""An ordinary transformers script (no zsharp_algos import), run through the launcher under FSDP2."""
import json
import sys

import torch
from transformers import HfArgumentParser, Trainer, TrainingArguments

sys.path.insert(0, sys.argv.pop(1))  # the tests folder
from fsdp_probe import gradient_factor
from two_pass_reference import Points, Recorder, mlp

import accelerate
from accelerate.state import PartialState
from accelerate.utils import DistributedType

_init = accelerate.Accelerator.__init__


def fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):
    """accelerate sets FSDP up only on accelerators (on the CPU it keeps DDP): put its FSDP2 path in place."""
    _init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        self.state.fsdp_plugin = fsdp_plugin
        self.state.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.FSDP


accelerate.Accelerator.__init__ = fsdp_on_cpu

args, = HfArgumentParser(TrainingArguments).parse_args_into_dataclasses()
assert args.device.type == "cpu" and args.world_size > 1  # sets the process group up
factor = gradient_factor()


def run(resume=None):
    model = Recorder(mlp(bn=False))
    init = {k: v.clone() for k, v in model.body.state_dict().items()}
    trainer = Trainer(model=model, args=args, train_dataset=Points(n=64))
    trainer.train(resume_from_checkpoint=resume)
    final = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in model.body.state_dict().items()}
    sharded = type(next(iter(trainer.model_wrapped.parameters()))).__name__
    return trainer, dict(init=init, seen=model.seen, final=final, sharded=sharded,
                         fsdp=trainer.is_fsdp_enabled, logs=trainer.state.log_history)


trainer, full = run()
_, resumed = run(resume=f"{args.output_dir}/checkpoint-1")
torch.save({"full": full, "resumed": resumed, "world": args.world_size, "factor": factor},
           f"{args.output_dir}/rank{args.process_index}.pt")
'''


def test_fsdp2_via_the_launcher_equals_the_unsharded_math_and_resumes_bitwise(tmp_path):
    """``--fsdp`` (FSDP2) on 2 gloo CPU ranks. accelerate sets FSDP up only on accelerators, so
    the script puts accelerate's FSDP2 path in place on the CPU (see FSDP_WORKER); the Trainer
    then shards the model, saves FSDP checkpoints and resumes them. The first pass is the
    reduce-scattered global gradient (every rank perturbs alike), so the reference is the
    unsharded step with a synced first pass. torch 2.7's FSDP2 on gloo sums the ranks' gradients
    (2 x the mean; newer builds average): the worker measures the factor on this build and the
    reference's lr takes it (no weight decay here). ZSharp with interval 2,
    resumed at step 1: step 2 is a sharpness step only if the interval counter was saved."""
    script = tmp_path / "worker.py"
    script.write_text(FSDP_WORKER)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "zsharp_algos.hf", str(script), str(Path(__file__).parent),
           "--output_dir", str(out), "--fsdp", "--optim", "zsharp", "--base_optim", "sgd",
           "--optim_args", "momentum=0.9", "--rho", "0.5", "--percentile", "70", "--interval", "2",
           "--learning_rate", "0.2", "--per_device_train_batch_size", "8", "--max_steps", "3",
           "--lr_scheduler_type", "constant", "--max_grad_norm", "0", "--use_cpu", "--report_to", "none",
           "--save_strategy", "steps", "--save_steps", "1", "--logging_steps", "1", "--disable_tqdm", "true"]
    done = subprocess.run(cmd, env=clean_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    r0, r1 = (torch.load(out / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    full = r0["full"]
    assert r0["world"] == 2 and full["fsdp"] and full["sharded"] == "DTensor"
    assert (out / "checkpoint-1" / "pytorch_model_fsdp.bin").exists()
    assert_same(full["final"], r1["full"]["final"])
    assert_same(r0["resumed"]["final"], full["final"])  # resumed from checkpoint-1: bitwise
    assert len(r0["resumed"]["seen"]) == 3  # steps 2 (two passes) and 3 (one)
    sharp_logs = [log for log in full["logs"] if "sharpness/perturbed_fraction" in log]
    assert len(sharp_logs) == 1 and sharp_logs[0]["sharpness/perturbed_fraction"] == pytest.approx(0.3, abs=0.01)
    assert all(torch.isfinite(torch.tensor(log["loss"])) for log in full["logs"] if "loss" in log)

    model = mlp(bn=False)
    model.load_state_dict(full["init"])
    assert r0["factor"] in (1.0, 2.0), r0["factor"]  # averaged, or summed over the 2 ranks
    opt = torch.optim.SGD(model.parameters(), lr=0.2 * r0["factor"], momentum=0.9)
    perturbation = lambda params, grads: zsharp_global_perturbation(grads, rho=0.5)  # noqa: E731
    no_perturbation = lambda params, grads: [torch.zeros_like(g) for g in grads]  # noqa: E731
    seen = [full["seen"], r1["full"]["seen"]]
    i = 0
    for step in range(3):
        sharp = step == 1
        data_parallel_step(model, [seen[0][i], seen[1][i]], perturbation if sharp else no_perturbation, opt,
                           sync_first_pass=True)
        i += 2 if sharp else 1
    for name, ref in model.state_dict().items():
        assert (full["final"][name] - ref).norm() <= 1e-5 * ref.norm(), name
        assert not torch.equal(full["final"][name], full["init"][name]), name  # it trained


# --------------------------------------------------------------------------- the callbacks
def test_callback_restore_is_exact_for_evaluation_and_checkpoints(tmp_path):
    safetensors = pytest.importorskip("safetensors.torch")
    model = Recorder(mlp())
    ref = copy.deepcopy(model.body)
    seen_by = {}

    class Spy(TrainerCallback):  # added after the SAM callback: sees what evaluation / saving see
        def on_optimizer_step(self, args, state, control, model=None, **kwargs):
            seen_by[f"after step {state.global_step + 1}"] = copy.deepcopy(model.body.state_dict())

        def on_evaluate(self, args, state, control, model=None, **kwargs):
            seen_by[f"evaluation {state.global_step}"] = copy.deepcopy(model.body.state_dict())

    args = arguments(tmp_path, cls=transformers.TrainingArguments, optim="sgd", max_steps=3, eval_strategy="steps",
                     eval_steps=2, save_strategy="steps", save_steps=2, per_device_eval_batch_size=16)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Points(), eval_dataset=Points(16, seed=2),
                                   callbacks=[zhf.SAMCallback(rho=0.3), Spy()])
    trainer.train()
    assert_same(seen_by["evaluation 2"], seen_by["after step 2"])
    saved = safetensors.load_file(str(tmp_path / "checkpoint-2" / "model.safetensors"))
    assert_same({k.removeprefix("body."): v for k, v in saved.items()}, seen_by["after step 2"])
    assert any(k.startswith("sharpness/perturbation_norm") for log in trainer.state.log_history for k in log)

    # the math: step t runs at w_t + e(g_{t-1}) and steps from w_t (training batches only)
    lookahead_run(ref, model.seen[:3], functools.partial(sam_perturbation, rho=0.3), sgd(ref))
    assert_same(model.body.state_dict(), ref.state_dict(), exact=False)


def test_callback_refuses_the_two_pass_trainer_misplaced_options_fsdp_and_deepspeed(tmp_path):
    """A callback together with --optim zsharp (or a ZSharp optimizer) would perturb twice."""
    model = Recorder(mlp())
    start = copy.deepcopy(model.state_dict())
    settings = dict(optim="zsharp", base_optim="sgd", rho=0.1)
    with pytest.raises(ValueError, match="already runs two-pass .* use one or the other"):
        train(arguments(tmp_path / "a", **settings), model, callbacks=[zhf.ZSharpCallback(rho=0.1)])
    assert_same(model.state_dict(), start)
    with pytest.raises(ValueError, match="percentile"):
        zhf.ZSharpCallback(percentile=0)
    with pytest.raises(TypeError, match="does not take 'percentile'"):
        zhf.SAMCallback(percentile=50)
    with pytest.warns(UserWarning, match="--rho ignored: --optim adamw_torch does not use them"):
        zhf.TrainingArguments(output_dir=str(tmp_path), optim="adamw_torch", rho=0.1)
    with pytest.warns(UserWarning, match="--percentile ignored: --optim sam"):
        zhf.TrainingArguments(output_dir=str(tmp_path), optim="sam", percentile=50)

    class FSDPArgs:  # FSDP2 (the two-pass Trainer takes it; the callback does not)
        deepspeed, fsdp, fsdp_config = None, True, {"version": 2}

    class DeepSpeedArgs:
        deepspeed, fsdp = {"zero_optimization": {"stage": 2}}, None

    assert unsupported_setup(FSDPArgs()) is None and unsupported_setup(DeepSpeedArgs()) == "DeepSpeed"
    for args, what in ((FSDPArgs(), "FSDP"), (DeepSpeedArgs(), "DeepSpeed")):
        with pytest.raises(ValueError, match=f"does not support {what}; .* --optim zsharp .* supports FSDP2"):
            zhf.SAMCallback().on_init_end(args, None, None)


def test_the_trainer_refuses_fsdp1_and_deepspeed_set_up_by_accelerate(tmp_path, monkeypatch):
    """FSDP1 or DeepSpeed from an accelerate config (not the arguments) are refused too, before
    training."""
    from accelerate.utils import FullyShardedDataParallelPlugin

    class FromAccelerateConfig(zhf.Trainer):
        def create_accelerator_and_postprocess(self):
            super().create_accelerator_and_postprocess()
            if setting == "fsdp1":
                monkeypatch.setattr(self.accelerator.state, "fsdp_plugin",
                                    FullyShardedDataParallelPlugin(fsdp_version=1), raising=False)
                self.is_fsdp_enabled = True
            else:
                self.is_deepspeed_enabled = True

    model = Recorder(mlp())
    start = copy.deepcopy(model.state_dict())
    for setting, message in (("fsdp1", "FSDP version 1; use FSDP2"), ("deepspeed", "DeepSpeed; use FSDP2")):
        with pytest.raises(ValueError, match=message):
            FromAccelerateConfig(model=model, args=arguments(tmp_path, optim="zsharp", base_optim="sgd"),
                                 train_dataset=Points())
        monkeypatch.undo()
    assert_same(model.state_dict(), start)


@pytest.mark.parametrize("base", ["adamw_torch", "adafactor"])
def test_options_reach_the_optimizer_they_are_meant_for(tmp_path, base):
    """--adam_epsilon (and Adafactor's own pair of epsilons) stay the base's; --perturb_eps is ours."""
    args = arguments(tmp_path, optim="zsharp", base_optim=base, adam_epsilon=1e-3, perturb_eps=1e-5, optim_args=None,
                     max_steps=1)
    trainer = train(args, Recorder(mlp()))
    group = trainer.optimizer.param_groups[0]
    assert group["sharpness_perturb_eps"] == 1e-5 and trainer.optimizer.optimizer.perturb_eps == 1e-5
    assert group["eps"] == (1e-3 if base == "adamw_torch" else (1e-30, 1e-3))


def test_the_launchers_warnings_point_at_the_script(tmp_path):
    script = tmp_path / "script.py"
    script.write_text(
        "from transformers import HfArgumentParser, TrainingArguments\n"
        "HfArgumentParser(TrainingArguments).parse_args_into_dataclasses()\n"
    )
    with pytest.warns(UserWarning, match="--percentile ignored") as record:
        launch_main([str(script), "--output_dir", str(tmp_path), "--optim", "sam", "--percentile", "50",
                     "--report_to", "none"])
    assert [w.filename for w in record if "--percentile" in str(w.message)] == [str(script)]


def test_a_stock_trainer_given_a_zsharp_optimizer_says_which_trainer_to_use(tmp_path):
    """A half-migration (stock transformers.Trainer, our optimizer) fails at the first step with
    the fix named, before any weight changes."""
    model = Recorder(mlp())
    start = copy.deepcopy(model.state_dict())
    args = arguments(tmp_path, cls=live_transformers().TrainingArguments, optim="sgd")
    with pytest.raises(RuntimeError, match="zsharp_algos.hf.Trainer"):
        train(args, model, trainer_cls=live_transformers().Trainer, optimizers=(ZSharp(sgd(model)), None))
    weights = lambda sd: {k: v for k, v in sd.items() if "running" not in k and "num_batches" not in k}  # noqa: E731
    assert_same(weights(model.state_dict()), weights(start))


def test_a_stock_trainer_given_our_arguments_fails_before_training(tmp_path):
    """The other half-migration (our TrainingArguments(optim="zsharp"), stock Trainer): it fails
    when the Trainer builds the optimizer, before any step, naming the fix."""
    model = Recorder(mlp())
    start = copy.deepcopy(model.state_dict())
    args = arguments(tmp_path, optim="zsharp")
    with pytest.raises(ValueError, match="use zsharp_algos.hf.Trainer .*zsharp-hf SCRIPT.py --optim zsharp"):
        train(args, model, trainer_cls=live_transformers().Trainer)
    assert_same(model.state_dict(), start)
