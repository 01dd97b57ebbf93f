#!/usr/bin/env python
"""Measure SGD, the single-pass callbacks and two-pass SAM / ZSharp with the HF Trainer.

Runs ``train_digits_classes.py`` (beside this file) once per variant and seed, each in its own
process, and prints final test accuracy and training time (mean ± std over seeds)::

    python integrations/hf/compare_variants.py --seeds 3 --jobs 4 --out results/hf_variants
    python integrations/hf/compare_variants.py --seeds 1 -- --num_train_epochs 2   # extra args pass through

Every variant uses the same settings (ResNet-18, digits with 40% label noise, SGD momentum 0.9,
cosine learning rate 0.05, 15 epochs, batch 64, rho 0.1), the same initial weights and data order
per seed; only the optimizer differs.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
VARIANTS = {
    "sgd": ["--optim", "sgd"],
    "sam callback (1 pass)": ["--optim", "sgd", "--sharpness_callback", "sam"],
    "zsharp callback (1 pass)": ["--optim", "sgd", "--sharpness_callback", "zsharp"],
    "sam two-pass": ["--optim", "sam", "--base_optim", "sgd"],
    "zsharp two-pass": ["--optim", "zsharp", "--base_optim", "sgd"],
}
COMMON = [
    "--model", "resnet18", "--label_noise", "0.4", "--optim_args", "momentum=0.9", "--learning_rate", "0.05",
    "--weight_decay", "5e-4", "--lr_scheduler_type", "cosine", "--num_train_epochs", "15",
    "--per_device_train_batch_size", "64", "--per_device_eval_batch_size", "256", "--rho", "0.1",
    "--eval_strategy", "no", "--save_strategy", "no", "--report_to", "none", "--logging_strategy", "epoch",
    "--disable_tqdm", "true",
]


def run(name: str, seed: int, out: Path, extra: list[str]) -> dict:
    folder = out / f"{name.split()[0]}-{'callback' if 'callback' in name else 'plain'}-seed{seed}"
    cmd = [sys.executable, str(HERE / "train_digits_classes.py"), *COMMON, *VARIANTS[name],
           "--seed", str(seed), "--output_dir", str(folder), *extra]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{name} seed {seed} failed:\n{done.stderr[-3000:]}")
    results = json.loads((folder / "all_results.json").read_text())
    return {"variant": name, "seed": seed, "accuracy": results["eval_accuracy"], "loss": results["eval_loss"],
            "seconds": results["train_runtime"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--jobs", type=int, default=1, help="runs at a time (timings are only comparable with 1)")
    p.add_argument("--out", default="results/hf_variants")
    p.add_argument("extra", nargs="*", help="after --: more arguments for every run")
    args = p.parse_args()
    out = Path(args.out)
    jobs = [(name, seed) for seed in range(args.seeds) for name in VARIANTS]
    with ThreadPoolExecutor(args.jobs) as pool:
        rows = list(pool.map(lambda job: run(*job, out, args.extra), jobs))
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(rows, indent=2))
    sgd_time = statistics.mean(r["seconds"] for r in rows if r["variant"] == "sgd")
    print(f"{'variant':26s} {'test accuracy':>16s} {'test loss':>16s} {'train time':>12s}")
    for name in VARIANTS:
        mine = [r for r in rows if r["variant"] == name]
        stats = []
        for key in ("accuracy", "loss"):
            values = [r[key] for r in mine]
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            stats.append(f"{statistics.mean(values):.4f} ± {spread:.4f}")
        ratio = statistics.mean(r["seconds"] for r in mine) / sgd_time
        print(f"{name:26s} {stats[0]:>16s} {stats[1]:>16s} {ratio:>11.2f}x")


if __name__ == "__main__":
    main()
