#!/usr/bin/env bash
# The CUDA figures in one command on one GPU, from the repository checkout (nothing installed:
# the package is imported from here through PYTHONPATH; no network needed):
#   bash benchmarks/gpu_check.sh OUT            (PYTHON=... to choose the interpreter: default
#                                                .venv/bin/python, else python3)
#   DRY_RUN=1 bash benchmarks/gpu_check.sh OUT  (every stage on the CPU with tiny sizes, the same
#                                                files: checks the script, the JSON and the summary)
# Stages, each under its own time limit so a slow or failing one hides nothing (limits add up to
# 405 s, plus 15 s for the summary: 420 s; a stage never gets more than what is left of that):
#   cuda_tests      55 s  tests/test_cuda.py and the CUDA tests of test_directions / test_grad_scaler /
#                         test_composer: CUDA = CPU results; no host sync on the optimizer's part of
#                         a step under torch.cuda.set_sync_debug_mode("error") (SAM, ZSharp in both
#                         scopes, the base step, statistics recorded); fp16 autocast with
#                         ClosureGradScaler (an inf in either pass skips, weights bitwise unchanged);
#                         bf16 autocast close to fp32
#   step_cost      120 s  full step SGD / SAM / ZSharp (both scopes) / interval 2 and 5 on resnet18,
#                         resnet50 and vit_small_c32 at 32x32 (batch 128 and 256) and resnet50 at
#                         224 (batch 64), peak memory from the CUDA allocator; optimizer-only against
#                         the torch.quantile filter (QuantileZSharp)
#   filter_scaling  50 s  optimizer-only time and memory up to ViT-B/16 and one 22M-entry tensor
#                         (the torch.quantile filter fails above 2^24 entries: recorded, not a crash)
#   lightning       35 s  ZSharpCallback, precision="16-mixed", 12 steps, one with an injected inf
#   hf              45 s  zsharp_algos.hf.Trainer, --optim zsharp --base_optim sgd --fp16, 12 steps,
#                         one with an injected inf
#   dispatch_count  25 s  ops per first_step()+restore() on resnet18 (CPU; the kernel-launch floor)
#   composer_fsdp2  30 s  Composer FSDP2 check (skipped, with a line, when Composer is not installed)
#   profile         45 s  only if that much is left: torch.profiler kernel tables of ZSharp (both
#                         scopes) and SAM optimizer-only, and a whole SAM step, on resnet50
#   summary         15 s  benchmarks/gpu_summary.py: the targets table, met / missed, summary.json
# OUT ends up with three files: gpu_check.tar.gz (every JSON, log, test report and profile, under
# work/), summary.json and gpu_check.log (this script's whole output).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
DRY=${DRY_RUN:-0}
OUT=${1:-results/gpu}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
WORK="$OUT/work"
rm -rf "$WORK" && mkdir -p "$WORK"
exec > >(tee "$OUT/gpu_check.log") 2>&1
TEE_PID=$!
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
packed=0
pack() {  # everything under work/ into one tarball; summary.json next to it
  [ "$packed" = 1 ] && return
  packed=1
  [ -f "$WORK/summary.json" ] && cp "$WORK/summary.json" "$OUT/summary.json"
  tar -czf "$OUT/gpu_check.tar.gz" -C "$OUT" --exclude='*.safetensors' --exclude='*.bin' --exclude='*.ckpt' \
    --exclude='*.pt' work && rm -rf "$WORK"
  echo "packed: $OUT/gpu_check.tar.gz ($(du -h "$OUT/gpu_check.tar.gz" | cut -f1)); $OUT holds: $(ls "$OUT" | tr '\n' ' ')"
}
trap pack EXIT

if [ "$DRY" = 1 ]; then
  # A CPU (a shared one, too) is many times slower: every limit times SCALE; the dry run checks
  # that everything runs and writes its files, not the time.
  DEV=cpu SCALE=${SCALE:-5} BUDGET=${BUDGET:-1500}
else
  DEV=cuda SCALE=1 BUDGET=${BUDGET:-420}
  "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device visible to torch')" \
    || exit 1
fi
SUMMARY_RESERVE=$(( 15 * SCALE ))
"$PY" - <<'EOF' | tee "$WORK/environment.txt"
import platform
from importlib.metadata import PackageNotFoundError, version

import torch

print("python", platform.python_version(), "| torch", torch.__version__, "| CUDA", torch.version.cuda,
      "| GPU:", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none")
for dist in ("lightning", "pytorch-lightning", "transformers", "accelerate", "timm", "torchmetrics", "scikit-learn",
             "mosaicml"):  # versions from the installed metadata: importing them all would take seconds
    try:
        print(f"  {dist} {version(dist)}")
    except PackageNotFoundError:
        print(f"  {dist}: not installed")
EOF

status=0
stage_line() {  # stage_line NAME RC SECONDS LIMIT STATUS NOTE
  printf '{"name": "%s", "rc": %s, "seconds": %s, "limit": %s, "status": "%s", "note": "%s"}\n' \
    "$1" "$2" "$3" "$4" "$5" "$6" >> "$WORK/stages.jsonl"
}
skip() {  # skip NAME REASON
  echo; echo "== $1: skipped, $2"
  stage_line "$1" null 0 0 "skipped" "$2"
}
run() {  # run NAME LIMIT_SECONDS COMMAND...: at most LIMIT, and never past the budget
  local name=$1 limit=$(( $2 * SCALE )); shift 2
  local left=$(( BUDGET - SUMMARY_RESERVE - SECONDS ))
  if [ "$left" -lt 10 ]; then skip "$name" "no time left in the ${BUDGET} s budget"; return; fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo; echo "== $name (limit ${limit} s, at ${SECONDS} s): $*"
  local start=$SECONDS
  timeout -k 5 "$limit" "$@" 2>&1 | tee "$WORK/$name.log"
  local rc=${PIPESTATUS[0]} took=$(( SECONDS - start ))
  if [ "$rc" -eq 0 ]; then
    stage_line "$name" 0 "$took" "$limit" ok ""
  elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    echo "!! $name: stopped at its time limit (${limit} s)"; status=1
    stage_line "$name" "$rc" "$took" "$limit" "timeout" "stopped at ${limit} s"
  else
    echo "!! $name exited with $rc"; status=1
    stage_line "$name" "$rc" "$took" "$limit" "failed" "exit code $rc"
  fi
}

# ---------------------------------------------------------------------------------------- stages
if [ "$DRY" = 1 ]; then
  export ZSHARP_CUDA_TESTS_ON_CPU=1  # tests/test_cuda.py on the CPU, host reads forbidden instead
  STEP_COST=(--models resnet18@4,vit_small_c32@2 --rounds 1 --warmup 0 --time-budget 200)
  SCALING=(--subjects resnet18,single_22M --rounds 1 --warmup 0 --time-budget 60)
  RUNS=(--steps 5)
  PROFILE=(--model resnet18 --batch 8)
else
  # the batch sizes CIFAR-size training uses, then ImageNet-size resnet50; the entries not
  # started within 90 s are skipped (and listed), so the JSON is always written
  STEP_COST=(--models resnet18@128,vit_small_c32@128,resnet50@128,resnet50_224@64,resnet18@256,vit_small_c32@256,resnet50@256
             --rounds 10 --warmup 3 --time-budget 90)
  SCALING=(--rounds 10 --warmup 3 --time-budget 40)
  RUNS=(--steps 12)
  PROFILE=(--model resnet50 --batch 128)
fi

run cuda_tests 55 env ZSHARP_CUDA_TEST_RECORD="$WORK/cuda_tests_record.json" \
  "$PY" -m pytest -q -rs -p no:cacheprovider --junitxml="$WORK/cuda_tests.xml" -k cuda \
  tests/test_cuda.py tests/test_directions.py tests/test_grad_scaler.py tests/test_composer.py
run step_cost 120 "$PY" benchmarks/step_cost.py --device "$DEV" "${STEP_COST[@]}" \
  --methods sgd,sam,zsharp,zsharp_tensor,zsharp_k2,zsharp_k5 --name step_cost_gpu_check --out "$WORK"
run filter_scaling 50 "$PY" benchmarks/filter_scaling.py --device "$DEV" "${SCALING[@]}" --out "$WORK"
run lightning 35 "$PY" benchmarks/gpu_runs.py lightning --device "$DEV" "${RUNS[@]}" --out "$WORK"
run hf 45 "$PY" benchmarks/gpu_runs.py hf --device "$DEV" "${RUNS[@]}" --out "$WORK"
run dispatch_count 25 "$PY" benchmarks/dispatch_count.py --models resnet18 --out "$WORK"
if "$PY" -c "import composer" >/dev/null 2>&1; then
  run composer_fsdp2 30 env OMP_NUM_THREADS=1 "$PY" -m torch.distributed.run --standalone --nproc_per_node 1 \
    benchmarks/composer_fsdp2_check.py --device "$([ "$DRY" = 1 ] && echo cpu || echo gpu)"
else
  skip composer_fsdp2 "Composer is not installed (import composer failed)"
fi
if [ $(( BUDGET - SUMMARY_RESERVE - SECONDS )) -ge $(( 45 * SCALE )) ]; then
  run profile 45 "$PY" benchmarks/gpu_runs.py profile --device "$DEV" "${PROFILE[@]}" --out "$WORK"
else
  skip profile "less than 45 s left"
fi

echo; echo "== summary (at ${SECONDS} s)"
timeout -k 5 "$SUMMARY_RESERVE" "$PY" benchmarks/gpu_summary.py "$WORK" 2>&1 | tee "$WORK/summary.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || { echo "!! summary failed"; status=1; }
echo "total ${SECONDS} s; exit status $status (1: a stage failed or ran out of time; targets: see the table)"
pack
trap - EXIT
exec 1>&- 2>&-
wait "$TEE_PID" 2>/dev/null
exit $status
