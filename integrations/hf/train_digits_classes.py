#!/usr/bin/env python
"""The digits task written against ``zsharp_algos.hf``: a timm model, two-pass SAM / ZSharp from
``--optim``, or the single-pass callback on a plain optimizer.

Compared with a stock transformers script, the changed line is the import of ``Trainer`` and
``TrainingArguments`` from ``zsharp_algos.hf``::

    # two-pass ZSharp (about 2x the cost of an SGD step)
    python integrations/hf/train_digits_classes.py --output_dir runs/zsharp \\
        --optim zsharp --base_optim sgd --optim_args momentum=0.9 --rho 0.1
    # single-pass ZSharp callback on plain SGD (about 1x)
    python integrations/hf/train_digits_classes.py --output_dir runs/callback \\
        --optim sgd --optim_args momentum=0.9 --sharpness_callback zsharp --rho 0.1
    # a ViT instead of a ResNet (any timm model, created untrained)
    python integrations/hf/train_digits_classes.py --output_dir runs/vit --model vit_tiny_patch16_224 \\
        --model_kwargs patch_size=4 --optim sam --base_optim adamw_torch --learning_rate 1e-3

Data: ``zsharp_algos.demo.data`` (scikit-learn's digits by default, or ``--data cifar10 --data_dir``
for a local CIFAR-10), with ``--label_noise`` of the training labels made wrong.
"""
from __future__ import annotations

import ast
from dataclasses import dataclass, field
from typing import Literal

import torch.nn.functional as F
from torch import nn
from train_digits import DictDataset, compute_metrics  # the plain example beside this file
from transformers import HfArgumentParser

from zsharp_algos.demo import build_model
from zsharp_algos.demo.data import DATASETS, load_data
from zsharp_algos.hf import SAMCallback, Trainer, TrainingArguments, ZSharpCallback


@dataclass
class ExampleArguments:
    model: str = field(default="resnet18", metadata={"help": "Any timm model name (created untrained)."})
    model_kwargs: str = field(default="", metadata={"help": "Extra timm.create_model arguments: k=v,k=v."})
    data: str = field(default="digits", metadata={"help": f"One of {DATASETS}."})
    data_dir: str | None = field(default=None, metadata={"help": "Local CIFAR-10 python batches (--data cifar10)."})
    label_noise: float = field(default=0.4, metadata={"help": "Fraction of training labels made wrong."})
    split_seed: int = field(default=0, metadata={"help": "Fixes the split, subsets and label noise."})
    train_subset: int | None = field(default=None, metadata={"help": "Use N random training examples."})
    sharpness_callback: Literal["none", "sam", "zsharp"] = field(
        default="none", metadata={"help": "Single-pass SAM / ZSharp callback (with a plain --optim)."}
    )


class ImageClassifier(nn.Module):
    """A timm classifier speaking the Trainer's dict protocol (loss computed when labels come)."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone

    def forward(self, pixel_values, labels=None):
        logits = self.backbone(pixel_values)
        if labels is None:
            return {"logits": logits}
        return {"loss": F.cross_entropy(logits, labels), "logits": logits}


def _kwargs(text: str) -> dict:
    pairs = (item.split("=", 1) for item in text.split(",") if item.strip())
    out = {}
    for key, value in pairs:
        try:
            out[key.strip()] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key.strip()] = value
    return out


def main() -> None:
    example, args = HfArgumentParser((ExampleArguments, TrainingArguments)).parse_args_into_dataclasses()
    data = load_data(
        example.data, data_dir=example.data_dir, seed=example.split_seed,
        label_noise=example.label_noise, train_subset=example.train_subset,
    )
    callbacks = []
    if example.sharpness_callback == "sam":
        callbacks.append(SAMCallback(rho=args.rho, interval=args.interval, adaptive=args.adaptive))
    elif example.sharpness_callback == "zsharp":
        callbacks.append(ZSharpCallback(rho=args.rho, percentile=args.percentile, scope=args.scope,
                                        interval=args.interval, adaptive=args.adaptive))
    trainer = Trainer(
        model=ImageClassifier(build_model(example.model, data.num_classes, **_kwargs(example.model_kwargs))),
        args=args,
        train_dataset=DictDataset(data.train_x, data.train_y),
        eval_dataset=DictDataset(data.test_x, data.test_y),
        compute_metrics=compute_metrics,
        callbacks=callbacks,
    )
    result = trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    trainer.save_metrics("train", result.metrics)
    metrics = trainer.evaluate()
    trainer.log_metrics("eval", metrics)
    trainer.save_metrics("eval", metrics)


if __name__ == "__main__":
    main()
