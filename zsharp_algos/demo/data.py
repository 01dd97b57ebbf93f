"""Small image-classification data sets for the comparison demo, held in memory as tensors.

* ``digits``: scikit-learn's embedded ``load_digits`` (1,797 real 8x8 grey handwritten digits,
  no download), split into train/test by a stratified, seeded split, upsampled (bilinear) to
  3x32x32 so that ImageNet-style vision models apply unchanged.
* ``cifar10``: CIFAR-10 read from a local folder holding the standard python-pickle batches
  (``data_batch_1`` ... ``data_batch_5``, ``test_batch``). Nothing is ever downloaded.

Images are normalised per channel with the training split's mean and standard deviation.
``label_noise`` replaces an exact fraction of the *training* labels by a different class drawn
uniformly (symmetric noise); test labels are always clean.
"""
from __future__ import annotations

import dataclasses
import pickle
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .._optional import require

__all__ = ["DATASETS", "ImageData", "load_data", "load_digits", "load_cifar10", "corrupt_labels"]

DATASETS = ("digits", "cifar10")
IMAGE_SIZE = 32
NUM_CLASSES = 10  # both data sets
CIFAR10_FOLDER = "cifar-10-batches-py"  # the folder inside the official archive
CIFAR10_FILES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch",)


@dataclasses.dataclass(frozen=True)
class ImageData:
    """A train/test split: images ``(N, 3, 32, 32)`` float32, labels int64."""

    name: str
    train_x: Tensor
    train_y: Tensor  #: possibly noisy
    test_x: Tensor
    test_y: Tensor  #: always clean
    noisy: Tensor  #: bool per training example: was its label replaced?
    num_classes: int

    def describe(self) -> str:
        return (
            f"{self.name}: {len(self.train_y)} train ({int(self.noisy.sum())} noisy labels), "
            f"{len(self.test_y)} test, {self.num_classes} classes, images {tuple(self.train_x.shape[1:])}"
        )

    def to(self, device: torch.device) -> "ImageData":
        """A copy with every tensor on ``device``."""
        moved = {k: v.to(device) for k, v in vars(self).items() if isinstance(v, Tensor)}
        return dataclasses.replace(self, **moved)


Split = tuple[Tensor, Tensor, Tensor, Tensor]  # train_x, train_y, test_x, test_y


def load_digits(seed: int = 0, test_fraction: float = 0.2) -> Split:
    """scikit-learn's digits as float images in [0, 1] of shape ``(N, 3, 32, 32)``, split
    train/test with a stratified split fixed by ``seed``."""
    datasets = require("sklearn.datasets", "demo", "the digits data set")
    model_selection = require("sklearn.model_selection", "demo", "the digits data set")
    x, y = datasets.load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = model_selection.train_test_split(
        x, y, test_size=test_fraction, stratify=y, random_state=seed
    )

    def images(a: np.ndarray) -> Tensor:
        t = torch.as_tensor(a, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0  # pixel values are 0..16
        t = F.interpolate(t, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
        return t.repeat(1, 3, 1, 1)

    return images(x_train), _labels(y_train), images(x_test), _labels(y_test)


def load_cifar10(data_dir: str | Path) -> Split:
    """CIFAR-10 from ``data_dir`` (the extracted ``cifar-10-batches-py`` folder or its parent),
    images as uint8 ``(N, 3, 32, 32)``. Raises :class:`FileNotFoundError` if batches are missing.

    The batches are Python pickles: only point this at files you trust.
    """
    root = Path(data_dir).expanduser()
    folder = root / CIFAR10_FOLDER if (root / CIFAR10_FOLDER).is_dir() else root
    missing = [name for name in CIFAR10_FILES if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"CIFAR-10 batches not found in {str(folder)!r} (missing: {', '.join(missing)}). Download "
            "'CIFAR-10 python version' from https://www.cs.toronto.edu/~kriz/cifar.html yourself, extract "
            "it and pass the folder with --data-dir (this tool never downloads data)"
        )
    train = [_read_cifar_batch(folder / name) for name in CIFAR10_FILES[:-1]]
    test_x, test_y = _read_cifar_batch(folder / CIFAR10_FILES[-1])
    return torch.cat([x for x, _ in train]), torch.cat([y for _, y in train]), test_x, test_y


def _read_cifar_batch(path: Path) -> tuple[Tensor, Tensor]:
    with open(path, "rb") as f:
        batch = pickle.load(f, encoding="bytes")
    data = batch.get(b"data", batch.get("data"))
    labels = batch.get(b"labels", batch.get("labels"))
    if data is None or labels is None:
        raise ValueError(f"{str(path)!r} is not a CIFAR-10 python batch (no 'data'/'labels' entries)")
    x = torch.as_tensor(np.asarray(data, dtype=np.uint8)).reshape(-1, 3, IMAGE_SIZE, IMAGE_SIZE)
    return x, _labels(labels)


def _labels(y) -> Tensor:
    return torch.as_tensor(np.asarray(y), dtype=torch.int64)


def corrupt_labels(labels: Tensor, fraction: float, num_classes: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Symmetric label noise: exactly ``round(fraction * N)`` labels, chosen at random, are
    replaced by a *different* class drawn uniformly. Deterministic given ``seed``.

    Returns ``(new_labels, mask)`` where ``mask`` marks the replaced entries.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"label noise must be a fraction in [0, 1], got {fraction!r}")
    gen = torch.Generator().manual_seed(seed)
    n_noisy = round(fraction * len(labels))
    idx = torch.randperm(len(labels), generator=gen)[:n_noisy]
    shift = torch.randint(1, num_classes, (n_noisy,), generator=gen)  # never 0: always a new class
    noisy_labels = labels.clone()
    noisy_labels[idx] = (labels[idx] + shift) % num_classes
    mask = torch.zeros(len(labels), dtype=torch.bool)
    mask[idx] = True
    return noisy_labels, mask


def _subset(x: Tensor, y: Tensor, n: int | None, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """A random ``n``-example subset (all of it if ``n`` is None or too large)."""
    if n is None or n >= len(y):
        return x, y
    if n < 1:
        raise ValueError(f"subset size must be >= 1, got {n}")
    idx = torch.randperm(len(y), generator=gen)[:n].sort().values
    return x[idx], y[idx]


def _unit_float(x: Tensor) -> Tensor:
    return x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()


def load_data(
    name: str = "digits",
    *,
    data_dir: str | Path | None = None,
    seed: int = 0,
    label_noise: float = 0.0,
    train_subset: int | None = None,
    test_subset: int | None = None,
) -> ImageData:
    """Load data set ``name`` (see :data:`DATASETS`), optionally subsample it, normalise it and
    corrupt a ``label_noise`` fraction of the training labels. ``seed`` fixes the split (digits),
    the subsets and the noise, so every optimizer and every rerun sees the same data."""
    if name == "digits":
        train_x, train_y, test_x, test_y = load_digits(seed)
    elif name == "cifar10":
        if data_dir is None:
            raise ValueError("--data cifar10 needs --data-dir: a local folder with the CIFAR-10 python batches")
        train_x, train_y, test_x, test_y = load_cifar10(data_dir)
    else:
        raise ValueError(f"unknown data set {name!r}; choose one of {', '.join(DATASETS)}")
    gen = torch.Generator().manual_seed(seed)
    train_x, train_y = _subset(train_x, train_y, train_subset, gen)
    test_x, test_y = _subset(test_x, test_y, test_subset, gen)
    train_x, test_x = _unit_float(train_x), _unit_float(test_x)
    mean = train_x.mean(dim=(0, 2, 3), keepdim=True)
    std = train_x.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
    noisy_y, noisy = corrupt_labels(train_y, label_noise, NUM_CLASSES, seed)
    return ImageData(
        name=name,
        train_x=(train_x - mean) / std,
        train_y=noisy_y,
        test_x=(test_x - mean) / std,
        test_y=test_y,
        noisy=noisy,
        num_classes=NUM_CLASSES,
    )
