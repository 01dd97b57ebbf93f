#!/usr/bin/env python
"""Image classification on scikit-learn's digits with a plain Hugging Face ``Trainer`` script.

This script imports nothing from ``zsharp_algos``: it is an ordinary transformers script (a
small ResNet built from its config, no downloads). Run it as it is for the usual optimizers, or
through the ``zsharp-hf`` launcher for ``--optim sam`` / ``--optim zsharp``::

    python integrations/hf/train_digits.py --output_dir runs/sgd --optim sgd --optim_args momentum=0.9
    zsharp-hf integrations/hf/train_digits.py --output_dir runs/zsharp \\
        --optim zsharp --base_optim sgd --optim_args momentum=0.9 --rho 0.05 --percentile 70
    torchrun --nproc_per_node 2 -m zsharp_algos.hf integrations/hf/train_digits.py --output_dir runs/ddp \\
        --optim zsharp --base_optim sgd --optim_args momentum=0.9

The data: the 1,797 8x8 digit images that ship inside scikit-learn, upsampled to 3x32x32, split
80/20 (stratified), with ``--label_noise`` of the training labels replaced by a wrong class.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset
from transformers import HfArgumentParser, ResNetConfig, ResNetForImageClassification, Trainer, TrainingArguments


@dataclass
class DataArguments:
    label_noise: float = field(default=0.2, metadata={"help": "Fraction of training labels replaced by a wrong class."})
    split_seed: int = field(default=0, metadata={"help": "Seed of the train/test split and of the label noise."})
    train_subset: int | None = field(default=None, metadata={"help": "Use only this many training images."})
    widths: str = field(default="16,32,64", metadata={"help": "Channel widths of the ResNet's stages."})


class DictDataset(Dataset):
    """Images and labels as the dicts a Trainer feeds to the model."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"pixel_values": self.images[i], "labels": self.labels[i]}


def load_digits(split_seed: int, label_noise: float, train_subset: int | None = None) -> tuple[Dataset, Dataset]:
    """scikit-learn's digits as normalised (N, 3, 32, 32) images; noisy training labels."""
    from sklearn.datasets import load_digits as sk_digits
    from sklearn.model_selection import train_test_split

    x, y = sk_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.2, stratify=y, random_state=split_seed)
    x_train, y_train = x_train[:train_subset], y_train[:train_subset]

    def images(a: np.ndarray) -> torch.Tensor:
        t = torch.as_tensor(a, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
        return F.interpolate(t, size=(32, 32), mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)

    train_x, test_x = images(x_train), images(x_test)
    mean, std = train_x.mean(), train_x.std()
    train_y = torch.as_tensor(y_train, dtype=torch.int64)
    gen = torch.Generator().manual_seed(split_seed)
    noisy = torch.randperm(len(train_y), generator=gen)[: round(label_noise * len(train_y))]
    train_y[noisy] = (train_y[noisy] + torch.randint(1, 10, (len(noisy),), generator=gen)) % 10
    test_y = torch.as_tensor(y_test, dtype=torch.int64)
    return DictDataset((train_x - mean) / std, train_y), DictDataset((test_x - mean) / std, test_y)


def build_model(widths: str, num_labels: int = 10) -> ResNetForImageClassification:
    """A small ResNet from its config (random weights, nothing downloaded)."""
    sizes = [int(w) for w in widths.split(",")]
    config = ResNetConfig(
        num_channels=3, embedding_size=sizes[0], hidden_sizes=sizes, depths=[1] * len(sizes), num_labels=num_labels
    )
    return ResNetForImageClassification(config)


def compute_metrics(eval_pred) -> dict[str, float]:
    logits, labels = eval_pred
    return {"accuracy": float((np.argmax(logits, axis=-1) == labels).mean())}


def main() -> None:
    parser = HfArgumentParser((DataArguments, TrainingArguments))
    data_args, training_args = parser.parse_args_into_dataclasses()
    train_set, test_set = load_digits(data_args.split_seed, data_args.label_noise, data_args.train_subset)
    trainer = Trainer(
        model=build_model(data_args.widths),
        args=training_args,
        train_dataset=train_set,
        eval_dataset=test_set,
        compute_metrics=compute_metrics,
    )
    result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_metrics("train", result.metrics)
    metrics = trainer.evaluate()
    trainer.log_metrics("eval", metrics)
    trainer.save_metrics("eval", metrics)


if __name__ == "__main__":
    main()
