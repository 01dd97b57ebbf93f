"""Train a timm image classifier with Composer from a YAML run config.

Single process (CPU or one GPU)::

    python integrations/composer/train.py --config yamls/composer/resnet18_zsharp.yaml

Data-parallel, 2 processes (gloo on CPU, nccl on GPUs)::

    composer -n 2 integrations/composer/train.py --config yamls/composer/resnet18_zsharp.yaml

Any config value can be overridden with ``dotted.key=value`` (the value is read as YAML)::

    python integrations/composer/train.py --config yamls/composer/vit_tiny_sam.yaml \\
        trainer.max_duration=2ep data.label_noise=0.2 algorithms.sam.rho=0.1

Config layout (see ``yamls/composer/``): ``base`` (a config file this one extends, relative to
it; sections merge, a null value drops the inherited key), ``seed``, ``model`` (a timm model name and its ``create_model`` keyword arguments; never
pretrained), ``data`` (:func:`zsharp_algos.demo.data.load_data` arguments and ``batch_size``),
``optimizer`` (a base optimizer by :func:`zsharp_algos.create_optimizer` name and its
arguments), ``scheduler``, ``algorithms`` (``sam`` / ``zsharp`` with their arguments) and
``trainer`` (keyword arguments of ``composer.Trainer``).
"""
from __future__ import annotations

import argparse
import copy
from pathlib import Path
from typing import Any, Sequence

import torch
import yaml
from composer import Trainer
from composer.models import ComposerClassifier
from composer.optim import ConstantScheduler, CosineAnnealingWithWarmupScheduler
from composer.utils import dist, reproducibility
from torch.utils.data import DataLoader, TensorDataset

from zsharp_algos import create_optimizer
from zsharp_algos._optional import require
from zsharp_algos.composer import SAMAlgorithm, ZSharpAlgorithm
from zsharp_algos.demo.data import load_data
from zsharp_algos.options import DefaultsHelpFormatter
from zsharp_algos.registry import SHARPNESS_OPTIMIZERS

ALGORITHMS = {"sam": SAMAlgorithm, "zsharp": ZSharpAlgorithm}
SCHEDULERS = {"cosine": CosineAnnealingWithWarmupScheduler, "constant": ConstantScheduler}


# --------------------------------------------------------------------------- config
def load_config(path: str | Path, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Read ``path`` (following its ``base`` chain) and apply ``key.sub=value`` overrides."""
    path = Path(path)
    with open(path) as f:
        cfg = yaml.safe_load(f) or {}
    base = cfg.pop("base", None)
    if base is not None:
        cfg = _merge(load_config(path.parent / base), cfg)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r} is not of the form dotted.key=value")
        *parents, leaf = key.split(".")
        node = cfg
        for name in parents:
            node = node.setdefault(name, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r}: {name!r} is not a section")
        node[leaf] = yaml.safe_load(value)
    return cfg


def _merge(base: dict, update: dict) -> dict:
    """``base`` updated by ``update``: sections merged recursively, a null value removes the
    inherited key (e.g. ``momentum: null`` when an AdamW config extends an SGD one)."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        elif value is None:
            out.pop(key, None)
        else:
            out[key] = copy.deepcopy(value)
    return out


# --------------------------------------------------------------------------- pieces
def build_dataloaders(cfg: dict[str, Any], seed: int) -> tuple[DataLoader, DataLoader, int]:
    """Train/eval loaders over :func:`zsharp_algos.demo.data.load_data`, sharded across ranks."""
    cfg = dict(cfg)
    batch_size = int(cfg.pop("batch_size", 64))
    data = load_data(cfg.pop("name", "digits"), seed=seed, **cfg)
    train = TensorDataset(data.train_x, data.train_y)
    test = TensorDataset(data.test_x, data.test_y)
    world = dist.get_world_size()
    if batch_size % world:
        raise ValueError(f"data.batch_size={batch_size} must be divisible by the number of processes ({world})")
    train_dl = DataLoader(
        train, batch_size=batch_size // world, sampler=dist.get_sampler(train, shuffle=True, seed=seed), drop_last=True
    )
    eval_dl = DataLoader(test, batch_size=batch_size // world, sampler=dist.get_sampler(test, shuffle=False))
    return train_dl, eval_dl, data.num_classes


def build_model(cfg: dict[str, Any], num_classes: int) -> ComposerClassifier:
    """A timm model, randomly initialised (never downloaded), as a Composer classifier."""
    timm = require("timm", "vision", "the Composer training script")
    kwargs = dict(cfg.get("kwargs") or {})
    if kwargs.pop("pretrained", False):
        raise ValueError("model.kwargs.pretrained is not supported: this script never downloads weights")
    net = timm.create_model(cfg["name"], pretrained=False, num_classes=num_classes, **kwargs)
    return ComposerClassifier(net, num_classes=num_classes)


def build_optimizer(cfg: dict[str, Any], model: torch.nn.Module) -> torch.optim.Optimizer:
    cfg = dict(cfg)
    name = cfg.pop("name", "sgd")
    if name.lower() in SHARPNESS_OPTIMIZERS:
        raise ValueError(
            f"optimizer.name={name!r}: give the base optimizer here (sgd, adamw, ...) and the sharpness "
            f"method under algorithms: ({', '.join(ALGORITHMS)})"
        )
    return create_optimizer(name, model.parameters(), **cfg)


def build_algorithms(cfg: dict[str, Any] | None) -> list:
    out = []
    for name, kwargs in (cfg or {}).items():
        if name not in ALGORITHMS:
            raise ValueError(f"unknown algorithm {name!r}; choose from {sorted(ALGORITHMS)}")
        out.append(ALGORITHMS[name](**(kwargs or {})))
    return out


def build_scheduler(cfg: dict[str, Any] | None):
    if not cfg:
        return None
    cfg = dict(cfg)
    name = cfg.pop("name")
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; choose from {sorted(SCHEDULERS)}")
    return SCHEDULERS[name](**cfg)


def build_trainer(cfg: dict[str, Any]) -> Trainer:
    seed = int(cfg.get("seed", 0))
    reproducibility.seed_all(seed)  # same initial weights on every rank (DDP also broadcasts them)
    train_dl, eval_dl, num_classes = build_dataloaders(cfg.get("data", {}), seed)
    model = build_model(cfg["model"], num_classes)
    return Trainer(
        model=model,
        train_dataloader=train_dl,
        eval_dataloader=eval_dl,
        optimizers=build_optimizer(cfg.get("optimizer", {}), model),
        schedulers=build_scheduler(cfg.get("scheduler")),
        algorithms=build_algorithms(cfg.get("algorithms")),
        seed=seed,
        **(cfg.get("trainer") or {}),
    )


# --------------------------------------------------------------------------- entry point
def main(argv: Sequence[str] | None = None) -> Trainer:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=DefaultsHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML run config (yamls/composer/*.yaml)")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. trainer.max_duration=2ep")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    trainer = build_trainer(cfg)
    trainer.fit()
    if dist.get_global_rank() == 0:
        algos = ", ".join(repr(a) for a in trainer.state.algorithms) or "none"
        metrics = {name: round(float(value), 4) for name, value in trainer.state.eval_metric_values.items()}
        print(f"done: {trainer.state.timestamp.batch} batches, algorithms: {algos}, eval: {metrics}", flush=True)
    return trainer


if __name__ == "__main__":
    main()
