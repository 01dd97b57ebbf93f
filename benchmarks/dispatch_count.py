"""Ops dispatched by one ``first_step()`` + ``restore()`` of SAM and ZSharp (both scopes), with the
sync-free selection strategy accelerators use, run on CPU tensors.

On a GPU every dispatched op is at least one kernel launch (5-10 us each), so this count is the
launch floor of a sharpness step's optimizer work, whatever the arithmetic costs. Ops are counted
with a ``TorchDispatchMode``; view and metadata ops (those whose output aliases their input
without writing it: ``detach``, ``view``, ``select``, ``slice``, ``as_strided``, ``expand``,
``unbind``, ``view.dtype``, ...) launch nothing and are not counted.

    python benchmarks/dispatch_count.py --out results/bench
    python benchmarks/dispatch_count.py --models resnet18 --ops     # also list the ops by count

Writes ``DIR/dispatch_count.json``: ``{"models": {NAME: {"tensors": N, "sam": OPS,
"zsharp_global": OPS, "zsharp_tensor": OPS}}, "direction_ops": {NAME: {METHOD: OPS}}, "ops":
{NAME: {METHOD: {op: count}}}, ...}`` (``direction_ops``: the part dispatched inside the ascent
direction, i.e. the filter; the rest is the perturbation engine's).
"""
from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from zsharp_algos import SAM, ZSharp, order_stats
from zsharp_algos.directions import GradientDirection, ZScoreDirection

MODELS = ("resnet18", "resnet50", "vit_base_patch16_224")
METHODS = {
    "sam": lambda base: SAM(base, rho=0.05),
    "zsharp_global": lambda base: ZSharp(base, rho=0.05),
    "zsharp_tensor": lambda base: ZSharp(base, rho=0.05, scope="tensor"),
}
TARGET = 150  # ops per ZSharp first_step() + restore(), any model, either scope


class DispatchCount(TorchDispatchMode):
    """Counts the ops dispatched under the mode, by name, leaving out view and metadata ops;
    ``in_direction`` counts those dispatched inside the ascent direction's call (the filter)."""

    def __init__(self):
        super().__init__()
        self.ops: Counter[str] = Counter()
        self.excluded: Counter[str] = Counter()
        self.in_direction = 0
        self._depth = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        (self.excluded if func.is_view else self.ops)[func.name()] += 1
        self.in_direction += bool(self._depth) and not func.is_view
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.ops.values())


def parameters(name: str) -> list[nn.Parameter]:
    import timm

    torch.manual_seed(0)
    return [nn.Parameter(p.detach()) for p in timm.create_model(name).parameters()]


def _watch_directions(mode: DispatchCount):
    """Mark the ops dispatched inside SAM's and ZSharp's direction calls."""
    patched = []
    for cls in (GradientDirection, ZScoreDirection):
        original = cls.__call__

        def call(self, *args, _original=original, **kwargs):
            mode._depth += 1
            try:
                return _original(self, *args, **kwargs)
            finally:
                mode._depth -= 1

        cls.__call__ = call
        patched.append((cls, original))
    return patched


def count(make, params: list[nn.Parameter], grads: list[torch.Tensor]) -> DispatchCount:
    opt = make(torch.optim.SGD(params, lr=1e-3))
    with order_stats.strategy("accelerator"):
        for warm in (True, False):  # the first step allocates the work buffer and caches the layout
            for p, g in zip(params, grads):
                p.grad = g.clone()
            mode = DispatchCount()
            if warm:
                opt.first_step()
                opt.restore()
                continue
            patched = _watch_directions(mode)
            try:
                with mode:
                    opt.first_step()
                    opt.restore()
            finally:
                for cls, original in patched:
                    cls.__call__ = original
    return mode


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="results/bench", help="folder for dispatch_count.json")
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated timm model names")
    parser.add_argument("--ops", action="store_true", help="print each method's ops by count")
    args = parser.parse_args()
    results: dict = {"torch": torch.__version__, "strategy": "accelerator (sync-free), on CPU tensors",
                     "counted": "ops of one first_step() + restore(), view and metadata ops excluded",
                     "target_zsharp": TARGET, "models": {}, "direction_ops": {}, "ops": {}, "excluded_ops": {}}
    for name in args.models.split(","):
        params = parameters(name)
        gen = torch.Generator().manual_seed(1)
        grads = [torch.randn(p.shape, generator=gen) for p in params]
        row = results["models"][name] = {"tensors": len(params)}
        inside = results["direction_ops"][name] = {}
        results["ops"][name], results["excluded_ops"][name] = {}, {}
        for method, make in METHODS.items():
            mode = count(make, params, grads)
            row[method] = mode.total
            inside[method] = mode.in_direction
            results["ops"][name][method] = dict(mode.ops.most_common())
            results["excluded_ops"][name][method] = dict(mode.excluded.most_common())
            if args.ops:
                print(f"\n{name} {method}: {mode.total} ops")
                for op, n in mode.ops.most_common():
                    print(f"  {n:5d}  {op}")
        del params, grads
    header = ["model", "tensors", *(f"{m} (direction)" for m in METHODS), f"ZSharp <= {TARGET}"]
    rows = [[name, str(r["tensors"]), *(f"{r[m]} ({results['direction_ops'][name][m]})" for m in METHODS),
             "met" if max(r["zsharp_global"], r["zsharp_tensor"]) <= TARGET else "missed"]
            for name, r in results["models"].items()]
    widths = [max(len(x) for x in col) for col in zip(header, *rows)]
    print(f"\nops dispatched per first_step() + restore() (accelerator strategy, torch {torch.__version__})")
    for i, row in enumerate([header] + rows):
        print("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |")
        if i == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "dispatch_count.json").write_text(json.dumps(results, indent=2))
    print("\nwrote", out / "dispatch_count.json")


if __name__ == "__main__":
    main()
