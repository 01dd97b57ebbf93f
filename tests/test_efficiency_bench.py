"""``benchmarks/efficiency.py --quick`` end to end: the JSON's fields, and passes per step that are
exactly what the schedule implies (the timing windows: ``1 + 1/k`` for every mode; the training
runs: one pass per step plus one per step the schedule makes a sharpness step)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from zsharp_algos.schedule import sharpness_due

pytest.importorskip("timm")
pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("efficiency")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "efficiency.py"), "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "efficiency_quick.json").read_text()), proc.stdout, out


def test_quick_run_writes_every_field_and_the_chart(quick):
    result, stdout, out = quick
    assert (out / "efficiency_quick.png").stat().st_size > 0
    names = ["sgd", "sam", "zsharp"] + [f"zsharp_{m}_k{k}" for m in ("fixed", "random", "looksam") for k in (2, 5, 10)]
    assert list(result["settings"]["configs"]) == names
    assert {r["config"] for r in result["runs"]} == set(names) and len(result["runs"]) == len(names)
    cost = result["cost"]
    assert set(cost["step_s"]) == set(names) and cost["wall_vs_sgd"]["sgd"] == 1.0
    assert len(cost["loadavg_before"]) == 3 and len(cost["loadavg_after"]) == 3
    summary = result["summary"]
    for name in names:
        s = summary[name]
        assert s["acc_min"] <= s["acc_mean"] <= s["acc_max"] and s["seeds"] == 1
        assert s["wall_vs_sgd"] > 0
    assert {"accuracy", "cost", "budgets"} <= set(result["targets"])
    interval_names = {f"zsharp_{m}_k{k}" for m in ("fixed", "random", "looksam") for k in (2, 5, 10)}
    assert set(result["targets"]["cost"]["checks"]) == set(result["targets"]["cost_cpu"]["checks"]) == interval_names
    assert set(cost["cpu_vs_sgd"]) == set(names)
    assert "ACCURACY TARGET" in stdout and "COST TARGET" in stdout and "share of ZSharp's gain" in stdout


def test_passes_per_step_are_what_the_schedule_implies(quick):
    result, _, _ = quick
    configs = result["settings"]["configs"]
    for name, passes in result["cost"]["passes_per_step"].items():
        k, optimizer = configs[name]["interval"], configs[name]["optimizer"]
        # whole cycles (fixed, LookSAM); random: windows of k steps holding one sharpness step
        assert passes == (1.0 if optimizer == "sgd" else 1 + 1 / k), name
    for run in result["runs"]:
        config = configs[run["config"]]
        k, steps = config["interval"], run["steps"]
        mode = "random" if config["mode"] == "random" else "fixed"
        sharp = 0 if config["optimizer"] == "sgd" else sum(sharpness_due(t, k, mode, run["seed"]) for t in range(steps))
        assert run["passes"] == run["expected_passes"] == steps + sharp, run["config"]
        if mode == "fixed" and k > 1 and steps % k == 0:
            assert run["passes_per_step"] == 1 + 1 / k
