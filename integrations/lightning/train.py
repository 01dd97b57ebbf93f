#!/usr/bin/env python
"""Train a timm ResNet / ViT with SGD, SAM or ZSharp under PyTorch Lightning.

The LightningModule below knows nothing about SAM: ``--optim sam|zsharp`` adds
:class:`~zsharp_algos.lightning.SAMCallback` / :class:`~zsharp_algos.lightning.ZSharpCallback`
to the Trainer, which turns the module's optimizer into the base of a sharpness-aware one::

    python integrations/lightning/train.py --optim zsharp --rho 0.1 --epochs 10
    python integrations/lightning/train.py --model vit_tiny_patch16_224 --model-kwarg patch_size=4 \\
        --optim sam --base-optim adamw --lr 1e-3 --weight-decay 0.05 --precision bf16-mixed

The ZSharp paper's official setting (Adam, lr 1e-3, rho 0.05, 95th percentile, per-tensor scope)::

    python integrations/lightning/train.py --optim zsharp --base-optim adam --lr 1e-3 --weight-decay 0 \\
        --rho 0.05 --percentile 95 --scope tensor
    python integrations/lightning/train.py --paper          # the same flags

Several processes (DDP; gloo on CPU, nccl on GPUs)::

    python integrations/lightning/train.py --accelerator cpu --devices 2 --strategy ddp --optim zsharp

Data: scikit-learn's embedded digits (default, with ``--label-noise``) or a local CIFAR-10
(``--data cifar10 --data-dir DIR``); nothing is downloaded. ``--precision 16-mixed`` on the CPU
uses Lightning's fp16 plugin on the CPU (Lightning itself would fall back to bf16).

Checkpoints: ``OUT/checkpoints/last.ckpt`` at the end, and ``step=N.ckpt`` every
``--checkpoint-every N`` optimizer steps (Lightning's ``ModelCheckpoint``: weights, the base
optimizer's state and the sharpness step counters, LR scheduler, loop position, loss scale);
``--resume PATH`` (or ``--resume last``) continues from one. The run ends with
``OUT/summary.json``; the logged metrics (``train_loss``, ``sharpness/*``, ``val_*``) are in
``OUT/logs/`` (CSV).
"""
from __future__ import annotations

import argparse
import ast
import json
import math
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.plugins.precision import MixedPrecision
from torch.utils.data import DataLoader, TensorDataset

from zsharp_algos.demo import build_model, load_data
from zsharp_algos.lightning import CALLBACKS
from zsharp_algos.options import DefaultsHelpFormatter, add_cli_options, cli_values
from zsharp_algos.registry import BASE_OPTIMIZERS, base_kwargs, create_optimizer, optimizer_info

OPTIMIZERS = ("sgd",) + tuple(CALLBACKS)
#: ``--paper``: the ZSharp paper's official code's settings.
PAPER = dict(optim="zsharp", base_optim="adam", lr=1e-3, weight_decay=0.0, rho=0.05, percentile=95.0, scope="tensor")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=DefaultsHelpFormatter
    )
    g = p.add_argument_group("model and data")
    g.add_argument("--model", default="resnet18", help="any timm model name (created untrained)")
    g.add_argument("--model-kwarg", action="append", default=[], metavar="KEY=VALUE",
                   help="extra timm.create_model argument, repeatable (patch_size=4 for a ViT on 32x32)")
    g.add_argument("--data", choices=("digits", "cifar10"), default="digits")
    g.add_argument("--data-dir", default=None, help="--data cifar10: the folder with the CIFAR-10 python batches")
    g.add_argument("--label-noise", type=float, default=0.0, help="fraction of training labels made wrong")
    g.add_argument("--train-subset", type=int, default=None, help="use N random training examples")
    g.add_argument("--test-subset", type=int, default=None, help="evaluate on N random test examples")
    g.add_argument("--num-workers", type=int, default=0)
    g = p.add_argument_group("optimizer")
    g.add_argument("--optim", choices=OPTIMIZERS, default="zsharp")
    g.add_argument("--base-optim", choices=sorted(BASE_OPTIMIZERS), default="sgd",
                   help="the module's optimizer (the base of sam / zsharp)")
    g.add_argument("--lr", type=float, default=0.05, help="peak learning rate (warm-up, then cosine decay)")
    g.add_argument("--warmup-steps", type=int, default=0)
    g.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    g.add_argument("--eps", type=float, default=None, help="adam / adamw epsilon (the base optimizer's; default its own)")
    g.add_argument("--weight-decay", type=float, default=5e-4)
    add_cli_options(g, rho=0.1)
    g.add_argument("--sync-first-pass", action="store_true", help="DDP: all-reduce the first pass too")
    paper = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in PAPER.items())
    g.add_argument("--paper", action="store_true", help=f"the ZSharp paper's official setting: {paper}")
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int, default=10)
    g.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps")
    g.add_argument("--batch-size", type=int, default=64, help="per process and micro-batch")
    g.add_argument("--accumulate", type=int, default=1, help="accumulate_grad_batches: micro-batches per step")
    g.add_argument("--gradient-clip-val", type=float, default=None, help="clip the gradient the base optimizer uses")
    g.add_argument("--precision", choices=("32-true", "bf16-mixed", "16-mixed"), default="32-true")
    g.add_argument("--accelerator", default="auto", help="auto, cpu, gpu, mps")
    g.add_argument("--devices", default="1", help="number of devices (processes), or 'auto'")
    g.add_argument("--strategy", default="auto", help="auto, ddp, ddp_spawn (sharded strategies are refused)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--output-dir", default="results/lightning")
    g.add_argument("--checkpoint-every", type=int, default=None, help="also save step=N.ckpt every N optimizer steps")
    g.add_argument("--resume", default=None, help="a checkpoint file, or 'last' (OUTPUT_DIR/checkpoints/last.ckpt)")
    g.add_argument("--log-every", type=int, default=10, help="log_every_n_steps")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.paper:  # the preset, under any flag given explicitly
        p.set_defaults(**PAPER)
        args = p.parse_args(argv)
    return args


# --------------------------------------------------------------------------- the module
class ImageClassifier(pl.LightningModule):
    """A plain classifier: cross-entropy, a base optimizer, warm-up then cosine decay."""

    def __init__(self, model: torch.nn.Module, args: argparse.Namespace):
        super().__init__()
        self.model, self.args = model, args

    def forward(self, x):
        return self.model(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        self.log("train_loss", loss, prog_bar=True)
        self.log("train_acc", (logits.argmax(-1) == y).float().mean())
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x).float()
        self.log("val_loss", F.cross_entropy(logits, y), sync_dist=True)
        self.log("val_acc", (logits.argmax(-1) == y).float().mean(), sync_dist=True, prog_bar=True)

    def configure_optimizers(self):
        a = self.args
        kwargs = dict(lr=a.lr, weight_decay=a.weight_decay, **base_only_flags(a))
        optimizer = create_optimizer(a.base_optim, self.parameters(), **kwargs)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_with_warmup(total, a.warmup_steps))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


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


def sharpness_callback(args: argparse.Namespace):
    """``SAMCallback`` / ``ZSharpCallback`` with the options the flags give (None for sgd)."""
    if args.optim == "sgd":
        return None
    options = cli_values(args, optimizer_info(args.optim).options)
    return CALLBACKS[args.optim](**options, sync_first_pass=args.sync_first_pass)


# --------------------------------------------------------------------------- run
def main(argv=None) -> dict:
    args = parse_args(argv)
    pl.seed_everything(args.seed, workers=True, verbose=False)
    out = Path(args.output_dir)
    data = load_data(args.data, data_dir=args.data_dir, seed=args.seed, label_noise=args.label_noise,
                     train_subset=args.train_subset, test_subset=args.test_subset)
    train_loader = DataLoader(TensorDataset(data.train_x, data.train_y), batch_size=args.batch_size, shuffle=True,
                              drop_last=True, num_workers=args.num_workers)
    test_loader = DataLoader(TensorDataset(data.test_x, data.test_y), batch_size=256, num_workers=args.num_workers)
    model = build_model(args.model, data.num_classes, data.train_x.shape[-1], **dict(_kv(v) for v in args.model_kwarg))
    module = ImageClassifier(model, args)

    callbacks = [c for c in (sharpness_callback(args),) if c is not None]
    if args.checkpoint_every:
        callbacks.append(ModelCheckpoint(dirpath=out / "checkpoints", filename="step={step}", save_top_k=-1,
                                         every_n_train_steps=args.checkpoint_every, auto_insert_metric_name=False))
    trainer_kwargs = {}
    precision = args.precision
    if precision == "16-mixed" and _resolves_to_cpu(args.accelerator):
        trainer_kwargs["plugins"] = [MixedPrecision("16-mixed", "cpu")]  # Lightning would switch to bf16
    else:
        trainer_kwargs["precision"] = precision
    trainer = pl.Trainer(
        accelerator=args.accelerator, devices=_devices(args.devices), strategy=args.strategy,
        max_epochs=args.epochs, max_steps=args.max_steps if args.max_steps is not None else -1,
        accumulate_grad_batches=args.accumulate, gradient_clip_val=args.gradient_clip_val,
        callbacks=callbacks, logger=CSVLogger(out, name="logs"), log_every_n_steps=args.log_every,
        enable_checkpointing=bool(args.checkpoint_every), enable_progress_bar=not args.no_progress,
        enable_model_summary=False, num_sanity_val_steps=0, **trainer_kwargs,
    )
    resume = None
    if args.resume:
        resume = out / "checkpoints" / "last.ckpt" if args.resume == "last" else Path(args.resume)
        if not resume.exists():
            raise SystemExit(f"--resume: no checkpoint at {resume}")
    start = time.perf_counter()
    trainer.fit(module, train_loader, test_loader, ckpt_path=str(resume) if resume else None)
    seconds = time.perf_counter() - start
    sharpness = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("sharpness/")}  # last logged
    trainer.save_checkpoint(out / "checkpoints" / "last.ckpt")
    final = trainer.validate(module, test_loader, verbose=False)[0]
    optimizer = trainer.optimizers[0]
    summary = dict(
        settings=vars(args), processes=trainer.world_size, device=str(trainer.strategy.root_device),
        precision=str(trainer.precision), steps=trainer.global_step,
        skipped_steps=int(getattr(optimizer, "skipped_steps", 0)), seconds=seconds,
        final={k: float(v) for k, v in final.items()},
        sharpness=sharpness,
    )
    if trainer.is_global_zero:
        out.mkdir(parents=True, exist_ok=True)
        (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
        print(
            f"done: {summary['steps']} steps ({summary['skipped_steps']} skipped) in {seconds:.1f}s on "
            f"{summary['processes']} process(es), {summary['device']}, {summary['precision']}: "
            f"val accuracy {summary['final'].get('val_acc', float('nan')):.4f}, "
            f"val loss {summary['final'].get('val_loss', float('nan')):.4f}"
        )
    return summary


def _kv(text: str) -> tuple[str, object]:
    key, _, value = text.partition("=")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value


def _devices(text: str):
    return text if text == "auto" else int(text)


def _resolves_to_cpu(accelerator: str) -> bool:
    return accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available()
                                    and not torch.backends.mps.is_available())


if __name__ == "__main__":
    main()
