#!/usr/bin/env python
"""Measure SGD, the single-pass callbacks and two-pass SAM / ZSharp with the HF Trainer.

Runs ``train_digits_classes.py`` (beside this file) once per variant and seed, each in its own
process, prints a line as each run starts, after each of its epochs and when it ends, and then
the final test accuracy and training time (mean ± std over seeds)::

    python integrations/hf/compare_variants.py --seeds 3 --jobs 4 --out results/hf_variants
    python integrations/hf/compare_variants.py --seeds 1 -- --num_train_epochs 2   # extra args pass through
    python integrations/hf/compare_variants.py --variants sgd,zsharp --seeds 1      # a subset

Every variant uses the same settings (ResNet-18, digits with 40% label noise, SGD momentum 0.9,
cosine learning rate 0.05, 15 epochs, batch 64, rho 0.1), the same initial weights and data order
per seed; only the optimizer differs.
"""
from __future__ import annotations

import argparse
import ast
import json
import statistics
import subprocess
import sys
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from zsharp_algos.options import DefaultsHelpFormatter

HERE = Path(__file__).resolve().parent
VARIANTS = {  # --variants key: (label in the table, the arguments that make the variant)
    "sgd": ("sgd", ["--optim", "sgd"]),
    "sam-callback": ("sam callback (1 pass)", ["--optim", "sgd", "--sharpness_callback", "sam"]),
    "zsharp-callback": ("zsharp callback (1 pass)", ["--optim", "sgd", "--sharpness_callback", "zsharp"]),
    "sam": ("sam two-pass", ["--optim", "sam", "--base_optim", "sgd"]),
    "zsharp": ("zsharp two-pass", ["--optim", "zsharp", "--base_optim", "sgd"]),
}
COMMON = [
    "--model", "resnet18", "--label_noise", "0.4", "--optim_args", "momentum=0.9", "--learning_rate", "0.05",
    "--weight_decay", "5e-4", "--lr_scheduler_type", "cosine", "--num_train_epochs", "15",
    "--per_device_train_batch_size", "64", "--per_device_eval_batch_size", "256", "--rho", "0.1",
    "--eval_strategy", "no", "--save_strategy", "no", "--report_to", "none", "--logging_strategy", "epoch",
    "--disable_tqdm", "true",
]


_PRINT = threading.Lock()


def say(text: str) -> None:
    with _PRINT:
        print(text, flush=True)


def epoch_line(line: str) -> str | None:
    """``epoch 3.0 loss 1.234`` from a training log line the Trainer prints (a dict), else None."""
    line = line.strip()
    if not (line.startswith("{") and "'loss'" in line and "'epoch'" in line):
        return None
    try:
        logs = ast.literal_eval(line)
    except (ValueError, SyntaxError):
        return None
    return f"epoch {float(logs['epoch']):g} loss {float(logs['loss']):.4f}"


def run(key: str, seed: int, out: Path, extra: list[str], tag: str) -> dict:
    name, variant_args = VARIANTS[key]
    folder = out / f"{key}-seed{seed}"
    cmd = [sys.executable, str(HERE / "train_digits_classes.py"), *COMMON, *variant_args,
           "--seed", str(seed), "--output_dir", str(folder), *extra]
    label = f"{tag} {name}, seed {seed}"
    say(f"{label}: started")
    start = time.perf_counter()
    tail: deque[str] = deque(maxlen=60)  # the end of the output, for the error message
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1) as child:
        for line in child.stdout:
            tail.append(line)
            progress = epoch_line(line)
            if progress is not None:
                say(f"{label}: {progress} ({time.perf_counter() - start:.0f} s)")
    if child.returncode:
        raise RuntimeError(f"{name} seed {seed} failed:\n{''.join(tail)[-3000:]}")
    results = json.loads((folder / "all_results.json").read_text())
    say(f"{label}: done in {time.perf_counter() - start:.0f} s, test accuracy {results['eval_accuracy']:.4f}")
    return {"variant": key, "seed": seed, "accuracy": results["eval_accuracy"], "loss": results["eval_loss"],
            "seconds": results["train_runtime"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=DefaultsHelpFormatter)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help=f"comma-separated subset of {','.join(VARIANTS)} (the first is the time reference)")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time (timings are only comparable with 1)")
    p.add_argument("--out", default="results/hf_variants")
    p.add_argument("extra", nargs="*", help="after --: more arguments for every run")
    args = p.parse_args()
    out = Path(args.out)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        p.error(f"--variants takes a comma-separated subset of {','.join(VARIANTS)}, got {args.variants!r}")
    jobs = [(key, seed) for seed in range(args.seeds) for key in variants]
    tags = [f"[{i + 1}/{len(jobs)}]" for i in range(len(jobs))]
    with ThreadPoolExecutor(args.jobs) as pool:
        rows = list(pool.map(lambda job, tag: run(*job, out, args.extra, tag), jobs, tags))
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(rows, indent=2))
    reference = statistics.mean(r["seconds"] for r in rows if r["variant"] == variants[0])
    print(f"{'variant':26s} {'test accuracy':>16s} {'test loss':>16s} {'time vs ' + VARIANTS[variants[0]][0]:>16s}")
    for key in variants:
        mine = [r for r in rows if r["variant"] == key]
        stats = []
        for metric in ("accuracy", "loss"):
            values = [r[metric] for r in mine]
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            stats.append(f"{statistics.mean(values):.4f} ± {spread:.4f}")
        ratio = statistics.mean(r["seconds"] for r in mine) / reference
        print(f"{VARIANTS[key][0]:26s} {stats[0]:>16s} {stats[1]:>16s} {ratio:>15.2f}x")


if __name__ == "__main__":
    main()
