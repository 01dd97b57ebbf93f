"""``zsharp-compare``: train one timm model with SGD, SAM and ZSharp and compare them.

Every optimizer starts from the same initial weights and sees the same batches in the same
order for a given seed; only the optimizer differs. The default run (an untrained ResNet-18
for 15 epochs on scikit-learn's digits, 40% of the training labels replaced by wrong classes)
takes about 4 minutes on a 2-core CPU::

    zsharp-compare                                  # defaults: see zsharp-compare --help
    zsharp-compare --seeds 3 --device cuda --precision bf16
    zsharp-compare --data cifar10 --data-dir ~/data/cifar-10-batches-py --device cuda --epochs 30
    zsharp-compare --model vit_tiny_patch16_224 --model-kwarg patch_size=4

Writes ``results.json`` (settings, versions, machine, per-seed per-epoch curves, summary) and
``curves.png`` to ``--out`` and prints a table of final test accuracy, test loss, wall time
and time per step relative to SGD (mean ± std over seeds; on the CPU also the process's CPU time
per step, which other jobs on the machine do not inflate), then the machine's load during the
runs.
"""
from __future__ import annotations

import argparse
import ast
import copy
import os
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ClosureGradScaler
from .._optional import require
from ..options import DefaultsHelpFormatter, add_cli_options, cli_values
from ..registry import SHARPNESS_OPTIMIZERS, create_optimizer, is_sharpness_optimizer, optimizer_info
from . import report
from .data import DATASETS, ImageData, load_data
from .devices import DEVICES, PRECISIONS, autocast_dtype, resolve_device
from .models import timm_for, build_model

__all__ = ["main", "parse_args", "build_model", "make_optimizer", "warm_up", "train_run", "evaluate"]

#: Names this command adds to the registry's: (the registered optimizer, its options, the factor
#: on --rho). ASAM's radius is ten times SAM's in its paper (CIFAR-10: 0.5 against 0.05).
PRESETS: dict[str, tuple[str, dict[str, Any], float]] = {
    "asam": ("sam", {"adaptive": True}, 10.0),
    "zsharp_friendly": ("zsharp", {"variant": "friendly"}, 1.0),
}
OPTIMIZERS = ("sgd",) + tuple(SHARPNESS_OPTIMIZERS) + tuple(PRESETS)
EVAL_BATCH_SIZE = 256


# --------------------------------------------------------------------------- command line
def _seeds(text: str) -> list[int]:
    """``"3"`` -> seeds 0, 1, 2; ``"0,5,7"`` (or ``"7,"``) -> exactly those seeds."""
    try:
        if "," not in text:
            count = int(text)
            if count < 1:
                raise ValueError
            return list(range(count))
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--seeds takes a count N >= 1 (seeds 0..N-1) or a comma-separated list such as 0,5,7; got {text!r}"
        ) from None


def _optimizers(text: str) -> list[str]:
    names = [s.strip().lower() for s in text.split(",") if s.strip()]
    unknown = [n for n in names if n not in OPTIMIZERS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"--optimizers takes a comma-separated subset of {','.join(OPTIMIZERS)}")
    return list(dict.fromkeys(names))


def _model_kwarg(text: str) -> tuple[str, Any]:
    """``KEY=VALUE``, VALUE read as a Python literal (number, bool, tuple...) or else a string."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--model-kwarg takes KEY=VALUE, got {text!r}")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value


def _positive(kind: type) -> Callable[[str], Any]:
    def parse(text: str):
        value = kind(text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
        return value

    parse.__name__ = kind.__name__
    return parse


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="zsharp-compare",
        description="Train the same timm model with SGD, SAM and ZSharp (same init, same data order per seed) "
        "and compare final test accuracy, loss and cost.",
        formatter_class=DefaultsHelpFormatter,
    )
    g = p.add_argument_group("what to compare")
    g.add_argument("--optimizers", type=_optimizers, default="sgd,sam,zsharp", help="comma-separated")
    g.add_argument("--seeds", type=_seeds, default="1", help="a count N (seeds 0..N-1) or a list like 0,5,7")
    g.add_argument("--model", default="resnet18", help="any timm model name (created untrained)")
    g.add_argument(
        "--model-kwarg", type=_model_kwarg, action="append", default=[], metavar="KEY=VALUE",
        help="extra timm.create_model argument, repeatable (e.g. patch_size=4 for a ViT on 32x32 images)",
    )
    g = p.add_argument_group("data")
    g.add_argument("--data", choices=DATASETS, default="digits", help="digits: embedded in scikit-learn")
    g.add_argument("--data-dir", default=None, help="folder with the CIFAR-10 python batches (--data cifar10)")
    g.add_argument("--label-noise", type=float, default=0.4, help="fraction of training labels made wrong")
    g.add_argument("--data-seed", type=int, default=0, help="fixes the split, subsets and label noise")
    g.add_argument("--train-subset", type=_positive(int), default=None, help="use N random training examples")
    g.add_argument("--test-subset", type=_positive(int), default=None, help="use N random test examples")
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=_positive(int), default=15, help="passes over the training set")
    g.add_argument("--batch-size", type=_positive(int), default=64, help="incomplete last batches are dropped")
    g.add_argument("--lr", type=_positive(float), default=0.05, help="peak SGD learning rate (cosine decay)")
    g.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (also the base of SAM/ZSharp)")
    g.add_argument("--weight-decay", type=float, default=5e-4, help="SGD weight decay")
    g = p.add_argument_group("sharpness-aware optimizers")
    # rho 0.1 rather than the library's 0.05: on 40% label noise the larger radius helps more
    add_cli_options(g, ("rho", "percentile", "scope", "interval", "interval_mode", "interval_seed", "reuse", "reuse_alpha",
                        "sigma", "lmbda", "alpha"), rho=0.1)
    g = p.add_argument_group("hardware")
    g.add_argument("--device", default="auto", help=f"{'|'.join(DEVICES)} or cuda:N; auto: cuda, else mps, else cpu")
    g.add_argument("--precision", choices=PRECISIONS, default="fp32", help="fp16: CUDA only (loss scaling)")
    g.add_argument(
        "--threads", type=_positive(int), default=None,
        help="torch CPU threads (None: torch's default; 1 is steadier on a busy machine)",
    )
    g.add_argument("--out", default="results/compare", help="output folder")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p.parse_args(argv)  # string defaults go through `type` too


# --------------------------------------------------------------------------- optimizer
def make_optimizer(name: str, model: nn.Module, args: argparse.Namespace) -> torch.optim.Optimizer:
    """SGD with momentum, alone or as the base of a sharpness-aware optimizer (BatchNorm-safe
    second pass); a :data:`PRESETS` name is its registered optimizer with the preset's options."""
    kwargs: dict[str, Any] = dict(lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    name, preset, rho_factor = PRESETS.get(name, (name, {}, 1.0))
    if is_sharpness_optimizer(name):
        options = cli_values(args, optimizer_info(name).options)
        options = {k: v for k, v in options.items() if optimizer_info(name).accepts(k)}
        kwargs.update(options, **preset, model=model)
        kwargs["rho"] = options["rho"] * rho_factor
    return create_optimizer(name, model.parameters(), base="sgd", **kwargs)


# --------------------------------------------------------------------------- training
def _autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


def _steps_per_epoch(n: int, batch_size: int) -> int:
    """Full batches only (a last batch of one example would break BatchNorm), at least one."""
    return max(1, n // batch_size)


def _batches(n: int, batch_size: int, gen: torch.Generator) -> list[Tensor]:
    """One shuffled epoch of index batches (see :func:`_steps_per_epoch`)."""
    perm = torch.randperm(n, generator=gen)
    return [perm[i * batch_size : (i + 1) * batch_size] for i in range(_steps_per_epoch(n, batch_size))]


@torch.no_grad()
def evaluate(
    model: nn.Module, x: Tensor, y: Tensor, dtype: torch.dtype | None = None, batch_size: int = EVAL_BATCH_SIZE
) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` (in eval mode) on ``(x, y)``."""
    model.eval()
    loss = torch.zeros((), device=x.device)
    correct = torch.zeros((), device=x.device, dtype=torch.int64)
    for i in range(0, len(y), batch_size):
        with _autocast(x.device, dtype):
            logits = model(x[i : i + batch_size]).float()
        loss += F.cross_entropy(logits, y[i : i + batch_size], reduction="sum")
        correct += (logits.argmax(1) == y[i : i + batch_size]).sum()
    return loss.item() / len(y), correct.item() / len(y)


def warm_up(model: nn.Module, data: ImageData, batch_size: int, dtype: torch.dtype | None) -> None:
    """One untimed training forward/backward and one evaluation on a throwaway copy of
    ``model``, so that one-time costs (kernel selection, allocator growth) are not billed to
    whichever optimizer happens to run first."""
    model = copy.deepcopy(model).train()
    with _autocast(data.train_x.device, dtype):
        logits = model(data.train_x[:batch_size]).float()
    F.cross_entropy(logits, data.train_y[:batch_size]).backward()
    evaluate(model, data.test_x, data.test_y, dtype)


def train_run(
    model: nn.Module,
    optimizer_name: str,
    data: ImageData,
    args: argparse.Namespace,
    seed: int,
    dtype: torch.dtype | None,
    progress: Callable[..., Any],
) -> dict[str, Any]:
    """Train ``model`` (already on the data's device) for ``args.epochs`` epochs with a cosine
    learning-rate decay; the batch order is fixed by ``seed``. Returns the run's record: the
    curves, and the wall and process CPU time of the training steps with the machine's load
    average before and after."""
    start = time.perf_counter()
    load_before = report.load_average()
    torch.manual_seed(seed)  # anything random inside the model (dropout, drop-path)
    optimizer = make_optimizer(optimizer_name, model, args)
    scaler = ClosureGradScaler(enabled=dtype == torch.float16)
    gen = torch.Generator().manual_seed(seed)
    steps_per_epoch = _steps_per_epoch(len(data.train_y), args.batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.epochs * steps_per_epoch)
    device = data.train_x.device
    epochs, train_time, train_cpu = [], 0.0, 0.0
    bar = progress(total=args.epochs * steps_per_epoch, desc=f"seed {seed} {optimizer_name}", unit="step")
    for epoch in range(1, args.epochs + 1):
        model.train()
        epoch_start, epoch_cpu = time.perf_counter(), time.process_time()
        loss_sum, done = torch.zeros((), device=device), 0
        for idx in _batches(len(data.train_y), args.batch_size, gen):
            idx = idx.to(device)
            x, y = data.train_x[idx], data.train_y[idx]

            def closure():
                optimizer.zero_grad()
                with _autocast(device, dtype):
                    loss = F.cross_entropy(model(x).float(), y)
                scaler.scale(loss).backward()
                return loss

            loss = scaler.step(optimizer, closure)
            scaler.update()
            schedule.step()
            if loss is not None:  # None: fp16 overflow, step skipped
                loss_sum += loss.detach()
                done += 1
            bar.update()
        train_loss = loss_sum.item() / max(done, 1)  # .item() waits for the device: timing is honest
        epoch_time = time.perf_counter() - epoch_start
        train_time += epoch_time
        train_cpu += time.process_time() - epoch_cpu
        test_loss, test_acc = evaluate(model, data.test_x, data.test_y, dtype)
        epochs.append({
            "epoch": epoch, "train_loss": train_loss, "test_loss": test_loss, "test_acc": test_acc,
            "train_time_s": epoch_time,
        })
        bar.set_postfix(train_loss=f"{train_loss:.3f}", test_acc=f"{100 * test_acc:.1f}%")
    bar.close()
    return {
        "optimizer": optimizer_name,
        "seed": seed,
        "epochs": epochs,
        "steps": args.epochs * steps_per_epoch,
        "skipped_steps": scaler.skipped_steps,
        "train_time_s": train_time,
        "step_time_s": train_time / (args.epochs * steps_per_epoch),
        # the CPU time of this process (every thread): what other jobs on the machine do not
        # inflate, unlike the wall time; on an accelerator it misses the device's work
        "train_cpu_time_s": train_cpu,
        "step_cpu_time_s": train_cpu / (args.epochs * steps_per_epoch),
        "load_average": [load_before, report.load_average()],  # 1-minute, before and after; None where unknown
        "wall_time_s": time.perf_counter() - start,
    }


# --------------------------------------------------------------------------- main
def _progress_factory(disable: bool) -> Callable[..., Any]:
    tqdm = require("tqdm", "demo", "the progress bars").tqdm
    return lambda **kw: tqdm(disable=disable, dynamic_ncols=True, **kw)


def _setup(args: argparse.Namespace) -> tuple[torch.device, torch.dtype | None, ImageData]:
    """What can fail on a bad option, checked before any training: the device, the precision,
    the optional dependencies, the model name and the data."""
    device = resolve_device(args.device)
    dtype = autocast_dtype(args.precision, device)
    report.require_plotting()
    timm_for(args.model)
    data = load_data(
        args.data, data_dir=args.data_dir, seed=args.data_seed, label_noise=args.label_noise,
        train_subset=args.train_subset, test_subset=args.test_subset,
    ).to(device)
    return device, dtype, data


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``zsharp-compare`` (``argv``: the arguments, default ``sys.argv[1:]``).
    A bad option exits with a one-line message (:class:`SystemExit`) rather than a traceback."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        progress = _progress_factory(args.no_progress)
        device, dtype, data = _setup(args)
    except (ValueError, FileNotFoundError, ImportError) as err:
        raise SystemExit(f"zsharp-compare: error: {err}") from err
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"{data.describe()}\nmodel {args.model}, device {device}, precision {args.precision}, "
          f"optimizers {','.join(args.optimizers)}, seeds {args.seeds}", flush=True)

    model_kwargs = dict(args.model_kwarg)
    runs = []
    for seed in args.seeds:
        torch.manual_seed(seed)
        init = build_model(args.model, data.num_classes, **model_kwargs).to(device)
        if seed == args.seeds[0]:
            warm_up(init, data, args.batch_size, dtype)
        for name in args.optimizers:
            runs.append(train_run(copy.deepcopy(init), name, data, args, seed, dtype, progress))
            if args.no_progress:  # no bars: a line a run, so a long comparison shows where it is
                last = runs[-1]["epochs"][-1]
                print(f"[{len(runs)}/{len(args.seeds) * len(args.optimizers)}] seed {seed} {name}: test accuracy "
                      f"{100 * last['test_acc']:.1f}% after {runs[-1]['wall_time_s']:.0f} s", flush=True)

    summary = report.summarize(runs, args.optimizers)
    settings = dict(vars(args), model_kwarg=model_kwargs, device=str(device))
    report.write_json(out / "results.json", {
        "settings": settings, **report.environment(device), "runs": runs, "summary": summary,
    })
    title = report.title(args.model, args.data, args.label_noise, len(args.seeds))
    report.plot_curves(runs, args.optimizers, out / "curves.png", title=title,
                       caption=report.caption(args.label_noise, args.optimizers))
    spread = ", mean ± std over seeds" if len(args.seeds) > 1 else ""  # the title says "1 seed"
    print(f"\n{title}: final epoch{spread}\n{report.format_table(summary, cpu_time=device.type == 'cpu')}")
    print(report.load_note(runs, os.cpu_count()))
    print(f"\nwrote {out / 'results.json'} and {out / 'curves.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
