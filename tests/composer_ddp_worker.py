"""One rank of a data-parallel Composer run, for tests/test_composer.py.

Run as 2 ranks (``composer -n 2 tests/composer_ddp_worker.py OUT_DIR STEPS ALGORITHM...``, or
started by the test with the same environment variables); for each
algorithm in turn, every rank trains the same small BatchNorm network on its own shard of a fixed
data set and saves its final weights and optimizer state to ``OUT_DIR/{ALGORITHM}-rank{RANK}.pt``.
"""
from __future__ import annotations

import os
import sys
import warnings

import torch
from composer import Trainer
from composer.models import ComposerClassifier
from composer.utils import dist
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def small_bn_net(num_classes: int = 5) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(96, num_classes),
    )


def make_algorithm(name: str):
    if name == "zsharp":
        from zsharp_algos.composer import ZSharpAlgorithm

        return ZSharpAlgorithm(rho=0.5, interval=1)
    if name == "sam":
        from zsharp_algos.composer import SAMAlgorithm

        return SAMAlgorithm(rho=0.5, interval=2)
    if name == "composer_sam":  # Composer's own, for contrast
        from composer.algorithms import SAM

        warnings.filterwarnings("ignore", message="SAM has known issues")
        return SAM(rho=0.5, interval=1)
    raise ValueError(name)


def train(out_dir: str, algorithm: str, steps: int) -> None:
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 3, 8, 8, generator=gen), torch.randint(0, 5, (64,), generator=gen)
    dataset = TensorDataset(x, y)
    loader = DataLoader(dataset, batch_size=8, sampler=dist.get_sampler(dataset, shuffle=False))
    torch.manual_seed(1)
    model = small_bn_net()
    trainer = Trainer(
        model=ComposerClassifier(model, num_classes=5),
        train_dataloader=loader,
        optimizers=torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
        max_duration=f"{steps}ba",
        algorithms=[make_algorithm(algorithm)],
        device="cpu",
        progress_bar=False,
        log_to_console=False,
        seed=0,
    )
    trainer.fit()
    opt = trainer.state.optimizers[0]
    base = getattr(opt, "base_optimizer", opt)
    torch.save(
        {"model": model.state_dict(), "optimizer": base.state_dict()},
        os.path.join(out_dir, f"{algorithm}-rank{dist.get_global_rank()}.pt"),
    )


if __name__ == "__main__":
    for name in sys.argv[3:]:
        train(sys.argv[1], name, int(sys.argv[2]))
