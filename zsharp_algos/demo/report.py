"""Summaries of a comparison run: the results table, ``results.json`` and ``curves.png``.

A *run* is one optimizer trained with one seed, recorded as a dict (see
:func:`zsharp_algos.demo.compare.train_run`) with at least ``optimizer``, ``seed``, ``epochs`` (a list
of per-epoch dicts with ``train_loss``, ``test_loss``, ``test_acc``), ``wall_time_s`` and
``step_time_s``.
"""
from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from .. import __version__
from .._optional import require

__all__ = ["summarize", "format_table", "environment", "write_json", "require_plotting", "plot_curves"]

BASELINE = "sgd"  # time/step ratios are relative to this optimizer


def _mean_std(values) -> tuple[Any, Any]:
    """Mean and sample standard deviation over the first axis (std 0 for a single entry)."""
    a = np.asarray(values, dtype=np.float64)
    return a.mean(axis=0), a.std(axis=0, ddof=1) if len(a) > 1 else np.zeros_like(a[0])


def summarize(runs: Sequence[dict[str, Any]], optimizers: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Per optimizer, over seeds: final test accuracy and loss, wall time (mean and std), mean
    time per training step and its ratio to :data:`BASELINE`'s (``None`` if that was not run)."""
    summary: dict[str, dict[str, Any]] = {}
    for name in optimizers:
        mine = [r for r in runs if r["optimizer"] == name]
        entry: dict[str, Any] = {"seeds": len(mine)}
        for key, values in (
            ("test_acc", [r["epochs"][-1]["test_acc"] for r in mine]),
            ("test_loss", [r["epochs"][-1]["test_loss"] for r in mine]),
            ("wall_time_s", [r["wall_time_s"] for r in mine]),
            ("step_time_s", [r["step_time_s"] for r in mine]),
        ):
            mean, std = _mean_std(values)
            entry[f"{key}_mean"], entry[f"{key}_std"] = float(mean), float(std)
        summary[name] = entry
    base = summary.get(BASELINE)
    for entry in summary.values():
        entry["step_time_ratio"] = entry["step_time_s_mean"] / base["step_time_s_mean"] if base else None
    return summary


def format_table(summary: dict[str, dict[str, Any]]) -> str:
    """The summary as a fixed-width text table (mean ± std over seeds)."""
    header = ("optimizer", "test acc (%)", "test loss", "wall time (s)", f"time/step vs {BASELINE}")
    rows = [header]
    for name, s in summary.items():
        ratio = s["step_time_ratio"]
        rows.append((
            name,
            f"{100 * s['test_acc_mean']:.2f} ± {100 * s['test_acc_std']:.2f}",
            f"{s['test_loss_mean']:.3f} ± {s['test_loss_std']:.3f}",
            f"{s['wall_time_s_mean']:.1f} ± {s['wall_time_s_std']:.1f}",
            f"{ratio:.2f}x" if ratio is not None else "n/a",
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def environment(device: torch.device) -> dict[str, Any]:
    """Library versions and a description of the machine, for the record."""
    versions = {"python": platform.python_version(), "torch": torch.__version__, "zsharp_algos": __version__}
    for module in ("timm", "numpy", "sklearn", "matplotlib", "tqdm"):
        mod = sys.modules.get(module)
        if mod is not None:
            versions[module] = getattr(mod, "__version__", "unknown")
    machine = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
    }
    if device.type == "cuda":
        machine["device_name"] = torch.cuda.get_device_name(device)
    return {"versions": versions, "machine": machine}


def write_json(path: str | Path, payload: dict[str, Any]) -> None:
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)
        f.write("\n")


def require_plotting() -> None:
    """Raise the ``demo``-extra :class:`ImportError` now if matplotlib is missing."""
    require("matplotlib", "demo", "the curves plot")


def plot_curves(runs: Sequence[dict[str, Any]], optimizers: Sequence[str], path: str | Path, title: str = "") -> None:
    """Train loss and test accuracy per epoch, per optimizer: mean over seeds with a ± std band.
    Rendered with matplotlib's Agg canvas directly (no pyplot, no global backend change)."""
    require_plotting()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4), layout="constrained")
    FigureCanvasAgg(fig)
    panels = (("train_loss", "train loss (noisy labels)", 1.0), ("test_acc", "test accuracy (%)", 100.0))
    axes = fig.subplots(1, len(panels))
    for ax, (key, label, scale) in zip(axes, panels):
        for name in optimizers:
            curves = np.array([[e[key] * scale for e in r["epochs"]] for r in runs if r["optimizer"] == name])
            epochs = np.arange(1, curves.shape[1] + 1)
            mean, std = _mean_std(curves)
            (line,) = ax.plot(epochs, mean, label=name, marker="o", markersize=3)
            ax.fill_between(epochs, mean - std, mean + std, color=line.get_color(), alpha=0.2, linewidth=0)
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.savefig(path, dpi=120)
