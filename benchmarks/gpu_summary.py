"""The GPU check's targets against what its stages measured: one table, and ``summary.json``.

    python benchmarks/gpu_summary.py WORK_DIR [--out summary.json]

Reads what ``benchmarks/gpu_check.sh`` leaves in WORK_DIR: ``stages.jsonl`` (each stage's exit
code and time), ``cuda_tests.xml`` (pytest's JUnit report) and ``cuda_tests_record.json`` (the
differences the CUDA tests measured), ``step_cost_gpu_check.json``, ``filter_scaling_*.json``,
``dispatch_count.json``, ``run_lightning.json``, ``run_hf.json``. A file that is missing makes
its rows "not run"; nothing here fails on a partial run. Status per row: met, missed, n/a (the
comparison does not apply, e.g. the peer failed), info (shown, no target), not run.
"""
from __future__ import annotations

import argparse
import json
import xml.etree.ElementTree as ET
from pathlib import Path

SAM_X_SGD = 2.05  # full step: SAM <= 2.05 x SGD
ZSHARP_X_SAM = 1.05  # full step: ZSharp (global scope) <= 1.05 x SAM, on resnet50 and the ViT
TENSOR_X_SAM = 1.10  # full step: ZSharp (tensor scope) <= 1.10 x SAM, on resnet50 and the ViT
INTERVAL_TOL = 0.05  # interval k: within 0.05 of 1 + (ZSharp/SGD - 1)/k
ZSHARP_TARGET_MODELS = ("resnet50", "vit")  # model-name prefixes the ZSharp / SAM targets apply to


def load(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def junit_outcomes(path: Path) -> dict[str, str] | None:
    """test name (with its parameters) -> passed / failed / error / skipped."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    out = {}
    for case in root.iter("testcase"):
        kinds = {child.tag: child for child in case}
        outcome = ("failed" if "failure" in kinds else "error" if "error" in kinds
                   else "skipped" if "skipped" in kinds else "passed")
        if outcome == "skipped":
            outcome += ": " + (kinds["skipped"].get("message") or "").strip()
        out[f"{case.get('classname', '').split('.')[-1]}::{case.get('name')}"] = outcome
    return out


class Table:
    def __init__(self):
        self.rows: list[dict] = []

    def add(self, target: str, measured: str, status: str, source: str = "") -> None:
        self.rows.append({"target": target, "measured": measured, "status": status, "source": source})


def tests_row(table: Table, outcomes: dict | None, target: str, prefixes: tuple[str, ...], extra: str = "") -> None:
    if outcomes is None:
        table.add(target, "no test report", "not run", "cuda_tests")
        return
    chosen = {k: v for k, v in outcomes.items() if any(k.split("::")[-1].startswith(p) for p in prefixes)}
    ran = {k: v for k, v in chosen.items() if not v.startswith("skipped")}
    bad = sorted(k.split("::")[-1] for k, v in ran.items() if v != "passed")
    if not ran:
        table.add(target, f"{len(chosen)} tests, all skipped" if chosen else "no such tests", "not run", "cuda_tests")
        return
    measured = f"{len(ran) - len(bad)}/{len(ran)} passed" + (f"; failed: {', '.join(bad[:4])}" if bad else "")
    skipped = len(chosen) - len(ran)
    measured += f" ({skipped} skipped)" if skipped else ""
    table.add(target, measured + extra, "met" if not bad else "missed", "cuda_tests")


def max_of(record: dict | None, prefix: str, key: str):
    if not record:
        return None
    values = [v[key] for k, v in record.get("measured", {}).items() if k.startswith(prefix) and key in v]
    return max(values) if values else None


def step_cost_rows(table: Table, data: dict | None) -> None:
    if data is None:
        table.add("full step: SAM / ZSharp / interval (step_cost)", "no step_cost JSON", "not run", "step_cost")
        return
    for key, entry in data.get("models", {}).items():
        steps = entry["step_s"]
        model = entry.get("model", key)
        applies = model.startswith(ZSHARP_TARGET_MODELS)
        sgd, sam = steps.get("sgd"), steps.get("sam")
        if sgd and sam:
            r = sam / sgd
            table.add(f"{key}: SAM <= {SAM_X_SGD}x SGD", f"{r:.3f}x", "met" if r <= SAM_X_SGD else "missed", "step_cost")
        for method, limit, what in (("zsharp", ZSHARP_X_SAM, "ZSharp"), ("zsharp_tensor", TENSOR_X_SAM, "ZSharp tensor")):
            if sam and method in steps:
                r = steps[method] / sam
                status = ("met" if r <= limit else "missed") if applies else "info"
                table.add(f"{key}: {what} <= {limit}x SAM", f"{r:.3f}x", status, "step_cost")
        for k in (2, 5, 10):
            name = f"zsharp_k{k}"
            if sgd and name in steps and "zsharp" in steps:
                predicted = 1 + (steps["zsharp"] / sgd - 1) / k
                got = steps[name] / sgd
                status = "met" if abs(got - predicted) <= INTERVAL_TOL else "missed"
                table.add(f"{key}: interval {k} = 1 + (ZSharp/SGD - 1)/{k} +- {INTERVAL_TOL}",
                          f"{got:.3f}x SGD vs {predicted:.3f}", status, "step_cost")
    for key in data.get("skipped", []):
        table.add(f"{key}: full step", "skipped (time budget)", "not run", "step_cost")


def optimizer_only_rows(table: Table, source: str, per_model: dict[str, dict]) -> None:
    """Our ZSharp (global scope, as the peer) below the torch.quantile filter, where that runs."""
    for key, entry in per_model.items():
        times, failures = entry.get("optimizer_only_s", {}), entry.get("failures", {})
        ours = times.get("ours_zsharp")
        target = f"{key}: optimizer-only ZSharp < torch.quantile filter"
        if "quantile_zsharp" in failures:
            table.add(target, f"quantile failed: {failures['quantile_zsharp'][:60]}", "n/a", source)
        elif ours is None or "quantile_zsharp" not in times:
            table.add(target, "not measured", "not run", source)
        else:
            q = times["quantile_zsharp"]
            table.add(target, f"{ours * 1e3:.2f} vs {q * 1e3:.2f} ms ({ours / q:.2f}x)",
                      "met" if ours < q else "missed", source)


def run_row(table: Table, name: str, data: dict | None, stage: dict | None) -> None:
    target = f"{name} run: fp16, --optim zsharp / ZSharpCallback, a few steps"
    if data is None:
        why = stage.get("status", "not run") if stage else "not run"
        table.add(target, f"no JSON ({why})", "not run", name)
        return
    if "error" in data:
        table.add(target, "crashed: " + data["error"].strip().splitlines()[-1][:80], "missed", name)
        return
    sharp = ", ".join(f"{k.split('/')[-1]} {v:.4g}" for k, v in data.get("sharpness", {}).items())
    measured = (f"{data.get('global_step')} steps, {data.get('skipped_steps')} skipped, final loss "
                f"{data.get('final_loss', float('nan')):.4f}; {sharp}")
    if data.get("problems"):
        measured += "; FAIL: " + "; ".join(data["problems"])
    table.add(target, measured, "met" if data.get("pass") else "missed", name)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("work", type=Path)
    parser.add_argument("--out", type=Path, default=None, help="summary.json path (default: WORK/summary.json)")
    args = parser.parse_args()
    work = args.work
    stages = {}
    for line in (work / "stages.jsonl").read_text().splitlines() if (work / "stages.jsonl").exists() else []:
        if line.strip():
            s = json.loads(line)
            stages[s["name"]] = s

    table = Table()
    outcomes = junit_outcomes(work / "cuda_tests.xml")
    record = load(work / "cuda_tests_record.json")
    device = (record or {}).get("machine", {}).get("device")
    mism = max_of(record, "test_cuda_matches_cpu", "mask_mismatch")
    wdiff = max_of(record, "test_cuda_matches_cpu", "weights_max_abs_diff")
    ediff = max_of(record, "test_cuda_matches_cpu", "e_max_abs_diff")
    tests_row(table, outcomes, "no host sync on the step path (sync debug mode 'error')",
              ("test_cuda_sync_check", "test_cuda_step_path_has_no_host_sync", "test_cuda_matches_cpu_without_syncs"))
    extra = (f"; max |w - w_cpu| {wdiff:.2e}, max |e - e_cpu| {ediff:.2e}, mask mismatches {mism}"
             if wdiff is not None else "")
    tests_row(table, outcomes, "CUDA equals CPU (e rel 1e-5, same mask; weights rel 1e-5 after 4 steps)",
              ("test_cuda_matches_cpu",), extra)
    fp16 = max_of(record, "test_cuda_fp16", "update_vs_fp32")
    tests_row(table, outcomes, "fp16 autocast + ClosureGradScaler: inf in either pass skips, weights bitwise",
              ("test_cuda_fp16",), f"; clean step vs fp32: rel {fp16:.3g} (< 0.05)" if fp16 is not None else "")
    bf16 = max_of(record, "test_cuda_bf16", "update_vs_fp32")
    tests_row(table, outcomes, "bf16 autocast steps finite and close to fp32",
              ("test_cuda_bf16",), f"; 3 steps vs fp32: rel {bf16:.3g} (< 0.1)" if bf16 is not None else "")
    composer_tests = {k: v for k, v in (outcomes or {}).items() if k.startswith("test_composer::")}
    if composer_tests and all(v.startswith("skipped") for v in composer_tests.values()):
        table.add("Composer CUDA tests", next(iter(composer_tests.values()))[:90], "not run", "cuda_tests")
    elif composer_tests:
        tests_row(table, outcomes, "Composer CUDA tests", ("test_amp_fp16",))

    step_cost = load(work / "step_cost_gpu_check.json")
    step_cost_rows(table, step_cost)
    if step_cost:  # measured once per model (it does not depend on the batch): one row per model
        per_model: dict[str, dict] = {}
        for key, entry in step_cost.get("models", {}).items():
            per_model.setdefault(entry.get("model", key), entry)
        optimizer_only_rows(table, "step_cost", per_model)
    scaling_files = sorted(work.glob("filter_scaling_*.json"))
    scaling = load(scaling_files[0]) if scaling_files else None
    if scaling:
        optimizer_only_rows(table, "filter_scaling", scaling.get("subjects", {}))
        for key in scaling.get("skipped", []):
            table.add(f"{key}: optimizer-only", "skipped (time budget)", "not run", "filter_scaling")
    else:
        table.add("optimizer-only up to ViT-B/16 and 22M (filter_scaling)", "no JSON", "not run", "filter_scaling")

    run_row(table, "lightning", load(work / "run_lightning.json"), stages.get("lightning"))
    run_row(table, "hf", load(work / "run_hf.json"), stages.get("hf"))
    dispatch = load(work / "dispatch_count.json")
    if dispatch:
        for name, row in dispatch.get("models", {}).items():
            worst = max(row.get("zsharp_global", 0), row.get("zsharp_tensor", 0))
            table.add(f"{name}: ops per ZSharp first_step + restore <= {dispatch.get('target_zsharp')}",
                      f"{worst} (SAM {row.get('sam')})", "info", "dispatch_count")
    for name, stage in stages.items():
        if stage.get("status") not in ("ok", None):
            table.add(f"stage {name}", f"{stage['status']}: {stage.get('note', '')}".strip(": "),
                      "info" if stage["status"].startswith("skipped") else "missed", "gpu_check.sh")

    counts = {s: sum(r["status"] == s for r in table.rows) for s in ("met", "missed", "n/a", "info", "not run")}
    summary = {
        "device": device, "dry_run": device == "cpu", "counts": counts,
        "all_met": counts["missed"] == 0 and counts["met"] > 0,
        "targets": table.rows, "stages": list(stages.values()),
        "step_cost": {k: {"step_ms": {m: t * 1e3 for m, t in v["step_s"].items()},
                          "peak_mib": {m: mem["peak_bytes"] / 2**20 for m, mem in v.get("memory", {}).items()
                                       if "peak_bytes" in mem}}
                      for k, v in (step_cost or {}).get("models", {}).items()},
    }
    out = args.out or work / "summary.json"
    out.write_text(json.dumps(summary, indent=2))

    header = ["target", "measured", "status", "from"]
    rows = [[r["target"], r["measured"], r["status"], r["source"]] for r in table.rows]
    widths = [min(110, max(len(str(x[i])) for x in [header] + rows)) for i in range(len(header))]
    title = "GPU check summary" + (" (DRY RUN on the CPU: figures are not GPU figures)" if device == "cpu" else "")
    print(f"\n{title}")
    for i, row in enumerate([header] + rows):
        print("| " + " | ".join(str(c)[:w].ljust(w) for c, w in zip(row, widths)) + " |")
        if i == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    if summary["step_cost"]:
        print("\nfull step, ms (peak MiB of the first two cycles: the CUDA allocator's on a GPU, "
              "tensors counted op by op on the CPU)")
        for key, v in summary["step_cost"].items():
            cells = [f"{m} {t:.2f}" + (f" ({v['peak_mib'][m]:.0f})" if m in v["peak_mib"] else "")
                     for m, t in v["step_ms"].items()]
            print(f"  {key}: " + ", ".join(cells))
    print(f"\n{counts['met']} met, {counts['missed']} missed, {counts['n/a']} n/a, {counts['not run']} not run; "
          f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
