#!/usr/bin/env bash
# The prepared GPU check: at most about 8 minutes on one H100/H200, no network, nothing installed.
#
#   bash tests/gpu_check.sh                       from the repo root, on a machine with a CUDA GPU
#   GPU_CHECK_DRY_RUN=1 bash tests/gpu_check.sh   the same plumbing on a CPU, with tiny models (seconds)
#
# 1. versions: nvidia-smi, Python, PyTorch, CUDA, numpy
# 2. the GPU-only tests (tests/test_gpu.py)
# 3. the GPU report (tests/gpu_report.py): the full 124M config, 8 micro-steps of 64 x 1024, compiled; one
#    optimizer step broken down (data, forward+backward per micro-step, Adam, Muon, host sync, other), MFU,
#    peak memory, issue 10's targets (PASS/MISS, never a failure), and the A/B of each speed item
# 4. the full config under a 24 GB cap (--memory_limit_gb=24) with --device_batch_size=auto over a batch of 512:
#    the micro-batch auto chose, ms per step, and PASS only if peak memory stays under 24 GiB
#
# Everything printed also goes to $OUT/gpu_check_<date>_<card>.txt when $OUT is set, else to
# records/gpu_check_<date>_<card>.txt (GPU_CHECK_LOG=path overrides); the path is printed first and last.
# Each stage has a timeout cut from one budget (GPU_CHECK_SECONDS, default 450 s), so the whole check
# ends within about 8 minutes even when a stage hangs. Exit status 0 only if every stage passed.
# PYTHON picks the interpreter (default: python from PATH, else python3).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -z "${PYTHON:-}" ]; then
  PYTHON=python
  command -v python >/dev/null 2>&1 || PYTHON=python3
fi
export PYTHONUNBUFFERED=1
DRY_RUN=${GPU_CHECK_DRY_RUN:-0}
BUDGET=${GPU_CHECK_SECONDS:-450}
DEADLINE=$((SECONDS + BUDGET))

card=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1 | sed 's/[^A-Za-z0-9._-]/_/g' || true)
if [ -z "$card" ]; then
  card=no-gpu
fi
if [ "$DRY_RUN" = 1 ]; then
  card=cpu-dry-run
fi
name="gpu_check_$(date +%Y-%m-%d)_${card}.txt"
if [ -n "${GPU_CHECK_LOG:-}" ]; then
  LOG=$GPU_CHECK_LOG
elif [ -n "${OUT:-}" ]; then
  LOG="$OUT/$name"
else
  LOG="records/$name"
fi
mkdir -p "$(dirname "$LOG")"

FAILED=()
PASSED=()

# stage NAME WANT RESERVE COMMAND...: run COMMAND for at most WANT seconds, leaving RESERVE seconds of the
# budget to the stages after it; record PASS or FAIL.
stage() {
  local name=$1 want=$2 reserve=$3
  shift 3
  local left=$((DEADLINE - SECONDS))
  local cap=$((left - reserve))
  if [ "$cap" -gt "$want" ]; then
    cap=$want
  fi
  echo
  echo "=== $name"
  if [ "$cap" -lt 30 ]; then
    echo "=== $name: FAIL (skipped: only ${left}s of the ${BUDGET}s budget left)"
    FAILED+=("$name (skipped)")
    return 0
  fi
  local cmd=("$@")
  if [ "${cmd[1]}" = tests/gpu_benchmark.py ] || [ "${cmd[1]}" = tests/gpu_report.py ]; then
    cmd+=(--timeout "$((cap - 25))")  # each ends or skips work itself before the cap, and still reports
  fi
  echo "\$ timeout $cap ${cmd[*]}"
  local start=$SECONDS rc=0
  timeout -k 15 "$cap" "${cmd[@]}" || rc=$?
  if [ "$rc" -eq 0 ]; then
    echo "=== $name: PASS ($((SECONDS - start))s)"
    PASSED+=("$name")
  else
    local why="exit $rc"
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
      why="timed out after ${cap}s"
    fi
    echo "=== $name: FAIL ($why, $((SECONDS - start))s)"
    FAILED+=("$name")
  fi
}

main() {
  echo "gpu_check: output goes to $LOG"
  echo "gpu_check: $(date -u +%Y-%m-%dT%H:%M:%SZ), budget ${BUDGET}s, python: $(command -v "$PYTHON" || echo "$PYTHON")"
  echo "gpu_check: commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  echo
  echo "=== versions"
  nvidia-smi || echo "nvidia-smi: not available"
  "$PYTHON" - <<'EOF'
import platform, sys
import numpy, torch
print(f"Python {sys.version.split()[0]} ({platform.machine()}), PyTorch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"cuDNN {torch.backends.cudnn.version()}, numpy {numpy.__version__}")
try:
    import triton
    print(f"Triton {triton.__version__}")
except ImportError:
    print("Triton: not installed")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"GPU 0: {p.name}, {p.total_memory / 2**30:.1f} GiB, capability {p.major}.{p.minor}, "
          f"{p.multi_processor_count} SMs; {torch.cuda.device_count()} visible")
else:
    print("no CUDA GPU visible to PyTorch")
EOF

  local report=(--preset full --json) bench_24gb=(--preset full24gb --steps 8) label=""
  if [ "$DRY_RUN" = 1 ]; then
    echo "gpu_check: DRY RUN on the CPU: tiny models stand in for the full config, compile is off"
    report=(--preset tiny --json)
    bench_24gb=(--preset tiny --steps 10 --device_batch_size=auto --max_memory_gb=24)
    label="DRY RUN, tiny model for: "
  elif ! "$PYTHON" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then
    echo "gpu_check: FAIL: PyTorch sees no CUDA GPU here (GPU_CHECK_DRY_RUN=1 runs the plumbing on a CPU)"
    return 1
  fi

  # Budget, estimated before any GPU run (see README, "Reading the GPU report"): tests ~100 s; report ~210 s
  # (compile ~70-120 s, a second compile for the coordinate-descent A/B ~50-90 s, ~60 steps of ~1.1 s);
  # 24 GB ~130 s (a probe compile per micro-batch tried). The report skips A/B items that would overrun.
  stage "GPU tests (tests/test_gpu.py)" 130 310 \
    "$PYTHON" -m pytest tests/test_gpu.py -q -rs -p no:cacheprovider
  stage "${label}GPU report: full 124M config, 8 micro-steps of 64, compiled: breakdown, targets, A/B" 240 110 \
    "$PYTHON" tests/gpu_report.py "${report[@]}"
  stage "${label}full config under a 24 GB cap, auto micro-batch (peak must stay under 24 GiB)" 240 0 \
    "$PYTHON" tests/gpu_benchmark.py "${bench_24gb[@]}"

  echo
  echo "gpu_check: ${#PASSED[@]} stage(s) passed, ${#FAILED[@]} failed, ${SECONDS}s in all"
  echo "gpu_check: output: $LOG"
  if [ "${#FAILED[@]}" -gt 0 ]; then
    printf 'gpu_check: FAIL: %s\n' "${FAILED[@]}"
    return 1
  fi
  echo "gpu_check: PASS"
}

main 2>&1 | tee "$LOG"
