"""Full-step cost of SGD, SAM and ZSharp (scopes, intervals), and the optimizer-only part of ours
against the peers, on timm resnet18 and a small ViT at CIFAR size (batch 64); ViT-B/16 at 224
on request (its ZSharp / SAM step target).

    python benchmarks/step_cost.py --device cpu --threads 2
    python benchmarks/step_cost.py --models vit_base_224 --methods sam,zsharp --rounds 2 --warmup 1 --no-memory --allocator system

(ViT-B/16 at batch 64 on a 24 GB CPU machine: each method trains its own model copy, and three
copies with freed memory retained ran out of memory; two copies with the C library's allocator fit.)

On a GPU, several models and batch sizes in one process (``MODEL@BATCH`` overrides ``--batch``;
each entry is keyed as written, and the JSON is rewritten after each one, so a run cut short
keeps what it finished)::

    python benchmarks/step_cost.py --device cuda --models resnet18@128,resnet50@128,vit_small_c32@256 \\
        --methods sgd,sam,zsharp,zsharp_tensor,zsharp_k2,zsharp_k5 --name step_cost_cuda_gpu_check --time-budget 100

Memory on CUDA is the caching allocator's (``torch.cuda.max_memory_allocated`` after
``reset_peak_memory_stats``), in ``memory`` (x parameter bytes, and bytes).
"""
from __future__ import annotations

import copy
import time

import torch
from torch import nn

from common import base_parser, interleaved_medians, machine, memory_of, print_table, setup, write_json
from peers import ComposerSAM, LoopSAM, Ours, QuantileZSharp, optimizer_only_unit

from zsharp_algos import GCSAM, GSAM, SAM, FriendlySAM, ZSharp

MODELS = {  # timm kwargs; "input": image side
    "resnet18": dict(name="resnet18", input=32),
    "resnet50": dict(name="resnet50", input=32),
    "resnet50_224": dict(name="resnet50", input=224),
    "vit_small_c32": dict(name="vit_small_patch16_224", img_size=32, patch_size=4, input=32),
    "vit_base_224": dict(name="vit_base_patch16_224", input=224),
}
DEFAULT_MODELS = "resnet18,vit_small_c32"
STEP_METHODS = {
    "sgd": None,
    "sam": dict(cls=SAM),
    "zsharp": dict(cls=ZSharp),
    "zsharp_tensor": dict(cls=ZSharp, scope="tensor"),
    "zsharp_k2": dict(cls=ZSharp, interval=2),
    "zsharp_k5": dict(cls=ZSharp, interval=5),
    "zsharp_k10": dict(cls=ZSharp, interval=10),
    "friendlysam": dict(cls=FriendlySAM),
    "gsam": dict(cls=GSAM),
    "gcsam": dict(cls=GCSAM),
    **{f"zsharp_looksam_k{k}": dict(cls=ZSharp, interval=k, reuse="looksam") for k in (2, 5, 10)},
    # random intervals: a unit of 4 intervals' steps; the share of sharpness steps actually
    # timed is recorded next to the time
    **{f"zsharp_random_k{k}": dict(cls=ZSharp, interval=k, interval_mode="random", cycles=4) for k in (2, 5, 10)},
}
#: What runs without --methods: the cheaper-sharpness rows are a run of their own (--methods efficient).
DEFAULT_METHODS = [m for m in STEP_METHODS if "looksam" not in m and "random" not in m]
EFFICIENT_METHODS = ["sgd", "zsharp"] + [m for m in STEP_METHODS if "looksam" in m or "random" in m]


def build(spec, device):
    import timm

    spec = dict(spec)
    spec.pop("input")
    torch.manual_seed(0)
    return timm.create_model(spec.pop("name"), num_classes=10, **spec).to(device)


def step_units(base_model, side, device, methods, batch):
    """One timed unit per method: a whole interval cycle of ``opt.step(closure)`` (so its mean
    per step is the cost), on its own copy of the model. Each unit counts its steps and
    forward/backward passes in ``unit.counts``."""
    x = torch.randn(batch, 3, side, side, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    units = {}
    for name in methods:
        spec = STEP_METHODS[name]
        model = copy.deepcopy(base_model)
        sgd = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        if spec is None:
            opt, k = sgd, 1
        else:
            spec = dict(spec)
            cycles = spec.pop("cycles", 1)
            opt = spec.pop("cls")(sgd, rho=0.05, model=model, **spec)
            k = spec.get("interval", 1) * cycles  # whole cycles: k - 1 plain steps and a sharpness step each
        counts = {"steps": 0, "passes": 0}

        def closure(model=model, opt=opt, counts=counts):
            counts["passes"] += 1
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            return loss

        def unit(opt=opt, closure=closure, k=k, counts=counts):
            for _ in range(k):
                opt.step(closure)
            counts["steps"] += k
            return k

        unit.counts = counts
        units[name] = unit
    return units


def step_memory(units, device, param_bytes):
    """Tensor memory of each method's first two cycles (the first allocates its state), from a
    model with no gradients yet: the peak, and what stays allocated after (gradients, momentum,
    persistent buffers), in parameter bytes and, where SGD ran, beyond SGD's."""
    measured = {name: memory_of(lambda unit=unit: (unit(), unit()), device) for name, unit in units.items()}
    out = {}
    for name, (peak, kept) in measured.items():
        out[name] = {"peak_x_params": peak / param_bytes, "kept_x_params": kept / param_bytes,
                     "peak_bytes": peak, "kept_bytes": kept}
        if "sgd" in measured:
            out[name]["peak_beyond_sgd_x_params"] = (peak - measured["sgd"][0]) / param_bytes
            out[name]["kept_beyond_sgd_x_params"] = (kept - measured["sgd"][1]) / param_bytes
    return out


def optimizer_only(base_model, device, methods, rounds, warmup):
    params0 = [p.detach().clone() for p in base_model.parameters()]
    grads = [torch.randn_like(p) for p in params0]
    makers = {
        "ours_sam": lambda ps, base: Ours(SAM(base, rho=0.05)),
        "loop_sam": lambda ps, base: LoopSAM(ps, base),
        "composer_sam": lambda ps, base: ComposerSAM(ps, base),
        "ours_zsharp": lambda ps, base: Ours(ZSharp(base, rho=0.05)),
        "quantile_zsharp": lambda ps, base: QuantileZSharp(ps, base),
        "ours_zsharp_tensor": lambda ps, base: Ours(ZSharp(base, rho=0.05, scope="tensor")),
        # the variants, against our SAM: what each adds to the optimizer's work
        "ours_friendlysam": lambda ps, base: Ours(FriendlySAM(base, rho=0.05)),
        "ours_gsam": lambda ps, base: Ours(GSAM(base, rho=0.05)),
        "ours_gcsam": lambda ps, base: Ours(GCSAM(base, rho=0.05)),
    }
    units, failures = {}, {}
    for name, make in makers.items():
        if name.split("_", 1)[1] not in methods:  # e.g. ours_zsharp is measured with zsharp
            continue
        ps = [nn.Parameter(p.clone()) for p in params0]
        try:
            impl = make(ps, torch.optim.SGD(ps, lr=1e-3, momentum=0.9))
        except ImportError as err:
            failures[name] = f"not installed: {err}"
            continue

        unit, failure = optimizer_only_unit(impl, ps, grads)
        if failure:
            failures[name] = failure
            continue
        units[name] = unit
    return interleaved_medians(units, rounds, warmup, device), failures


def parse_entries(text: str, default_batch: int) -> list[tuple[str, str, int]]:
    """``"resnet18,resnet50@128"`` -> ``[(key, model, batch)]``: the key is the entry as written."""
    entries = []
    for item in text.split(","):
        model, _, batch = item.partition("@")
        entries.append((item, model, int(batch) if batch else default_batch))
    return entries


def main():
    parser = base_parser(__doc__)
    parser.add_argument("--models", default=DEFAULT_MODELS,
                        help=f"comma-separated MODEL or MODEL@BATCH, of {', '.join(MODELS)}")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                        help=f"comma-separated full-step methods of {', '.join(STEP_METHODS)}; or 'efficient': "
                        f"{', '.join(EFFICIENT_METHODS)}")
    parser.add_argument("--batch", type=int, default=64, help="batch size of entries without @BATCH")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--no-memory", dest="memory", action="store_false",
                        help="skip the memory measurement (two untimed cycles per method, op by op on the CPU)")
    parser.add_argument("--name", default=None,
                        help="JSON file name without .json (default: step_cost_DEVICE[_MODELS])")
    parser.add_argument("--time-budget", type=float, default=None,
                        help="seconds: entries not started by then are skipped (listed under 'skipped')")
    args = parser.parse_args()
    started = time.perf_counter()
    device = setup(args)
    results = {"machine": machine(device), "settings": vars(args), "models": {}}
    methods = EFFICIENT_METHODS if args.methods == "efficient" else args.methods.split(",")
    entries = parse_entries(args.models, args.batch)
    unknown = set(methods) - set(STEP_METHODS) or {m for _, m, _ in entries} - set(MODELS)
    if unknown:
        parser.error(f"unknown method or model: {', '.join(sorted(unknown))}")
    suffix = "" if args.models == DEFAULT_MODELS else "_" + args.models.replace(",", "_").replace("@", "_b")
    name = args.name or f"step_cost_{device.type}{suffix}"
    opt_only_of: dict[str, tuple[dict, dict]] = {}  # per model: the optimizer-only part does not depend on the batch
    for key, model_name, batch in entries:
        if args.time_budget is not None and time.perf_counter() - started > args.time_budget:
            results.setdefault("skipped", []).append(key)
            print(f"\n{key}: skipped, past the time budget of {args.time_budget:g} s")
            continue
        model = build(MODELS[model_name], device)
        n_params = sum(p.numel() for p in model.parameters())
        param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        units = step_units(model, MODELS[model_name]["input"], device, methods, batch)
        memory = step_memory(units, device, param_bytes) if args.memory else {}
        faults: dict[str, float] = {}
        steps = interleaved_medians(units, args.rounds, args.warmup, device, faults)
        passes = {m: u.counts["passes"] / max(1, u.counts["steps"]) for m, u in units.items()}
        del units
        if model_name not in opt_only_of:
            opt_only_of[model_name] = optimizer_only(model, device, methods, args.rounds, args.warmup)
        opt_only, failures = opt_only_of[model_name]
        results["models"][key] = {"model": model_name, "batch": batch, "input": MODELS[model_name]["input"],
                                  "params": n_params, "step_s": steps, "passes_per_step": passes,
                                  "minor_faults_per_step": faults,
                                  "memory": memory, "optimizer_only_s": opt_only, "failures": failures}
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the next entry's models start from a clean cache
        base = {m: steps[m] for m in ("sgd", "sam") if m in steps}
        # memory columns: beyond SGD's where SGD ran, else absolute
        mem_keys = [f"{what}_{'beyond_sgd_' if 'sgd' in methods else ''}x_params" for what in ("peak", "kept")]
        mem_cols = [k.replace("_", " ") for k in mem_keys] if memory else []
        rows = [[m, t * 1e3] + [t / b for b in base.values()] + [round(faults[m])]
                + ([f"{memory[m][k]:.2f}" for k in mem_keys] if memory else [])
                for m, t in steps.items()]
        print_table(f"{key} ({n_params / 1e6:.1f}M params, batch {batch}, {device}): full step; "
                    f"allocator: {results['machine']['allocator']}",
                    ["method", "ms/step"] + [f"x {m.upper()}" for m in base] + ["page faults/step"] + mem_cols, rows)
        for k in (2, 5, 10):
            if f"zsharp_k{k}" in steps and "sgd" in steps:
                print(f"  interval {k}: {steps[f'zsharp_k{k}'] / steps['sgd']:.3f} x SGD (1 + 1/k = {1 + 1 / k:.3f})")
        if "sgd" in steps and "zsharp" in steps:  # the cheaper modes against 1 + (ZSharp/SGD - 1) * share
            extra = steps["zsharp"] / steps["sgd"] - 1
            for m in [m for m in steps if "looksam" in m or "random" in m]:
                share = passes[m] - 1  # sharpness steps per step, as timed
                print(f"  {m}: {steps[m] / steps['sgd']:.3f} x SGD, {passes[m]:.3f} passes a step; "
                      f"1 + (ZSharp/SGD - 1) x {share:.3f} = {1 + extra * share:.3f}")
        print_table(f"{key}: optimizer-only (first + second step, base SGD included)", ["implementation", "ms"],
                    [[m, t * 1e3] for m, t in opt_only.items()] + [[m, f"FAILED ({e})"] for m, e in failures.items()])
        write_json(args.out, name, results)  # after every entry: a run cut short keeps the finished ones
    print("\nwrote", write_json(args.out, name, results))


if __name__ == "__main__":
    main()
