"""One rank of a data-parallel Composer run, for tests/test_composer.py.

Run as 2 ranks (``composer -n 2 tests/composer_ddp_worker.py OUT_DIR STEPS ALGORITHM...``, or
started by the test with the same environment variables); for each
algorithm in turn, every rank trains the same small BatchNorm network on its own shard of a fixed
data set and saves its final weights, optimizer state and number of training forward passes to
``OUT_DIR/{ALGORITHM}-rank{RANK}.pt``.

Rank ``r`` gets examples ``r, r + 2, ...`` of :func:`ddp_data` in order, 8 a batch (Composer's
sampler without shuffling), 4 batches an epoch: :func:`rank_batch` is that batch, for references.
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


WORLD, BATCH, LR, MOMENTUM = 2, 8, 0.05, 0.9
#: the sharpness options of each algorithm run here (the test computes its decisions from them)
OPTIONS = {
    "zsharp": dict(rho=0.5, interval=1),
    "sam": dict(rho=0.5, interval=2),
    # LookSAM: the first pass all-reduced (a rule steps with it), g_v reused on the plain steps
    "sam_looksam": dict(rho=0.5, interval=3, reuse="looksam"),
    # random intervals: each rank draws the same decisions from the seed and Composer's batch counter
    "zsharp_random": dict(rho=0.5, interval=2, interval_mode="random", interval_seed=0),
}


def ddp_data() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(64, 3, 8, 8, generator=gen), torch.randint(0, 5, (64,), generator=gen)


def rank_batch(x: torch.Tensor, y: torch.Tensor, rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    per_rank = len(y) // WORLD
    start = (step % (per_rank // BATCH)) * BATCH
    idx = list(range(rank, len(y), WORLD))[start : start + BATCH]
    return x[idx], y[idx]


def make_algorithm(name: str):
    if name.startswith("zsharp"):
        from zsharp_algos.composer import ZSharpAlgorithm

        return ZSharpAlgorithm(**OPTIONS[name])
    if name.startswith("sam"):
        from zsharp_algos.composer import SAMAlgorithm

        return SAMAlgorithm(**OPTIONS[name])
    if name == "composer_sam":  # Composer's own, for contrast
        from composer.algorithms import SAM

        warnings.filterwarnings("ignore", message="SAM has known issues")
        return SAM(rho=0.5, interval=1)
    raise ValueError(name)


def train(out_dir: str, algorithm: str, steps: int) -> None:
    dataset = TensorDataset(*ddp_data())
    loader = DataLoader(dataset, batch_size=BATCH, sampler=dist.get_sampler(dataset, shuffle=False))
    torch.manual_seed(1)
    model = small_bn_net()
    forwards = [0]  # training forward passes: one per plain step, two per sharpness step
    model.register_forward_pre_hook(lambda module, args: forwards.__setitem__(0, forwards[0] + module.training))
    trainer = Trainer(
        model=ComposerClassifier(model, num_classes=5),
        train_dataloader=loader,
        optimizers=torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM),
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
        {"model": model.state_dict(), "optimizer": base.state_dict(), "forwards": forwards[0]},
        os.path.join(out_dir, f"{algorithm}-rank{dist.get_global_rank()}.pt"),
    )


if __name__ == "__main__":
    for name in sys.argv[3:]:
        train(sys.argv[1], name, int(sys.argv[2]))
