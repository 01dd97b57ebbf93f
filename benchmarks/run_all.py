"""``make bench``: run every benchmark on the CPU (and CUDA when present), then chart the JSON.

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


def chart(out: Path) -> Path | None:
    """One panel per (device, model): full-step cost relative to SGD, and optimizer-only ms."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = sorted(out.glob("step_cost_*.json"))
    panels = [(f, key, model) for f in files for key, model in json.loads(f.read_text())["models"].items()
              if "sgd" in model["step_s"]]  # runs without the SGD baseline have no ratio to chart
    if not panels:
        return None
    fig, axes = plt.subplots(2, len(panels), figsize=(4.5 * len(panels), 7), squeeze=False)
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
    fig.tight_layout()
    path = out / "bench.png"
    fig.savefig(path, dpi=110)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="results/bench")
    parser.add_argument("--quick", action="store_true", help="few rounds, resnet18 only (a smoke run)")
    args = parser.parse_args()
    import torch

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    rounds = ["--rounds", "2", "--warmup", "1"] if args.quick else []
    for device in devices:
        models = ["--models", "resnet18"] if args.quick else []
        run("step_cost.py", "--device", device, "--out", args.out, *models, *rounds)
        if not args.quick:  # ViT-B/16 at 224: the ZSharp / SAM step target (minutes per step on a CPU)
            run("step_cost.py", "--device", device, "--out", args.out, "--models", "vit_base_224",
                "--methods", "sam,zsharp", "--rounds", "2" if device == "cpu" else "10", "--warmup", "1")
        subjects = ["--subjects", "resnet18"] if args.quick else []
        run("filter_scaling.py", "--device", device, "--out", args.out, *subjects, *rounds)
    path = chart(Path(args.out))
    print("\nchart:", path)


if __name__ == "__main__":
    main()
