"""Step cost, memory and collectives of SGD, SAM and ZSharp under FSDP2 (``fully_shard``).

    python benchmarks/fsdp_step.py                      # 2 CPU ranks (gloo), MLP of 2.6M parameters
    python benchmarks/fsdp_step.py --model resnet18     # timm resnet18 at 32x32
    python benchmarks/fsdp_step.py --nproc 4 --device cuda   # 4 GPUs (nccl)

Launches itself under ``torchrun --standalone --nproc_per_node N``. Every rank shards its own
copy of the model per method (each Linear, or each resnet stage, and the root ``fully_shard``-ed)
and runs closure-based ``opt.step(closure)`` steps, the methods interleaved round by round
(:func:`common.interleaved_medians`, a barrier before each step); the figure per method is the
slowest rank's median seconds per step. Also per rank: the parameter bytes (global, local
shard), the work buffer's bytes (``opt.engine.placement.buffer.nbytes``) after a step, peak RSS;
and per method the collectives one step issues (calls of ``torch.distributed``'s all_reduce,
all_gather_into_tensor and reduce_scatter_tensor, counted by wrapping them): FSDP's own
all-gathers and reduce-scatters per pass, and the optimizer's all-reduces. Writes
``<out>/fsdp_step_<device>_<model>_n<N>.json`` and prints markdown tables.
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from common import base_parser, interleaved_medians, machine, print_table, setup, write_json  # noqa: E402

METHODS = {
    "sgd": None,
    "sam": dict(cls="SAM"),
    "zsharp": dict(cls="ZSharp"),
    "zsharp_tensor": dict(cls="ZSharp", scope="tensor"),
}
COLLECTIVES = ("all_reduce", "all_gather_into_tensor", "reduce_scatter_tensor")


# --------------------------------------------------------------------------- models (worker)
def build(name: str, device):
    import torch
    from torch import nn

    torch.manual_seed(0)
    if name == "mlp":
        model = nn.Sequential(nn.Linear(512, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(),
                              nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10))
        units = [m for m in model if isinstance(m, nn.Linear)]
        return model.to(device), units, (512,)
    if name == "resnet18":
        import timm

        model = timm.create_model("resnet18", num_classes=10)
        return model.to(device), [model.layer1, model.layer2, model.layer3, model.layer4], (3, 32, 32)
    raise SystemExit(f"unknown model {name!r}: mlp or resnet18")


class Counter:
    """Counts calls of the wrapped torch.distributed collectives while ``active``."""

    def __init__(self):
        import torch.distributed as dist

        self.active = False
        self.counts = dict.fromkeys(COLLECTIVES, 0)
        for name in COLLECTIVES:
            original = getattr(dist, name)

            def wrapped(*args, _name=name, _original=original, **kwargs):
                if self.active:
                    self.counts[_name] += 1
                return _original(*args, **kwargs)

            setattr(dist, name, wrapped)

    def measure(self, fn) -> dict[str, int]:
        self.counts = dict.fromkeys(COLLECTIVES, 0)
        self.active = True
        try:
            fn()
        finally:
            self.active = False
        return dict(self.counts)


def worker(args) -> None:
    import torch
    import torch.distributed as dist
    from torch import nn
    from torch.distributed.fsdp import fully_shard

    import zsharp_algos

    device = setup(args)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    counter = Counter()
    methods = [m for m in args.methods.split(",") if m]
    gen = torch.Generator().manual_seed(100 + rank)
    shape = None
    runs = {}
    for name in methods:
        model, units, shape = build(args.model, device)
        for unit in units:
            fully_shard(unit)
        fully_shard(model)
        sgd = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        spec = METHODS[name]
        if spec is None:
            opt = sgd
        else:
            spec = dict(spec)
            opt = getattr(zsharp_algos, spec.pop("cls"))(sgd, rho=0.05, model=model, **spec)
        runs[name] = (model, opt)
    x = torch.randn(args.batch, *shape, generator=gen).to(device)
    y = torch.randint(0, 10, (args.batch,), generator=gen).to(device)

    def make_unit(model, opt):
        def closure():
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            return loss

        def unit():
            opt.step(closure)
            return 1

        unit.prepare = dist.barrier
        return unit

    units = {name: make_unit(*runs[name]) for name in methods}
    medians = interleaved_medians(units, args.steps, args.warmup, device)
    collectives = {name: counter.measure(units[name]) for name in methods}  # one more step each, untimed
    report = {"rank": rank, "world": world, "median_s": medians, "collectives": collectives, "memory": {}}
    for name in methods:
        model, opt = runs[name]
        params = list(model.parameters())
        report["memory"][name] = {
            "global_param_bytes": sum(p.numel() * p.element_size() for p in params),
            "local_param_bytes": sum(p.to_local().numel() * p.element_size() for p in params),
            "buffer_bytes": opt.engine.placement.buffer.nbytes if hasattr(opt, "engine") else 0,
            "dtensor_params": all(hasattr(p, "to_local") for p in params),
        }
    report["max_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    report["machine"] = machine(device)
    with open(os.path.join(args.worker_out, f"rank{rank}.json"), "w") as f:
        json.dump(report, f)
    dist.barrier()
    dist.destroy_process_group()


# --------------------------------------------------------------------------- launcher
def _env() -> dict:
    # launcher variables from an enclosing distributed run would confuse torchrun's children
    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK")
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("TORCHELASTIC")}
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def launch(args, argv: list[str]) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
               str(Path(__file__).resolve()), *argv, "--worker-out", tmp]
        start = time.perf_counter()
        proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=args.timeout)
        if proc.returncode != 0:
            sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
            raise SystemExit(f"torchrun failed with exit code {proc.returncode}")
        print(f"ranks ran {time.perf_counter() - start:.1f} s")
        return [json.loads((Path(tmp) / f"rank{r}.json").read_text()) for r in range(args.nproc)]


def mib(n: float) -> str:
    return f"{n / 2**20:.2f}"


def main() -> None:
    parser = base_parser(__doc__.split("\n")[0])
    parser.add_argument("--nproc", type=int, default=2, help="ranks (processes) torchrun starts")
    parser.add_argument("--model", default="mlp", help="mlp (2.6M parameters) or resnet18 (timm, 32x32 input)")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, of {', '.join(METHODS)}")
    parser.add_argument("--batch", type=int, default=64, help="per rank")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per method")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per method first")
    parser.add_argument("--timeout", type=float, default=900, help="seconds for the torchrun launch")
    parser.add_argument("--worker-out", default=None, help=argparse_hidden())
    args = parser.parse_args()
    if args.threads is None and args.device == "cpu":
        args.threads = max(1, (os.cpu_count() or 1) // args.nproc)  # ranks share the cores
    if args.worker_out is not None:
        return worker(args)
    argv = [a for a in sys.argv[1:]]
    if "--threads" not in argv:
        argv += ["--threads", str(args.threads)] if args.threads else []
    ranks = launch(args, argv)
    methods = list(ranks[0]["median_s"])
    slowest = {m: max(r["median_s"][m] for r in ranks) for m in methods}
    ratios = {}
    for num, den in (("sam", "sgd"), ("zsharp", "sgd"), ("zsharp_tensor", "sgd"), ("zsharp", "sam"),
                     ("zsharp_tensor", "sam")):
        if num in slowest and den in slowest:
            ratios[f"{num}/{den}"] = slowest[num] / slowest[den]
    results = {
        "benchmark": "fsdp_step",
        "command": "python benchmarks/fsdp_step.py " + " ".join(sys.argv[1:]),
        "model": args.model, "nproc": args.nproc, "batch_per_rank": args.batch,
        "steps": args.steps, "warmup": args.warmup, "threads_per_rank": args.threads,
        "machine": ranks[0]["machine"],
        "median_s_slowest_rank": slowest, "ratios": ratios,
        "ranks": ranks,
    }
    print_table(
        f"FSDP2 step, {args.model}, {args.nproc} ranks, batch {args.batch}/rank, median of {args.steps} "
        f"steps (slowest rank)",
        ["method", "ms / step", "x SGD", "x SAM", "all_reduce", "all_gather", "reduce_scatter"],
        [[m, slowest[m] * 1e3, slowest[m] / slowest["sgd"] if "sgd" in slowest else "-",
          slowest[m] / slowest["sam"] if "sam" in slowest else "-",
          *(ranks[0]["collectives"][m][c] for c in COLLECTIVES)] for m in methods],
    )
    mem_rows = []
    for m in methods:
        for r in ranks:
            mm = r["memory"][m]
            mem_rows.append([m, r["rank"], mib(mm["global_param_bytes"]), mib(mm["local_param_bytes"]),
                             mib(mm["buffer_bytes"]), f"{mm['buffer_bytes'] / mm['local_param_bytes']:.2f}"])
    print_table("Memory per rank (MiB; buffer: opt.engine.placement.buffer.nbytes after the steps)",
                ["method", "rank", "params (global)", "params (local shard)", "work buffer", "buffer / local"],
                mem_rows)
    print("peak RSS per rank (MiB, all methods' models in one process):",
          ", ".join(mib(r["max_rss_bytes"]) for r in ranks))
    device = args.device.split(":")[0]
    print("\nwrote", write_json(args.out, f"fsdp_step_{device}_{args.model}_n{args.nproc}", results))


def argparse_hidden():
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
