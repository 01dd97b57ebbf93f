"""``make bench``: run every benchmark on the CPU (and CUDA when present), then chart the JSON.
The dispatch counts (``dispatch_count.py``: ops per ZSharp step, device-independent) come first;
the accuracy-against-cost grid (``efficiency.py``: trainings, CPU only) comes last.

    python benchmarks/run_all.py [--out results/bench] [--quick]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def run(script: str, *args: str) -> None:
    cmd = [sys.executable, str(HERE / script), *args]
    print("\n$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def chart(out: Path) -> list[Path]:
    """``bench.png``: one column per (device, model): full-step cost relative to SGD, optimizer-only
    ms and, where measured, memory beyond SGD's. ``filter_scaling.png``: optimizer-only time and
    transient memory against parameter count, failures marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    files = sorted(out.glob("step_cost_*.json"))
    panels = [(f, key, model) for f in files for key, model in json.loads(f.read_text())["models"].items()
              if "sgd" in model["step_s"]]  # runs without the SGD baseline have no ratio to chart
    if panels:
        fig, axes = plt.subplots(3, len(panels), figsize=(4.5 * len(panels), 10), squeeze=False)
        for col, (f, key, model) in enumerate(panels):
            device = json.loads(f.read_text())["machine"]["device"]
            steps, sgd = model["step_s"], model["step_s"]["sgd"]
            ax = axes[0][col]
            ax.bar(list(steps), [t / sgd for t in steps.values()], color="tab:blue")
            ax.axhline(2.0, color="gray", ls="--", lw=1, label="2 passes (SAM floor)")
            ax.set_title(f"{key} ({device}): step / SGD step")
            ax.tick_params(axis="x", rotation=45)
            ax.legend(fontsize=8)
            ax = axes[1][col]
            opt = model["optimizer_only_s"]
            ax.bar(list(opt), [t * 1e3 for t in opt.values()], color="tab:orange")
            ax.set_yscale("log")
            ax.set_title(f"{key} ({device}): optimizer-only ms")
            ax.tick_params(axis="x", rotation=45)
            ax = axes[2][col]
            memory = {m: v for m, v in model.get("memory", {}).items() if "peak_beyond_sgd_x_params" in v}
            if memory:
                names, width = list(memory), 0.4
                xs = range(len(names))
                ax.bar([x - width / 2 for x in xs], [memory[m]["peak_beyond_sgd_x_params"] for m in names],
                       width, label="peak", color="tab:red")
                ax.bar([x + width / 2 for x in xs], [memory[m]["kept_beyond_sgd_x_params"] for m in names],
                       width, label="kept after the step", color="tab:gray")
                ax.set_xticks(list(xs), names, rotation=45)
                ax.legend(fontsize=8)
            ax.set_title(f"{key} ({device}): memory beyond SGD (x params)")
        fig.tight_layout()
        written.append(out / "bench.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)

    scaling = sorted(out.glob("filter_scaling_*.json"))
    if scaling:
        fig, axes = plt.subplots(2, len(scaling), figsize=(6 * len(scaling), 8), squeeze=False)
        for col, f in enumerate(scaling):
            data = json.loads(f.read_text())
            device = data["machine"]["device"]
            subjects = sorted(data["subjects"].items(), key=lambda kv: kv[1]["params"])
            names = sorted({m for _, r in subjects for m in list(r["optimizer_only_s"]) + list(r["failures"])})
            for name in names:
                ok = [(r["params"], r["optimizer_only_s"][name], r["memory"].get(name)) for _, r in subjects
                      if name in r["optimizer_only_s"]]
                failed = [r["params"] for _, r in subjects if name in r["failures"]]
                line = axes[0][col].plot([n for n, _, _ in ok], [t * 1e3 for _, t, _ in ok], "o-", label=name)[0]
                if failed:
                    axes[0][col].plot(failed, [max(t for _, t, _ in ok) * 1e3] * len(failed), "x", ms=12,
                                      color=line.get_color(), label=f"{name}: failed")
                mem = [(n, m["transient_peak_x_params"]) for n, _, m in ok if m]
                if mem:
                    axes[1][col].plot(*zip(*mem), "o-", color=line.get_color(), label=name)
            axes[0][col].set(xscale="log", yscale="log", xlabel="parameters", ylabel="ms",
                             title=f"optimizer-only time ({device})")
            axes[1][col].axhline(0.25, color="gray", ls="--", lw=1, label="target for ZSharp (0.25)")
            axes[1][col].set(xscale="log", xlabel="parameters", ylabel="x param bytes",
                             title=f"transient peak beyond persistent state ({device})")
            for ax in axes[:, col]:
                ax.legend(fontsize=7)
        fig.tight_layout()
        written.append(out / "filter_scaling.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="results/bench")
    parser.add_argument("--quick", action="store_true", help="few rounds, resnet18 only (a smoke run)")
    args = parser.parse_args()
    import torch

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    quick = ["--rounds", "2", "--warmup", "1"] if args.quick else []
    # ops per first_step() + restore() with the sync-free strategy: the same on every device
    run("dispatch_count.py", "--out", args.out, *(["--models", "resnet18"] if args.quick else []))
    for device in devices:
        common = ["--device", device, "--out", args.out]
        if args.quick:
            run("step_cost.py", *common, "--models", "resnet18", *quick)
        elif device == "cpu":  # a ViT step takes seconds on a CPU: fewer rounds there
            run("step_cost.py", *common, "--models", "resnet18")
            run("step_cost.py", *common, "--models", "vit_small_c32", "--rounds", "3", "--warmup", "1")
        else:
            run("step_cost.py", *common)
        if not args.quick:  # ViT-B/16 at 224: the ZSharp / SAM step target (half a minute per pass on a CPU)
            # On the CPU: two model copies, and freed activations handed back to the OS; three copies
            # with memory retained went past 24 GB.
            sized = ["--methods", "sam,zsharp", "--rounds", "2", "--no-memory", "--allocator", "system"] \
                if device == "cpu" else ["--methods", "sgd,sam,zsharp", "--rounds", "10"]
            run("step_cost.py", *common, "--models", "vit_base_224", "--warmup", "1", *sized)
        subjects = ["--subjects", "resnet18"] if args.quick else []
        run("filter_scaling.py", *common, *subjects, *quick)
    # training runs, deterministic per seed on the CPU: the accuracy side needs no GPU
    run("efficiency.py", "--out", args.out, *(["--quick"] if args.quick else []))
    for path in chart(Path(args.out)):
        print("chart:", path)


if __name__ == "__main__":
    main()
