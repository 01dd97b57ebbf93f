#!/usr/bin/env python
"""Train a timm ResNet / ViT with SGD, SAM or ZSharp in a plain ``accelerate`` loop.

One process (device picked by accelerate: CUDA, else MPS, else CPU)::

    python integrations/accelerate/train.py --optim zsharp --rho 0.1 --epochs 10
    python integrations/accelerate/train.py --model vit_tiny_patch16_224 --model-kwarg patch_size=4 \\
        --optim sam --base-optim adamw --lr 1e-3 --weight-decay 0.05

Several processes (DDP), mixed precision and the other settings from an accelerate config::

    accelerate launch --multi_gpu --num_processes 2 integrations/accelerate/train.py --cpu --optim zsharp
    accelerate launch --config_file yamls/accelerate/multi_gpu.yaml integrations/accelerate/train.py --optim zsharp

FSDP2 (sharded parameters, gradients and optimizer state), on GPUs or, for trying it, on CPUs::

    accelerate launch --config_file yamls/accelerate/fsdp2_multi_gpu.yaml integrations/accelerate/train.py --optim zsharp
    accelerate launch --config_file yamls/accelerate/fsdp2_cpu.yaml integrations/accelerate/train.py --cpu --optim zsharp

(accelerate sets FSDP up only on accelerators and runs DDP on the CPU instead; on the CPU this
script puts accelerate's FSDP2 path back in place itself, see :func:`fsdp2_on_cpu`.)

Data: scikit-learn's embedded digits (default, with ``--label-noise``), a local CIFAR-10
(``--data cifar10 --data-dir DIR``) or an image folder (``--data folder --data-dir DIR`` with
``DIR/train/<class>/*`` and ``DIR/val/<class>/*``; needs torchvision). Nothing is downloaded.

Checkpoints: ``--checkpoint-every N`` saves ``accelerator.save_state`` every N optimizer steps
under ``OUT/checkpoints/step_N`` (model, optimizer incl. the sharpness interval counter,
scheduler, RNG states, loop position); ``--resume PATH`` (or ``--resume latest``) continues from
one and ends with the same weights as the run that was never interrupted. The run ends with
``OUT/model.safetensors`` and ``OUT/summary.json``.

The sharpness-aware part is two lines (see :mod:`zsharp_algos.accelerate_loop`): the optimizer goes
through :class:`~zsharp_algos.accelerate_loop.TwoPassBackward` before ``accelerator.prepare``, and
``accelerator.backward(loss)`` becomes ``sharp.backward(model, loss_fn)``.
"""
from __future__ import annotations

import argparse
import ast
import json
import math
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.utils.data import DataLoader, Dataset, Sampler, TensorDataset

from zsharp_algos.accelerate_loop import TwoPassBackward
from zsharp_algos.demo import build_model
from zsharp_algos.demo.data import load_data
from zsharp_algos.demo.devices import resolve_device
from zsharp_algos.options import DefaultsHelpFormatter, add_cli_options, cli_values
from zsharp_algos.registry import BASE_OPTIMIZERS, SHARPNESS_OPTIMIZERS, base_kwargs, create_optimizer, optimizer_info

OPTIMIZERS = ("sgd",) + tuple(SHARPNESS_OPTIMIZERS)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=DefaultsHelpFormatter
    )
    g = p.add_argument_group("model and data")
    g.add_argument("--model", default="resnet18", help="any timm model name (created untrained)")
    g.add_argument("--model-kwarg", action="append", default=[], metavar="KEY=VALUE",
                   help="extra timm.create_model argument, repeatable (patch_size=4 for a ViT on 32x32)")
    g.add_argument("--data", choices=("digits", "cifar10", "folder"), default="digits")
    g.add_argument("--data-dir", default=None, help="CIFAR-10 python batches, or an image folder with train/ and val/")
    g.add_argument("--image-size", type=int, default=32, help="--data folder: images are resized to this")
    g.add_argument("--label-noise", type=float, default=0.0,
                   help="fraction of training labels made wrong (digits, cifar10)")
    g.add_argument("--train-subset", type=int, default=None, help="use N random training examples (digits, cifar10)")
    g.add_argument("--num-workers", type=int, default=0)
    g = p.add_argument_group("optimizer")
    g.add_argument("--optim", choices=OPTIMIZERS, default="zsharp")
    g.add_argument("--base-optim", choices=sorted(BASE_OPTIMIZERS), default="sgd", help="base of sam / zsharp")
    g.add_argument("--lr", type=float, default=0.05, help="peak learning rate (warm-up, then cosine decay)")
    g.add_argument("--warmup-steps", type=int, default=0)
    g.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    g.add_argument("--eps", type=float, default=None, help="adam / adamw epsilon (the base optimizer's; default its own)")
    g.add_argument("--weight-decay", type=float, default=5e-4)
    g.add_argument("--max-grad-norm", type=float, default=None, help="clip the gradient the base optimizer uses")
    add_cli_options(g, rho=0.1)  # rho 0.1: the digits task has 40% label noise
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int, default=10)
    g.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps")
    g.add_argument("--batch-size", type=int, default=64, help="per process and micro-batch")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    g.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"), default=None,
                   help="default: the accelerate config's / launch flag's")
    g.add_argument("--cpu", action="store_true", help="run on the CPU even if a GPU is there")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--output-dir", default="results/accelerate")
    g.add_argument("--checkpoint-every", type=int, default=None, help="save_state every N optimizer steps")
    g.add_argument("--resume", default=None, help="a checkpoint folder, or 'latest'")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


# --------------------------------------------------------------------------- data
class EpochSampler(Sampler[int]):
    """A permutation fixed by (seed, epoch): the same on every process and after a resume."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        gen = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=gen).tolist())

    def __len__(self) -> int:
        return self.n


def load_datasets(args) -> tuple[Dataset, Dataset, int]:
    """(train, test, number of classes)."""
    if args.data != "folder":
        data = load_data(args.data, data_dir=args.data_dir, seed=args.seed,
                         label_noise=args.label_noise, train_subset=args.train_subset)
        return TensorDataset(data.train_x, data.train_y), TensorDataset(data.test_x, data.test_y), data.num_classes
    if args.data_dir is None:
        raise SystemExit("--data folder needs --data-dir (a folder with train/ and val/ class folders)")
    from torchvision import datasets, transforms

    tf = transforms.Compose([
        transforms.Resize(args.image_size), transforms.CenterCrop(args.image_size),
        transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])
    root = Path(args.data_dir)
    train = datasets.ImageFolder(root / "train", transform=tf)
    return train, datasets.ImageFolder(root / "val", transform=tf), len(train.classes)


# --------------------------------------------------------------------------- optimizer
def make_optimizer(args, model: torch.nn.Module) -> torch.optim.Optimizer:
    kwargs = dict(lr=args.lr, weight_decay=args.weight_decay)
    kwargs.update(base_only_flags(args))
    if args.optim == "sgd":
        return create_optimizer(args.base_optim, model.parameters(), **kwargs)
    kwargs.update(cli_values(args, optimizer_info(args.optim).options))
    return create_optimizer(args.optim, model.parameters(), base=args.base_optim, **kwargs)


def base_only_flags(args) -> dict:
    """--momentum for SGD, --eps for the Adam family: the flags the chosen base optimizer takes."""
    kwargs = base_kwargs(args.base_optim, momentum=args.momentum, eps=args.eps)
    if args.eps is not None and "eps" not in kwargs:
        raise SystemExit(f"--eps: {args.base_optim} takes no epsilon (the sharpness norm's is --perturb-eps)")
    return kwargs


def cosine_with_warmup(total_steps: int, warmup_steps: int):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


class LoopPosition:
    """Where the loop is (saved with the checkpoint, via ``register_for_checkpointing``)."""

    def __init__(self):
        self.epoch, self.batch, self.step, self.skipped = 0, 0, 0, 0

    def state_dict(self) -> dict[str, int]:
        return dict(vars(self))

    def load_state_dict(self, state: dict[str, int]) -> None:
        vars(self).update({k: int(v) for k, v in state.items()})


# --------------------------------------------------------------------------- loop
@torch.no_grad()
def evaluate(accelerator: Accelerator, model, loader) -> dict[str, float]:
    model.eval()
    loss_sum, correct, count = 0.0, 0, 0
    for x, y in loader:
        logits = model(x)
        logits, y = accelerator.gather_for_metrics((logits, y))
        loss_sum += F.cross_entropy(logits.float(), y, reduction="sum").item()
        correct += (logits.argmax(-1) == y).sum().item()
        count += len(y)
    model.train()
    return {"test_loss": loss_sum / count, "test_accuracy": correct / count}


def main(argv=None) -> dict:
    args = parse_args(argv)
    # cuda > mps > cpu; saying "cpu" when there is no GPU lets accelerate set up CPU DDP (gloo)
    cpu = args.cpu or resolve_device("auto").type == "cpu"
    accelerator = Accelerator(
        gradient_accumulation_steps=args.grad_accum, mixed_precision=args.mixed_precision, cpu=cpu
    )
    _warn_single_cpu_process(accelerator)
    fsdp2_on_cpu(accelerator)
    set_seed(args.seed)
    out = Path(args.output_dir)
    train_set, test_set, num_classes = load_datasets(args)
    train_loader = DataLoader(train_set, batch_size=args.batch_size, sampler=EpochSampler(len(train_set), args.seed),
                              drop_last=True, num_workers=args.num_workers)
    test_loader = DataLoader(test_set, batch_size=256, num_workers=args.num_workers)

    model = build_model(args.model, num_classes, args.image_size, **dict(_kv(v) for v in args.model_kwarg))
    sharp = TwoPassBackward(accelerator, make_optimizer(args, model))

    steps_per_epoch = math.ceil(len(train_loader) / accelerator.num_processes / args.grad_accum)
    total_steps = args.max_steps or steps_per_epoch * args.epochs
    # accelerate steps a prepared scheduler once per process per optimizer step
    processes = accelerator.num_processes
    schedule = cosine_with_warmup(total_steps * processes, args.warmup_steps * processes)
    scheduler = torch.optim.lr_scheduler.LambdaLR(sharp.optimizer, schedule)
    model, optimizer, train_loader, test_loader, scheduler = accelerator.prepare(
        model, sharp.optimizer, train_loader, test_loader, scheduler
    )
    position = LoopPosition()
    accelerator.register_for_checkpointing(position)
    if args.resume:
        resume = _latest_checkpoint(out) if args.resume == "latest" else Path(args.resume)
        accelerator.load_state(str(resume))
        accelerator.print(f"resumed from {resume} at step {position.step}")

    accelerator.print(
        f"{args.model} ({sum(p.numel() for p in model.parameters()):,} parameters), --optim {args.optim}, "
        f"{accelerator.num_processes} process(es) on {accelerator.device}, "
        f"mixed precision {accelerator.mixed_precision}, "
        f"{total_steps} optimizer steps"
    )
    from tqdm.auto import tqdm

    bar = tqdm(total=total_steps, initial=position.step,
               disable=args.no_progress or not accelerator.is_local_main_process)
    history, start = [], time.perf_counter()
    model.train()
    while position.epoch < args.epochs and position.step < total_steps:
        epoch = position.epoch
        loader = accelerator.skip_first_batches(train_loader, position.batch) if position.batch else train_loader
        loader.set_epoch(epoch)  # accelerate's loaders pass it on to the sampler at every iter()
        for x, y in loader:
            with accelerator.accumulate(model):
                loss = sharp.backward(model, lambda: F.cross_entropy(model(x), y))
                if accelerator.sync_gradients and args.max_grad_norm:
                    accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            position.batch += 1
            if not accelerator.sync_gradients:
                continue
            position.step += 1
            position.skipped += int(optimizer.step_was_skipped)
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
            if args.checkpoint_every and position.step % args.checkpoint_every == 0:
                accelerator.save_state(str(out / "checkpoints" / f"step_{position.step}"))
            if position.step >= total_steps:
                break
        else:
            position.epoch, position.batch = position.epoch + 1, 0
        metrics = dict(epoch=epoch, step=position.step, **evaluate(accelerator, model, test_loader),
                       **sharp.pop_stats())
        history.append(metrics)
        accelerator.print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()))
    bar.close()

    summary = dict(
        settings=vars(args), num_processes=accelerator.num_processes, device=str(accelerator.device),
        mixed_precision=accelerator.mixed_precision, steps=position.step, skipped_steps=position.skipped,
        seconds=time.perf_counter() - start, final=history[-1] if history else {}, history=history,
    )
    accelerator.wait_for_everyone()
    accelerator.save_model(model, str(out))
    if accelerator.is_main_process:
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        final = summary["final"]
        accelerator.print(
            f"done: {position.step} steps ({position.skipped} skipped) in {summary['seconds']:.1f}s, "
            f"test accuracy {final.get('test_accuracy', float('nan')):.4f}, "
            f"test loss {final.get('test_loss', float('nan')):.4f}"
        )
    accelerator.end_training()
    return summary


def _kv(text: str) -> tuple[str, object]:
    key, _, value = text.partition("=")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value


def fsdp2_on_cpu(accelerator: Accelerator) -> bool:
    """Run accelerate's FSDP2 path on CPU processes when the launch config asks for FSDP.

    accelerate (up to 1.15 at least) turns ``distributed_type: FSDP`` into FSDP only on
    accelerators; with CPU processes it keeps ``MULTI_CPU`` (DDP) and drops the FSDP settings.
    Here the FSDP plugin is rebuilt from the launcher's ``FSDP_*`` variables and set, with the
    FSDP mode, on the accelerator's (and the process's) state before anything is prepared, so ``prepare`` shards with ``fully_shard``
    (gloo) and ``save_state`` / ``load_state`` / ``save_model`` take their FSDP2 branches. FSDP1
    is handed over too, so that ``TwoPassBackward`` says what to use instead. Returns whether it
    did anything.
    """
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    asked = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if not asked or accelerator.distributed_type != DistributedType.MULTI_CPU:
        return False
    plugin = FullyShardedDataParallelPlugin()  # from the FSDP_* variables of `accelerate launch`
    accelerator.state.fsdp_plugin = plugin
    accelerator.state.distributed_type = DistributedType.FSDP
    # every later AcceleratorState() copies the process state's distributed_type back in
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    accelerator.print(f"FSDP{plugin.fsdp_version} on {accelerator.num_processes} CPU processes (gloo)")
    return True


def _warn_single_cpu_process(accelerator: Accelerator) -> None:
    """``accelerate launch --cpu --num_processes N`` starts ONE process unless mpirun is set up
    (``--mpirun_hostfile``); say so instead of training alone silently."""
    if accelerator.num_processes == 1 and os.environ.get("MASTER_ADDR") and "WORLD_SIZE" not in os.environ:
        accelerator.print(
            "warning: one process only. `accelerate launch --cpu --num_processes N` needs mpirun for several CPU "
            "processes; use `accelerate launch --multi_gpu --num_processes N integrations/accelerate/train.py "
            "--cpu ...` "
            "(gloo) or --config_file yamls/accelerate/cpu_multiprocess.yaml"
        )


def _latest_checkpoint(out: Path) -> Path:
    found = sorted((out / "checkpoints").glob("step_*"), key=lambda p: int(p.name.split("_")[1]))
    if not found:
        raise SystemExit(f"--resume latest: no checkpoint under {out / 'checkpoints'}")
    return found[-1]


if __name__ == "__main__":
    main()
