"""Summaries of a comparison run: the results table, ``results.json`` and ``curves.png``.

A *run* is one optimizer trained with one seed, recorded as a dict (see
:func:`zsharp_algos.demo.compare.train_run`) with at least ``optimizer``, ``seed``, ``epochs`` (a list
of per-epoch dicts with ``train_loss``, ``test_loss``, ``test_acc``), ``wall_time_s`` and
``step_time_s`` (and, from runs recorded since they were added, ``step_cpu_time_s`` and
``load_average``).
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

__all__ = ["summarize", "format_table", "load_average", "load_note", "title", "caption", "environment", "write_json",
           "require_plotting", "plot_curves"]

BASELINE = "sgd"  # time/step ratios are relative to this optimizer


def _mean_std(values) -> tuple[Any, Any]:
    """Mean and sample standard deviation over the first axis (std 0 for a single entry)."""
    a = np.asarray(values, dtype=np.float64)
    return a.mean(axis=0), a.std(axis=0, ddof=1) if len(a) > 1 else np.zeros_like(a[0])


def summarize(runs: Sequence[dict[str, Any]], optimizers: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Per optimizer, over seeds: final test accuracy and loss, wall time (mean and std), mean
    wall and CPU time per training step and their ratios to :data:`BASELINE`'s (``None`` if that
    was not run, or the runs have no CPU time)."""
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
        cpu = [r.get("step_cpu_time_s") for r in mine]
        entry["step_cpu_time_s_mean"] = float(np.mean(cpu)) if None not in cpu else None
        summary[name] = entry
    base = summary.get(BASELINE)
    for entry in summary.values():
        entry["step_time_ratio"] = entry["step_time_s_mean"] / base["step_time_s_mean"] if base else None
        cpu, base_cpu = entry["step_cpu_time_s_mean"], base["step_cpu_time_s_mean"] if base else None
        entry["step_cpu_time_ratio"] = cpu / base_cpu if cpu is not None and base_cpu else None
    return summary


def _ratio(value: float | None) -> str:
    return f"{value:.2f}x" if value is not None else "n/a"


def format_table(summary: dict[str, dict[str, Any]], cpu_time: bool = False) -> str:
    """The summary as a fixed-width text table (mean ± std over seeds); ``cpu_time`` adds the
    ratio of the process's CPU time per step (meaningful on the CPU only)."""
    header = ("optimizer", "test acc (%)", "test loss", "wall time (s)", f"time/step vs {BASELINE}")
    if cpu_time:
        header += (f"CPU time/step vs {BASELINE}",)
    rows = [header]
    for name, s in summary.items():
        row = (
            name,
            f"{100 * s['test_acc_mean']:.2f} ± {100 * s['test_acc_std']:.2f}",
            f"{s['test_loss_mean']:.3f} ± {s['test_loss_std']:.3f}",
            f"{s['wall_time_s_mean']:.1f} ± {s['wall_time_s_std']:.1f}",
            _ratio(s["step_time_ratio"]),
        )
        rows.append(row + ((_ratio(s.get("step_cpu_time_ratio")),) if cpu_time else ()))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def load_average() -> float | None:
    """The machine's 1-minute load average, or None where the OS does not report one."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):  # Windows
        return None


def load_note(runs: Sequence[dict[str, Any]], cores: int | None) -> str:
    """One line on the machine's load during ``runs``: wall-clock times are comparable only on a
    machine that ran nothing else. Loaded means a 1-minute load average above the core count
    minus one (this run's own threads count in it)."""
    loads = [x for r in runs for x in r.get("load_average", ()) if x is not None]
    if not loads:
        return "machine load: not reported by this OS; wall times are comparable only on an otherwise idle machine"
    low, high = min(loads), max(loads)
    where = f"1-minute load average {low:.1f} to {high:.1f} on {cores or '?'} cores"
    if cores and high > max(cores - 1, 1):
        return (f"machine load: {where}: the machine was loaded, so the wall times (and time/step) include other "
                "work; compare the CPU time column, or the passes a step")
    return f"machine load: {where} (idle enough for the wall times to compare)"


def title(model: str, data: str, label_noise: float, seeds: int) -> str:
    """The chart's and table's title: ``resnet18 on digits, 40% label noise, 3 seeds``."""
    return f"{model} on {data}, {100 * label_noise:.0f}% label noise, {seeds} seed{'s' if seeds != 1 else ''}"


def caption(label_noise: float, optimizers: Sequence[str]) -> str:
    """What the training-loss panel shows when some labels are wrong."""
    if label_noise <= 0:
        return ""
    who = f"{BASELINE.upper()}'s lower training loss" if BASELINE in optimizers else "A lower training loss"
    return (f"Training loss is measured on the training labels, {100 * label_noise:.0f}% of them wrong: {who} is wrong "
            "labels memorised, not better learning; test accuracy (right) is on correct labels.")


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


def plot_curves(
    runs: Sequence[dict[str, Any]], optimizers: Sequence[str], path: str | Path, title: str = "", caption: str = ""
) -> None:
    """Train loss and test accuracy per epoch, per optimizer: mean over seeds with a ± std band,
    ``caption`` under the panels. Rendered with matplotlib's Agg canvas directly (no pyplot, no
    global backend change)."""
    require_plotting()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.4 if caption else 4), layout="constrained")
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
    if caption:
        fig.supxlabel(caption, fontsize="small", wrap=True)  # under the panels, inside the layout
    fig.savefig(path, dpi=120)
