"""ZSharp's optimizer-only time and extra memory versus parameter count, up to resnet50,
vit_base_patch16_224 (86M) and a single 22M-element tensor, where quantile-based peers fail.

    python benchmarks/filter_scaling.py --device cpu --threads 2
    python benchmarks/filter_scaling.py --device cuda
Memory is read from the CUDA caching allocator, or on the CPU counted op by op over the tensors
(``common.TensorMemory``); both exact for tensors. The JSON is rewritten after each subject, so a
run cut short keeps the finished ones; ``--time-budget`` skips the subjects not started in time.
"""
from __future__ import annotations

import time

import torch
from torch import nn

from common import base_parser, interleaved_medians, machine, memory_of, print_table, setup, write_json
from peers import LoopSAM, Ours, QuantileZSharp, optimizer_only_unit

from zsharp_algos import SAM, ZSharp

SUBJECTS = ["resnet18", "resnet50", "vit_base_patch16_224", "single_22M"]
METHODS = {
    "ours_sam": lambda ps: Ours(SAM(torch.optim.SGD(ps, lr=1e-3), rho=0.05)),
    "ours_zsharp": lambda ps: Ours(ZSharp(torch.optim.SGD(ps, lr=1e-3), rho=0.05)),
    "ours_zsharp_tensor": lambda ps: Ours(ZSharp(torch.optim.SGD(ps, lr=1e-3), rho=0.05, scope="tensor")),
    # without the sharpness/* statistics the engine records by default (what they cost)
    "ours_sam_no_stats": lambda ps: Ours(SAM(torch.optim.SGD(ps, lr=1e-3), rho=0.05, record_stats=False)),
    "ours_zsharp_no_stats": lambda ps: Ours(ZSharp(torch.optim.SGD(ps, lr=1e-3), rho=0.05, record_stats=False)),
    "loop_sam": lambda ps: LoopSAM(ps, torch.optim.SGD(ps, lr=1e-3)),
    "quantile_zsharp": lambda ps: QuantileZSharp(ps, torch.optim.SGD(ps, lr=1e-3)),
}


def parameters(subject, device):
    if subject == "single_22M":
        return [nn.Parameter(torch.randn(4400, 5000, device=device))]
    import timm

    torch.manual_seed(0)
    return [nn.Parameter(p.detach().to(device)) for p in timm.create_model(subject, num_classes=10).parameters()]


def measure(subject, device, rounds, warmup):
    params0 = parameters(subject, device)
    grads = [torch.randn_like(p) for p in params0]
    n = sum(p.numel() for p in params0)
    param_bytes = sum(p.numel() * p.element_size() for p in params0)
    units, memory, failures = {}, {}, {}
    for name, make in METHODS.items():
        # Each implementation gets its own weights: a peer that keeps a tensor sharing a weight's
        # storage (the loop's saved copy, swapped in) would otherwise turn ours to its in-place path.
        params = [nn.Parameter(p.detach().clone()) for p in params0]
        made = {}

        def first_try(make=make, params=params):
            made["unit"], made["failure"] = optimizer_only_unit(make(params), params, grads)

        _, kept = memory_of(first_try, device)  # the optimizer's state and the unit's gradient copies
        unit, failure = made["unit"], made["failure"]
        if failure:
            failures[name] = failure
            continue
        unit.prepare()
        peak, _ = memory_of(unit, device)
        memory[name] = {  # the unit's own gradient copies (param-sized) are not the optimizer's
            "persistent_x_params": (kept - param_bytes) / param_bytes,
            "transient_peak_x_params": peak / param_bytes,
        }
        units[name] = unit
    times = interleaved_medians(units, rounds, warmup, device)
    return {"params": n, "optimizer_only_s": times, "memory": memory, "failures": failures}


def main():
    parser = base_parser(__doc__)
    parser.add_argument("--subjects", default=",".join(SUBJECTS))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--time-budget", type=float, default=None,
                        help="seconds: subjects not started by then are skipped (listed under 'skipped')")
    args = parser.parse_args()
    started = time.perf_counter()
    device = setup(args)
    results = {"machine": machine(device), "settings": vars(args), "subjects": {}}
    rows = []
    for subject in args.subjects.split(","):
        if args.time_budget is not None and time.perf_counter() - started > args.time_budget:
            results.setdefault("skipped", []).append(subject)
            print(f"{subject}: skipped, past the time budget of {args.time_budget:g} s")
            continue
        r = results["subjects"][subject] = measure(subject, device, args.rounds, args.warmup)
        write_json(args.out, f"filter_scaling_{device.type}", results)  # a run cut short keeps this one
        if device.type == "cuda":
            torch.cuda.empty_cache()
        for name in METHODS:
            if name in r["failures"]:
                rows.append([subject, f"{r['params'] / 1e6:.1f}M", name, "FAILED", r["failures"][name], ""])
                continue
            mem = r["memory"].get(name, {})
            rows.append([subject, f"{r['params'] / 1e6:.1f}M", name, r["optimizer_only_s"][name] * 1e3,
                         f"{mem['persistent_x_params']:.2f}" if mem else "n/a",
                         f"{mem['transient_peak_x_params']:.2f}" if mem else "n/a"])
    print_table(f"optimizer-only time and extra memory ({device})",
                ["model", "params", "implementation", "ms", "persistent x params", "transient peak x params"], rows)
    print("\nwrote", write_json(args.out, f"filter_scaling_{device.type}", results))


if __name__ == "__main__":
    main()
