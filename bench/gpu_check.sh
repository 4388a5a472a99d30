#!/usr/bin/env bash
# Everything a GPU must confirm about rlr_fast, in one command of under 8 minutes (issue 9, section 2).
#
#   bash bench/gpu_wheels.sh                  # here, first: the wheels the GPU image lacks -> .whl/
#   bash bench/gpu_check.sh                   # on the GPU machine, with .whl carried
#   bash bench/gpu_check.sh --dry-run         # on a CPU: the same stages and entry points, tiny shapes,
#                                             # the current environment (tests/test_gpu_check.py runs it)
#   bash bench/gpu_check.sh --stages tests,speed   # a subset, e.g. a rerun on a machine still warm
#   bash bench/gpu_check.sh --results DIR     # where results go (default bench/results)
#
# With the device tool: run(command="bash bench/gpu_check.sh", carry=[".whl"], timeout_s=560); the
# results come back through $OUT.
#
# Stages, in this order, each under its own time limit and all of them within BUDGET_S:
#   setup   install .whl/*.whl into $SITE (first on PYTHONPATH); print the GPU, driver and versions
#   build   pip install -e . --no-build-isolation: rlr_fast._C with the .cu compiled for this GPU;
#           print build_info() and fail unless the CUDA kernels and Triton are there
#   tests   the GPU tests natively (TRITON_INTERPRET unset): Triton compiled and _C's CUDA kernels vs
#           the reference in every dtype (fp32 log-densities for fp16/bf16 inputs), the contract on
#           every backend, CUDA-graph rollout vs eager, finetune replaying its rollouts from a CUDA
#           graph, NVTX ranges reaching a real backend.
#           RLR_FAST_REQUIRE_GPU=1 makes a missing GPU, CUDA build or compiled Triton a failure, not skips
#   ncu     Nsight Compute on the fused forward kernels (Triton and CUDA), selected by the dispatcher's
#           NVTX range "ddim_step"
#   memory  bench/memory.py --quick: torch.cuda.max_memory_allocated of SD1.4 updates under the
#           planner's plan next to its estimate, over T and h; its last line peak_gib=<v> MEASURED|ESTIMATED
#   speed   bench/speed.py: fused kernel GB/s vs HBM peak and vs unfused PyTorch; rollouts (T = 50,
#           batch 1 and 4, eager and CUDA graph) vs the diffusers loop; one RLR update vs the naive
#           one-graph update, truncated backprop, DDPO; achieved TFLOP/s vs dense fp16 peak
# Then bench/gpu_report.py writes <results>/<gpu>.md with every figure, the device, driver, torch and
# date, and with $OUT set the results (at most 8 files) are copied there. Exits 1 when any stage but
# ncu failed, ran out of time or was skipped for lack of time (ncu needs hardware counters that some
# machines refuse).
set -uo pipefail
cd "$(dirname "$0")/.."

DRY_RUN=0
STAGES="setup,build,tests,ncu,memory,speed"
RESULTS=bench/results
while (($#)); do
  case $1 in
    --dry-run) DRY_RUN=1 ;;
    --stages) STAGES=$2; shift ;;
    --results) RESULTS=$2; shift ;;
    *) echo "usage: bash bench/gpu_check.sh [--dry-run] [--stages a,b] [--results DIR]" >&2; exit 2 ;;
  esac
  shift
done

BUDGET_S=${BUDGET_S:-470}  # the whole run; the device tool's call allows 600 s, its session 15 minutes
REPORT_S=15                # kept back for the report
declare -A LIMIT=([setup]=40 [build]=180 [tests]=150 [ncu]=60 [memory]=110 [speed]=200)
GPU_TESTS="tests/test_kernels.py tests/test_compiled.py tests/test_ddim.py tests/test_cuda_graph.py tests/test_profiling.py
 tests/test_train.py::test_finetune_on_a_gpu_replays_its_rollouts_from_a_cuda_graph"
PY=${PYTHON:-python3}
SITE=/tmp/rlr_fast_site
mkdir -p "$RESULTS"
RESULTS=$(cd "$RESULTS" && pwd)
WORK=$(mktemp -d)
LOG=$RESULTS/gpu_check.log
: >"$LOG"
export PY SITE WORK DRY_RUN GPU_TESTS PYTHONUNBUFFERED=1 RLR_FAST_BENCH_RESULTS=$RESULTS
if ((DRY_RUN)); then
  export OMP_NUM_THREADS=1  # several threads on a busy 2-core machine spin far longer than they work
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
else
  unset TRITON_INTERPRET
  export PYTHONPATH=$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}
fi

# ----------------------------------------------------------------------------------------------
# Stages: each a function, run by run_stage under `timeout`

stage_setup() {
  if ((DRY_RUN)); then
    echo "dry run: no wheels installed, the current environment is used"
  else
    ls .whl/*.whl >/dev/null 2>&1 || { echo "no .whl/*.whl: run bash bench/gpu_wheels.sh and carry .whl" >&2; return 1; }
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
      || return 1
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || return 1
  fi
  "$PY" - <<'EOF'
import importlib, platform, sys
print("python", platform.python_version(), sys.executable)
for name in ("torch", "triton", "diffusers", "transformers", "peft", "accelerate", "nvtx"):
    try:
        module = importlib.import_module(name)
        print(f"{name} {getattr(module, '__version__', '?')} from {module.__file__}")
    except ImportError as e:
        print(f"{name} missing ({e})")
import torch
print("torch.version.cuda", torch.version.cuda, "cuda available", torch.cuda.is_available())
EOF
}

stage_build() {
  [ -e rlr_fast/kernels ] || ln -s ../kernels rlr_fast/kernels  # how a source tree resolves rlr_fast.kernels
  if ((!DRY_RUN)); then
    TORCH_CUDA_ARCH_LIST=$("$PY" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())') || return 1
    export TORCH_CUDA_ARCH_LIST
    echo "building for compute capability $TORCH_CUDA_ARCH_LIST"
    "$PY" -m pip install --no-build-isolation --no-deps --no-index -e . || return 1
  else
    echo "dry run: no build, the current rlr_fast._C is used"
  fi
  "$PY" - <<'EOF'
import json, os, sys
import rlr_fast
info = rlr_fast.build_info()
print("build_info", json.dumps(info))
if os.environ["DRY_RUN"] != "1" and not (info["cuda_kernels"] and info["triton"] and info["backend_cuda"] == "triton"):
    sys.exit("rlr_fast._C has no CUDA kernels or Triton is missing: the GPU checks would test the fallbacks")
EOF
}

stage_tests() {
  if ((DRY_RUN)); then  # the suite runs these files itself; here only their collection is checked
    # shellcheck disable=SC2086  # GPU_TESTS is a list of paths without spaces
    "$PY" -m pytest -q -p no:cacheprovider -p no:xdist --collect-only $GPU_TESTS | tail -3
  else
    # shellcheck disable=SC2086
    RLR_FAST_REQUIRE_GPU=1 "$PY" -m pytest -q -p no:cacheprovider -n 8 -rfE $GPU_TESTS
  fi
}

stage_ncu() {
  # The target: the kernel section of bench/speed.py, each fused backend's forward run twice inside
  # the NVTX range "ddim_step" (RLR_FAST_PROFILE=1 switches the ranges on); 2^24 elements per tensor.
  local target=(env RLR_FAST_PROFILE=1 RLR_FAST_BENCH_RESULTS="$WORK" "$PY" bench/speed.py --sections kernel
                --repeats 1 --warmup 0 --calls 1 --kernel-elements $((1 << 24)))
  if ((DRY_RUN)); then
    echo "dry run: the ncu target alone, without ncu"
    "${target[@]}"
    return
  fi
  local ncu
  ncu=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda/bin/ncu 2>/dev/null | head -1)
  [ -n "$ncu" ] || { echo "ncu not found" >&2; return 1; }
  "$ncu" --nvtx --nvtx-include "ddim_step/" --clock-control none --target-processes all -c 8 \
    --section SpeedOfLight --section MemoryWorkloadAnalysis "${target[@]}" | tee "$RESULTS/ncu.txt"
  grep -q "DRAM Throughput\|Memory Throughput" "$RESULTS/ncu.txt"  # no kernel profiled: the range is missing
}

stage_memory() {
  "$PY" bench/memory.py --quick
}

stage_speed() {
  if ((DRY_RUN)); then
    "$PY" bench/speed.py --tiny --steps 6 --batches 1,2 --repeats 1 --warmup 1 --kernel-elements 65536
  else
    "$PY" bench/speed.py --repeats 3 --warmup 1
  fi
}

export -f stage_setup stage_build stage_tests stage_ncu stage_memory stage_speed

# ----------------------------------------------------------------------------------------------
# Running the stages within the budget

declare -A STATUS SECONDS_TAKEN LIMIT_USED
ORDER=(setup build tests ncu memory speed)
START=$SECONDS

run_stage() {
  local name=$1
  if [[ ",$STAGES," != *",$name,"* ]]; then STATUS[$name]="not selected"; return; fi
  local left=$((BUDGET_S - REPORT_S - (SECONDS - START)))
  local limit=${LIMIT[$name]}
  ((left < limit)) && limit=$left
  LIMIT_USED[$name]=$limit
  if ((limit < 10)); then STATUS[$name]="SKIPPED: time budget spent"; SECONDS_TAKEN[$name]=0; return; fi
  echo "=== stage $name (limit ${limit} s, $((SECONDS - START)) s into the run)" | tee -a "$LOG"
  local t0=$SECONDS
  timeout --kill-after=10 "$limit" bash -o pipefail -c "stage_$name" 2>&1 | tee "$WORK/$name.log" | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  SECONDS_TAKEN[$name]=$((SECONDS - t0))
  case $rc in
    0) STATUS[$name]=ok ;;
    124 | 137) STATUS[$name]="TIMEOUT after ${limit} s" ;;
    *) STATUS[$name]="FAILED (exit $rc)" ;;
  esac
  echo "=== stage $name: ${STATUS[$name]} in ${SECONDS_TAKEN[$name]} s" | tee -a "$LOG"
}

for name in "${ORDER[@]}"; do run_stage "$name"; done

# ----------------------------------------------------------------------------------------------
# The report

for name in "${ORDER[@]}"; do
  printf '%s\t%s\t%s\t%s\n' "$name" "${STATUS[$name]}" "${SECONDS_TAKEN[$name]:-}" "${LIMIT_USED[$name]:-}"
done >"$WORK/stages.tsv"
REPORT=$("$PY" bench/gpu_report.py "$RESULTS" "$WORK" $( ((DRY_RUN)) && echo --dry-run) | sed -n 's/^report: //p')
echo
echo "stage timings (budget ${BUDGET_S} s, used $((SECONDS - START)) s):"
for name in "${ORDER[@]}"; do printf '  %-7s %-32s %5s s\n' "$name" "${STATUS[$name]}" "${SECONDS_TAKEN[$name]:-}"; done
echo "report: ${REPORT:-(not written)}"

if [ -n "${OUT:-}" ]; then
  LABEL=$(basename "${REPORT:-none}" .md)
  for f in "$REPORT" "$LOG" "$RESULTS/ncu.txt" "$RESULTS/speed_$LABEL.md" "$RESULTS/speed_$LABEL.csv" \
           "$RESULTS/memory_$LABEL.md" "$RESULTS/memory_$LABEL.csv"; do
    [ -f "$f" ] && cp "$f" "$OUT/"
  done
  echo "copied to \$OUT: $(ls "$OUT" | tr '\n' ' ')"
fi
rm -rf "$WORK"

failed=0
[ -n "${REPORT:-}" ] || failed=1
for name in setup build tests memory speed; do
  case ${STATUS[$name]} in ok | "not selected") ;; *) failed=1 ;; esac
done
exit $failed
