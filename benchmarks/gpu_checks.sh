#!/usr/bin/env bash
# Issue 8's quick GPU measurements in one device call (about 6 minutes on an H100, at most 10), so
# that a session lent a GPU spends its 30 minutes on measuring, not on starting machines:
#
#   ../shared/device/prepare                                       # once, on the development machine
#   run (carry [".device"]):  source .device/setup.sh && bash benchmarks/gpu_checks.sh
#
# Each step has its own time limit; its whole output goes to $OUT/<step>.log (./gpu-checks without
# $OUT) and its last lines to the console, so one slow or failing step does not cost the others.
#   tests    the CUDA-only tests (the captured step, the memory estimate, channels-last evaluation)
#   layout   the evaluation channels-first vs channels-last, each with and without cuDNN's autotuner:
#            (H100, 2026-11-23: deep_conv x2.31 channels-last, so "cuda" is in evaluate.CHANNELS_LAST)
#   step     kernels and ms per packed step, per-parameter vs flat update, conv with the autotuner
#   loops    the loops table (targets: captured MLP >= 150k img/s, packed >= 500k MLP, 250k conv)
#   overhead the study's MLP pack of 8 alone vs in the runner, metrics every epoch vs batched
# The 32-cell study and the twins are one call each after this (benchmarks/README.md); the
# bench_gpu.py what-ifs (--cudnn-benchmark, --switch-interval) try a change on both sides first.
set -u
cd "$(dirname "$0")/.."
out=${OUT:-gpu-checks}
mkdir -p "$out"
py=${PYTHON:-$(command -v python || command -v python3)}  # the interpreter that has vaebench's dependencies

step() {  # step NAME SECONDS COMMAND...
  local name=$1 limit=$2 start=$SECONDS rc
  shift 2
  echo "== $name: $*"
  timeout "$limit" "$@" >"$out/$name.log" 2>&1
  rc=$?
  echo "   exit $rc after $((SECONDS - start)) s$([ "$rc" = 124 ] && echo " (over its $limit s)")"
  grep -v '^USDT:' "$out/$name.log" | tail -n 30
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  "$py" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version())'
} >"$out/device.txt" 2>&1
cat "$out/device.txt"
step tests 100 "$py" -m pytest -q -p no:cacheprovider tests/test_packed.py tests/test_evaluate.py -k "cuda or channels"
step layout 120 "$py" benchmarks/bench_layout.py --device cuda --test-samples 10000 --iw-samples 1000
step step 100 "$py" benchmarks/bench_step.py --device cuda --dataset mnist --members 1 8 32
step loops 180 "$py" benchmarks/bench_gpu.py --part loops
step overhead 100 "$py" benchmarks/bench_overhead.py --device cuda --dataset mnist --hidden 400 400 --epochs 10 --repeat 1
