"""Where ZSharp's filter spends its time: the torch calls of ``first_step`` + ``restore`` on
timm resnet18 gradients, by total time (``cProfile``), next to SAM's, driven as ``step()`` drives them.

    python benchmarks/filter_profile.py --threads 2            # random normal gradients
    python benchmarks/filter_profile.py --threads 2 --real     # one backward of the untrained model
                                                               # (most are exactly zero: timm zero-initialises
                                                               # each residual branch's last BatchNorm)
    python benchmarks/filter_profile.py --threads 2 --strategy accelerator --scope tensor
                                                               # what a GPU runs, on CPU tensors
"""
from __future__ import annotations

import cProfile
import pstats
import statistics
import time

import torch
from torch import nn

from common import base_parser, setup

from zsharp_algos import SAM, ZSharp, order_stats


def main():
    parser = base_parser(__doc__)
    parser.add_argument("--real", action="store_true", help="gradients of one real backward pass")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--strategy", choices=order_stats.STRATEGIES, default="auto",
                        help="ZSharp's selection strategy (order_stats.strategy)")
    parser.add_argument("--scope", choices=("global", "tensor"), default="global")
    args = parser.parse_args()
    device = setup(args)
    import timm

    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=10).to(device)
    params = list(model.parameters())
    if args.real:
        x, y = torch.randn(64, 3, 32, 32, device=device), torch.randint(0, 10, (64,), device=device)
        nn.functional.cross_entropy(model(x), y).backward()
        grads = [p.grad.clone() for p in params]
    else:
        grads = [torch.randn_like(p) for p in params]
    opts = [("sam", SAM(torch.optim.SGD(params, lr=0.0))),
            (f"zsharp ({args.scope} scope, {args.strategy} strategy)", ZSharp(torch.optim.SGD(params, lr=0.0), scope=args.scope))]
    for name, opt in opts:
        profiler, times = cProfile.Profile(), []
        for step in range(args.steps + 1):
            for p, g in zip(params, grads):
                p.grad = g.clone()
            if step:  # the first step builds the save buffer: not profiled
                profiler.enable()
            start = time.perf_counter()
            with order_stats.strategy(args.strategy):
                opt.first_step()  # as step() runs it: w' built in the gradients, parameters re-pointed
                opt.restore()
            times.append(time.perf_counter() - start)
            profiler.disable()
        print(f"\n{name}: first_step + restore, median {statistics.median(times[1:]) * 1e3:.1f} ms "
              f"over {args.steps} steps; cumulative per call below is over all {args.steps}")
        pstats.Stats(profiler).sort_stats("tottime").print_stats(12)


if __name__ == "__main__":
    main()
