"""One rank of a Composer run under FSDP2, for tests/test_composer.py.

Run as 2 gloo ranks (started by the test with the launcher's environment variables, as
``torchrun`` sets it up: ``python tests/composer_fsdp_worker.py OUT_DIR STEPS ALGORITHM...``).
For each algorithm in turn every rank trains a small MLP with Composer's Trainer,
``parallelism_config={"fsdp": FSDP2Config()}`` (``fully_shard`` on the model's children and its
root), on its shard of a fixed data set; rank 0 also trains an unsharded copy with the core
optimizer in a plain loop on the whole global batches (the reference). Each rank writes
``OUT_DIR/{ALGORITHM}-rank{RANK}.json``: whether the trained parameters were DTensors, the
largest relative weight difference to the reference (rank 0), the optimizer's step count, and
the work buffer's bytes next to the local shard's. ``resume:ALGORITHM``: a run saved to
Composer's sharded checkpoint halfway and resumed in a fresh Trainer, against the uninterrupted
run (``OUT_DIR/resume-{ALGORITHM}-rank{RANK}.json``).
"""
from __future__ import annotations

import json
import os
import sys
import warnings

import torch
import torch.nn.functional as F
from composer import Trainer
from composer.models import ComposerClassifier
from composer.utils import dist
from composer.utils.parallelism import FSDP2Config
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from zsharp_algos import SAM, ZSharp  # noqa: E402
from zsharp_algos.composer import SAMAlgorithm, ZSharpAlgorithm  # noqa: E402

from fsdp_probe import gradient_factor  # noqa: E402  (this script's folder is on sys.path)

NUM_CLASSES, PER_RANK = 5, 8
ALGORITHMS = {
    "zsharp": (ZSharpAlgorithm, ZSharp, dict(rho=0.05, percentile=70)),
    "zsharp_tensor": (ZSharpAlgorithm, ZSharp, dict(rho=0.05, percentile=95, scope="tensor")),
    "sam_interval2": (SAMAlgorithm, SAM, dict(rho=0.05, interval=2)),
}


def mlp() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Flatten(), nn.Linear(192, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(),
                         nn.Linear(16, NUM_CLASSES))


def sgd(params):
    return torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=5e-4)


def data(steps: int, world: int):
    gen = torch.Generator().manual_seed(0)
    n = steps * PER_RANK * world
    return torch.randn(n, 3, 8, 8, generator=gen), torch.randint(0, NUM_CLASSES, (n,), generator=gen)


def reference(optimizer_cls, kwargs, x, y, steps, world, factor):
    model = mlp()
    opt = optimizer_cls(sgd(model.parameters()), model=model, **kwargs)
    size = PER_RANK * world
    for i in range(steps):
        xb, yb = x[i * size:(i + 1) * size], y[i * size:(i + 1) * size]

        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(model(xb), yb) * factor
            loss.backward()
            return loss

        opt.step(closure)
    return model


def fsdp2_trainer(name: str, steps: int, duration: int | None = None, **trainer_kwargs):
    """A Trainer under FSDP2 for ``duration`` (default ``steps``) batches of this rank's shard of
    the data set of ``steps`` global batches."""
    algorithm_cls, _, kwargs = ALGORITHMS[name]
    world = dist.get_world_size()
    x, y = data(steps, world)
    dataset = TensorDataset(x, y)
    loader = DataLoader(dataset, batch_size=PER_RANK, sampler=dist.get_sampler(dataset, shuffle=False))
    model = mlp()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="FSDP2 Config/APIs are experimental")
        config = FSDP2Config()
    trainer = Trainer(
        model=ComposerClassifier(model, num_classes=NUM_CLASSES),
        train_dataloader=loader,
        optimizers=sgd(model.parameters()),
        max_duration=f"{duration or steps}ba",
        algorithms=[algorithm_cls(**kwargs)],
        parallelism_config={"fsdp": config},
        device="cpu",
        progress_bar=False,
        log_to_console=False,
        seed=0,
        **trainer_kwargs,
    )
    return model, trainer, (x, y)


def resume(out_dir: str, name: str, steps: int) -> None:
    """Composer's sharded checkpoint (torch.distributed.checkpoint) after ``steps // 2``
    batches, resumed in a fresh Trainer, against the uninterrupted run."""
    half = steps // 2
    model, trainer, _ = fsdp2_trainer(name, steps)
    trainer.fit()
    full = [p.detach().full_tensor() for p in model.parameters()]
    trainer.close()
    folder = os.path.join(out_dir, f"checkpoints-{name}")
    _, trainer, _ = fsdp2_trainer(name, steps, half, save_folder=folder, save_interval=f"{half}ba",
                                  save_filename="ba{batch}")
    trainer.fit()
    trainer.close()
    model, trainer, _ = fsdp2_trainer(name, steps, load_path=os.path.join(folder, f"ep0-ba{half}"))
    count_after_load = trainer.state.optimizers[0].step_count
    trainer.fit()
    resumed = [p.detach().full_tensor() for p in model.parameters()]
    result = {
        "bitwise_equal": all(torch.equal(a, b) for a, b in zip(full, resumed)),
        "step_count_after_load": count_after_load,
        "step_count": trainer.state.optimizers[0].step_count,
    }
    with open(os.path.join(out_dir, f"resume-{name}-rank{dist.get_global_rank()}.json"), "w") as f:
        json.dump(result, f)
    trainer.close()


def run(out_dir: str, name: str, steps: int, factor: float) -> None:
    _, optimizer_cls, kwargs = ALGORITHMS[name]
    world, rank = dist.get_world_size(), dist.get_global_rank()
    model, trainer, (x, y) = fsdp2_trainer(name, steps)
    trainer.fit()
    opt = trainer.state.optimizers[0]
    params = [p for g in opt.param_groups for p in g["params"]]
    result = {
        "optimizer": type(opt).__name__,
        "dtensor": all(hasattr(p, "full_tensor") for p in params) and len(params) == len(list(model.parameters())),
        "same_as_model": {id(p) for p in params} == {id(p) for p in model.parameters()},
        "step_count": opt.step_count,
        "buffer_nbytes": opt.engine.placement.buffer.nbytes,
        "local_param_nbytes": sum(p.to_local().numel() * p.element_size() for p in params),
        "global_param_nbytes": sum(p.numel() * p.element_size() for p in params),
        "factor": factor,
    }
    full = [p.detach().full_tensor() for p in model.parameters()]  # collective: every rank
    if rank == 0:
        ref = reference(optimizer_cls, kwargs, x, y, steps, world, factor)
        result["rel_diffs"] = [float((w - q.detach()).norm() / q.detach().norm()) for w, q in zip(full, ref.parameters())]
        result["max_rel_diff"] = max(result["rel_diffs"])
    with open(os.path.join(out_dir, f"{name}-rank{rank}.json"), "w") as f:
        json.dump(result, f)
    trainer.close()


if __name__ == "__main__":
    out, steps = sys.argv[1], int(sys.argv[2])
    dist.initialize_dist("cpu")
    factor = gradient_factor()
    for algorithm in sys.argv[3:]:
        if algorithm.startswith("resume:"):
            resume(out, algorithm.split(":", 1)[1], steps)
        else:
            run(out, algorithm, steps, factor)
