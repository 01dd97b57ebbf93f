#!/usr/bin/env bash
# The CUDA figures in one command, a few minutes on one GPU (the stage limits below add up to 345 s):
#   bash benchmarks/gpu_check.sh [OUT]        (default OUT: results/gpu; PYTHON=... to choose the interpreter)
# 1. the CUDA tests (sync-free filter under torch.cuda.set_sync_debug_mode("error"), CUDA = CPU results,
#    fp16 autocast with the closure-aware scaler);
# 2. step_cost.py --device cuda on resnet18 and the small ViT (full step SGD / SAM / ZSharp, optimizer-only
#    against the bangyen/zsharp reproduction's torch.quantile filter);
# 3. filter_scaling.py --device cuda (optimizer-only time and memory up to ViT-B/16 and one 22M tensor);
# 4. dispatch_count.py on resnet18 (ops per first_step()+restore(): the kernel-launch floor; the same
#    on any machine, the three models are in make bench);
# 5. composer_fsdp2_check.py under torchrun on 1 GPU (a few Composer FSDP2 batches with ZSharpAlgorithm and
#    SAMAlgorithm, fp32 and amp_bf16, fp32 weights against the unsharded core optimizer; prints PASS/FAIL).
# Each stage has its own time limit, so a slow or failing one does not hide the others.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
OUT=${1:-results/gpu}
mkdir -p "$OUT"
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device visible to torch')" || exit 1
"$PY" -c "import torch; print('GPU:', torch.cuda.get_device_name(0), '| torch', torch.__version__)" | tee "$OUT/gpu.txt"
status=0
run() {  # run LIMIT_SECONDS NAME COMMAND...
  local limit=$1 name=$2; shift 2
  echo; echo "== $name: $*"
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  [ "$rc" -eq 0 ] || { echo "!! $name exited with $rc"; status=1; }
}
run 60 cuda_tests "$PY" -m pytest -q -x -k cuda tests/test_directions.py tests/test_grad_scaler.py tests/test_composer.py
run 120 step_cost "$PY" benchmarks/step_cost.py --device cuda --models resnet18,vit_small_c32 --rounds 10 --warmup 3 --out "$OUT"
run 75 filter_scaling "$PY" benchmarks/filter_scaling.py --device cuda --rounds 5 --warmup 2 --out "$OUT"
run 30 dispatch_count "$PY" benchmarks/dispatch_count.py --models resnet18 --out "$OUT"
OMP_NUM_THREADS=1 run 60 composer_fsdp2 "$PY" -m torch.distributed.run --standalone --nproc_per_node 1 \
  benchmarks/composer_fsdp2_check.py --device gpu
echo; echo "JSON and logs in $OUT"
exit $status
