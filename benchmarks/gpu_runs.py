"""Short framework runs and a kernel profile for the GPU check (``benchmarks/gpu_check.sh``).

    python benchmarks/gpu_runs.py lightning --device cuda --steps 12 --out DIR   # precision 16-mixed
    python benchmarks/gpu_runs.py hf --device cuda --steps 12 --out DIR          # --fp16 --optim zsharp
    python benchmarks/gpu_runs.py profile --device cuda --out DIR                # torch.profiler tables

``lightning``: :class:`zsharp_algos.lightning.ZSharpCallback` on a small LightningModule (a CNN
with BatchNorm on scikit-learn's digits, nothing downloaded), ``precision="16-mixed"``.
``hf``: ``zsharp_algos.hf.Trainer`` with ``TrainingArguments(optim="zsharp", base_optim="sgd",
fp16=True)`` on the model and data of ``integrations/hf/train_digits.py``. Each writes
``DIR/run_<name>.json`` (steps done, base steps, skipped steps, final loss, finite weights, the
``sharpness/*`` values logged) and prints PASS or FAIL with the reasons; exit code 0 on PASS.
One step (``--poison-step``, default 2) gets an inf gradient in its first pass: it must be
skipped with the weights bitwise unchanged and the loss scale backed off.
On the CPU (a dry run) the Lightning run takes Lightning's CPU fp16 plugin, and the HF run fp16
where transformers allows it on the CPU, else bf16 (recorded in the JSON).

``profile``: ``torch.profiler`` kernel tables (``key_averages().table``, sorted by device time,
25 rows) of one optimizer-only step (first step + restore + base step) of ZSharp in both scopes
and of SAM, and of one whole SAM ``step(closure)``, on timm resnet50 (untrained), to
``DIR/profile_resnet50.txt``.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
RHO = 0.05


def digits(n_train: int | None = None):
    """scikit-learn's 8x8 digits as normalised (N, 1, 8, 8) float images and int64 labels."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.as_tensor(x, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    x = (x - x.mean()) / x.std()
    return x[:n_train], torch.as_tensor(y, dtype=torch.int64)[:n_train]


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    )


class Poison:
    """Makes one parameter's gradient inf in the first backward of step ``step`` (a stand-in
    for an fp16 overflow), and checks that the step was then skipped with every weight as it was."""

    def __init__(self, model: nn.Module, step: int):
        self.model, self.step = model, step
        self.armed = self.fired = False
        self.before: list[torch.Tensor] | None = None
        self.unchanged: bool | None = None
        if step >= 0:
            next(model.parameters()).register_hook(self._hook)

    def step_begins(self, global_step: int) -> None:
        if global_step == self.step and not self.fired:
            self.armed = True
            self.before = [p.detach().clone() for p in self.model.parameters()]

    def step_ended(self) -> None:
        if self.fired and self.unchanged is None:
            self.unchanged = all(torch.equal(p, b) for p, b in zip(self.model.parameters(), self.before))

    def _hook(self, grad):
        if not self.armed:
            return grad
        self.armed, self.fired = False, True
        return torch.full_like(grad, float("inf"))

    def checks(self, skipped: int, scale: float | None) -> dict[str, bool]:
        if self.step < 0:
            return {}
        return {
            f"inf injected at step {self.step}": self.fired,
            "that step skipped, weights bitwise unchanged": bool(self.unchanged) and skipped >= 1,
            "loss scale backed off (from 2^16)": scale is not None and scale <= 2.0**15,
        }


def finite(values) -> bool:
    return all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)


def verdict(name: str, result: dict, out: Path) -> int:
    """Adds ``pass`` and ``problems`` from ``result["checks"]``, writes the JSON, prints the verdict."""
    problems = [what for what, ok in result["checks"].items() if not ok]
    result["pass"], result["problems"] = not problems, problems
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"run_{name}.json"
    path.write_text(json.dumps(result, indent=2, default=str))
    print(json.dumps({k: v for k, v in result.items() if k != "sharpness_logged"}, indent=2, default=str))
    print(f"{name}: {'PASS' if not problems else 'FAIL: ' + '; '.join(problems)} (wrote {path})")
    return 0 if not problems else 1


def sharpness_checks(logged: dict[str, list[float]], scope: str = "global") -> dict[str, bool]:
    """What the logged statistics must show, from their definitions (zsharp_algos.stats): all
    finite; ``||e|| = rho`` in the global scope; about 30% of the entries moved at the default
    70th percentile."""
    pn, frac = logged.get("sharpness/perturbation_norm", []), logged.get("sharpness/perturbed_fraction", [])
    checks = {
        "sharpness/* logged": bool(pn) and bool(frac) and bool(logged.get("sharpness/grad_norm")),
        "sharpness/* finite": all(finite(v) for v in logged.values()),
        "perturbed_fraction in (0.2, 0.4)": bool(frac) and all(0.2 < f < 0.4 for f in frac),
    }
    if scope == "global":
        checks[f"perturbation_norm = rho ({RHO})"] = bool(pn) and all(abs(v - RHO) < 1e-3 * RHO for v in pn)
    return checks


# --------------------------------------------------------------------------- Lightning
def run_lightning(args) -> int:
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import Logger
    from lightning.pytorch.plugins.precision import MixedPrecision
    from torch.utils.data import DataLoader, TensorDataset

    from zsharp_algos import SharpnessAwareOptimizer
    from zsharp_algos.lightning import ZSharpCallback

    class Memory(Logger):
        """Every logged value, in order."""

        def __init__(self):
            super().__init__()
            self.rows: list[dict] = []

        @property
        def name(self):
            return "memory"

        @property
        def version(self):
            return 0

        def log_metrics(self, metrics, step=None):
            self.rows.append({k: float(v) for k, v in metrics.items()})

        def log_hyperparams(self, params, *args, **kwargs):
            pass

    class Classifier(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = small_cnn()

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = F.cross_entropy(self.net(x), y)
            self.log("train_loss", loss)
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)

    class Watch(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            poison.step_begins(trainer.global_step)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            poison.step_ended()

    pl.seed_everything(0, verbose=False)
    x, y = digits()
    loader = DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True, drop_last=True)
    module = Classifier()
    start = [p.detach().clone() for p in module.parameters()]
    poison = Poison(module, args.poison_step)
    logger = Memory()
    kwargs = {"precision": "16-mixed", "accelerator": "gpu"} if args.device == "cuda" else {
        "plugins": [MixedPrecision("16-mixed", "cpu")], "accelerator": "cpu"}  # Lightning would pick bf16 on a CPU
    trainer = pl.Trainer(
        devices=1, max_steps=args.steps, callbacks=[ZSharpCallback(rho=RHO), Watch()], logger=logger, log_every_n_steps=1,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, default_root_dir=str(args.out / "lightning_root"), **kwargs,
    )
    began = time.perf_counter()
    trainer.fit(module, loader)
    seconds = time.perf_counter() - began
    opt = trainer.optimizers[0]
    ours = isinstance(opt, SharpnessAwareOptimizer)
    logged: dict[str, list[float]] = {}
    for row in logger.rows:
        for k, v in row.items():
            if k.startswith("sharpness/"):
                logged.setdefault(k, []).append(v)
    losses = [row["train_loss"] for row in logger.rows if "train_loss" in row]
    params = [p.detach().float().cpu() for p in module.parameters()]
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    result = {
        "run": "lightning", "device": str(trainer.strategy.root_device), "precision": str(trainer.precision),
        "steps_requested": args.steps, "global_step": trainer.global_step, "optimizer": type(opt).__name__,
        "base_steps": getattr(opt, "step_count", None), "skipped_steps": getattr(opt, "skipped_steps", None),
        "final_loss": losses[-1] if losses else None, "losses": losses, "seconds": seconds,
        "loss_scale": scaler.get_scale() if scaler is not None else None,
        "weights_finite": all(bool(torch.isfinite(p).all()) for p in params),
        "weights_changed": any(not torch.equal(p, s.cpu()) for p, s in zip(params, start)),
        "sharpness": {k: v[-1] for k, v in logged.items()}, "sharpness_logged": logged,
    }
    result["checks"] = {
        "optimizer is ZSharp": ours and type(opt).__name__.endswith("ZSharp"),
        f"global_step = {args.steps}": trainer.global_step == args.steps,
        "base steps + skipped = steps": ours and opt.step_count + opt.skipped_steps == trainer.global_step,
        "some steps taken": ours and opt.step_count > 0,
        "final loss finite": bool(losses) and finite(losses),
        "weights finite": result["weights_finite"],
        "weights changed": result["weights_changed"],
        **sharpness_checks(logged),
        **poison.checks(getattr(opt, "skipped_steps", 0), result["loss_scale"]),
    }
    return verdict("lightning", result, args.out)


# --------------------------------------------------------------------------- Hugging Face
def run_hf(args) -> int:
    from transformers import TrainerCallback

    from zsharp_algos import SharpnessAwareOptimizer
    from zsharp_algos.hf import Trainer, TrainingArguments

    sys.path.insert(0, str(ROOT / "integrations" / "hf"))
    from train_digits import build_model, load_digits  # the example's model (from its config) and data

    train_set, _ = load_digits(split_seed=0, label_noise=0.0)
    model = build_model("16,32,64")
    start = [p.detach().clone() for p in model.parameters()]
    settings = dict(
        output_dir=str(args.out / "hf_output"), optim="zsharp", base_optim="sgd", optim_args="momentum=0.9",
        learning_rate=0.05, rho=RHO, max_steps=args.steps, per_device_train_batch_size=32, logging_steps=1,
        report_to="none", save_strategy="no", disable_tqdm=True, seed=0, dataloader_num_workers=0,
        use_cpu=args.device == "cpu",
    )
    precision = "fp16"
    try:
        targs = TrainingArguments(fp16=True, **settings)
    except ValueError as err:  # only on the CPU dry run: no fp16 there in some transformers versions
        if args.device == "cuda":
            raise
        print(f"fp16 refused on the CPU ({err}); the dry run takes bf16")
        precision = "bf16 (CPU dry run)"
        targs = TrainingArguments(bf16=True, **settings)
    skipped_by_trainer = []

    poison = Poison(model, args.poison_step if precision == "fp16" else -1)

    class Skips(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            poison.step_begins(state.global_step)

        def on_step_end(self, args, state, control, optimizer=None, **kwargs):
            skipped_by_trainer.append(bool(getattr(optimizer, "step_was_skipped", False)))
            poison.step_ended()

    trainer = Trainer(model=model, args=targs, train_dataset=train_set, callbacks=[Skips()])
    if args.device == "cpu" and precision == "fp16" and getattr(trainer.accelerator, "scaler", None) is None:
        # the CPU dry run: accelerate keeps no loss scaler on the CPU; torch's, as on a GPU
        trainer.accelerator.scaler = torch.amp.GradScaler("cpu")
    began = time.perf_counter()
    out = trainer.train()
    seconds = time.perf_counter() - began
    opt = trainer.optimizer
    while not isinstance(opt, SharpnessAwareOptimizer) and hasattr(opt, "optimizer"):
        opt = opt.optimizer  # accelerate's wrapper
    ours = isinstance(opt, SharpnessAwareOptimizer)
    history = trainer.state.log_history
    logged: dict[str, list[float]] = {}
    for row in history:
        for k, v in row.items():
            if k.startswith("sharpness/"):
                logged.setdefault(k, []).append(float(v))
    losses = [float(row["loss"]) for row in history if "loss" in row]
    params = [p.detach().float().cpu() for p in model.parameters()]
    scaler = getattr(trainer.accelerator, "scaler", None)
    result = {
        "run": "hf", "device": str(trainer.args.device), "precision": precision,
        "steps_requested": args.steps, "global_step": trainer.state.global_step, "optimizer": type(opt).__name__,
        "base_steps": getattr(opt, "step_count", None), "skipped_steps": sum(skipped_by_trainer),
        "optimizer_skipped_steps": getattr(opt, "skipped_steps", None),
        "final_loss": losses[-1] if losses else None, "losses": losses, "train_loss": out.training_loss,
        "seconds": seconds, "loss_scale": scaler.get_scale() if scaler is not None else None,
        "weights_finite": all(bool(torch.isfinite(p).all()) for p in params),
        "weights_changed": any(not torch.equal(p, s.cpu()) for p, s in zip(params, start)),
        "sharpness": {k: v[-1] for k, v in logged.items()}, "sharpness_logged": logged,
    }
    result["checks"] = {
        "optimizer is ZSharp": ours and type(opt).__name__.endswith("ZSharp"),
        f"global_step = {args.steps}": trainer.state.global_step == args.steps,
        "base steps + skipped = steps": ours and opt.step_count + sum(skipped_by_trainer) == args.steps,
        "some steps taken": ours and opt.step_count > 0,
        "final loss finite": bool(losses) and finite(losses),
        "weights finite": result["weights_finite"],
        "weights changed": result["weights_changed"],
        **sharpness_checks(logged),
        **poison.checks(sum(skipped_by_trainer), result["loss_scale"]),
    }
    return verdict("hf", result, args.out)


# --------------------------------------------------------------------------- profile
def run_profile(args) -> int:
    import timm
    from torch.profiler import ProfilerActivity, profile

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from peers import Ours, optimizer_only_unit

    from zsharp_algos import SAM, ZSharp

    device = torch.device(args.device)
    cuda = device.type == "cuda"

    def sync():
        if cuda:
            torch.cuda.synchronize(device)

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sort_by = "device_time_total" if cuda else "self_cpu_time_total"
    torch.manual_seed(0)
    model = timm.create_model(args.model, num_classes=10).to(device)  # untrained: no download
    params0 = [p.detach().clone() for p in model.parameters()]
    grads = [torch.randn_like(p) for p in params0]
    makers = {
        "ZSharp global scope, optimizer-only (first step + restore + SGD step)":
            lambda ps: ZSharp(torch.optim.SGD(ps, lr=1e-3, momentum=0.9), rho=RHO),
        "ZSharp tensor scope, optimizer-only": lambda ps: ZSharp(torch.optim.SGD(ps, lr=1e-3, momentum=0.9),
                                                                 rho=RHO, scope="tensor"),
        "SAM, optimizer-only": lambda ps: SAM(torch.optim.SGD(ps, lr=1e-3, momentum=0.9), rho=RHO),
    }
    sections = [f"torch {torch.__version__}, {torch.cuda.get_device_name(device) if cuda else 'cpu'}, "
                f"{args.model} ({sum(p.numel() for p in params0) / 1e6:.1f}M params); sorted by {sort_by}"]
    for title, make in makers.items():
        ps = [nn.Parameter(p.clone()) for p in params0]
        unit, failure = optimizer_only_unit(Ours(make(ps)), ps, grads)
        if failure:
            sections.append(f"== {title}: FAILED {failure}")
            continue
        for _ in range(3):  # warm: work buffer, cached layouts, momentum
            unit.prepare()
            unit()
        unit.prepare()
        sync()
        with profile(activities=activities) as prof:
            unit()
            sync()
        sections.append(f"== {title}\n" + prof.key_averages().table(sort_by=sort_by, row_limit=25))
        del ps, unit

    x = torch.randn(args.batch, 3, args.input, args.input, device=device)
    y = torch.randint(0, 10, (args.batch,), device=device)
    opt = SAM(torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9), rho=RHO, model=model)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    for _ in range(3):
        opt.step(closure)
    sync()
    with profile(activities=activities) as prof:
        opt.step(closure)
        sync()
    sections.append(f"== SAM, whole step(closure), batch {args.batch} at {args.input}x{args.input}\n"
                    + prof.key_averages().table(sort_by=sort_by, row_limit=25))
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"profile_{args.model}.txt"
    path.write_text("\n\n".join(sections) + "\n")
    print("\n\n".join(sections))
    print("wrote", path)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", choices=("lightning", "hf", "profile"))
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--steps", type=int, default=12, help="lightning / hf: optimizer steps")
    parser.add_argument("--poison-step", type=int, default=2,
                        help="lightning / hf: make a gradient inf in this step's first pass (-1: never)")
    parser.add_argument("--out", type=Path, default=Path("results/gpu"))
    parser.add_argument("--model", default="resnet50", help="profile: the timm model")
    parser.add_argument("--batch", type=int, default=128, help="profile: batch of the whole SAM step")
    parser.add_argument("--input", type=int, default=32, help="profile: image side of the whole SAM step")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for, but torch sees no CUDA device")
    try:
        return {"lightning": run_lightning, "hf": run_hf, "profile": run_profile}[args.run](args)
    except Exception:
        traceback.print_exc()
        if args.run != "profile":  # a crash is a FAIL with its reason in the JSON
            result = {"run": args.run, "device": args.device, "error": traceback.format_exc(limit=8),
                      "checks": {"ran to the end": False}}
            verdict(args.run, result, args.out)
        return 1


if __name__ == "__main__":
    sys.exit(main())
