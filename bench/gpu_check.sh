#!/usr/bin/env bash
# Everything a GPU must confirm about rlr_fast, in one command of under 8 minutes (issue 9, section 2).
#
#   bash bench/gpu_wheels.sh                  # here, first: the wheels the GPU image lacks -> .whl/
#   bash bench/gpu_check.sh                   # on the GPU machine, with .whl carried
#   bash bench/gpu_check.sh --dry-run         # on a CPU: the same stages and entry points, tiny shapes,
#                                             # the current environment, results in a scratch folder
#                                             # (tests/test_gpu_check.py runs it)
#   bash bench/gpu_check.sh --stages tests,speed   # a subset, e.g. a rerun on a machine still warm
#   bash bench/gpu_check.sh --results DIR     # where results go (default bench/results; a dry run's
#                                             # default is a new folder under /tmp)
#
# With the device tool: run(command="bash bench/gpu_check.sh", carry=[".whl"], timeout_s=500); the
# results come back through $OUT, copied there after every stage, so a run cut short keeps what it measured.
#
# Stages, in this order (what the goals need first), each under its own time limit; the limits and
# the report add up to under BUDGET_S:
#   setup   install .whl/*.whl into $SITE (first on PYTHONPATH); print the GPU, driver and versions
#   build   pip install -e . --no-build-isolation: rlr_fast._C with the .cu compiled for this GPU (CUDA_HOME
#           from /usr/local/cuda where its headers are); print build_info() and fail unless the CUDA
#           kernels and Triton are there. A failed build fails this stage only: rlr_fast then runs from
#           the source tree on Triton and the reference, and the stages below still measure
#   memory  bench/memory.py --quick: torch.cuda.max_memory_allocated (and max_memory_reserved) of SD1.4
#           updates under the planner's plan next to its estimate, the goal's case first, each row
#           written as it is measured; its last line peak_gib=<v> MEASURED|ESTIMATED
#   speed   bench/speed.py: fused kernel GB/s vs HBM peak, a plain copy_ (the achievable ceiling) and
#           unfused PyTorch; rollouts (T = 50, batch 1 and 4, eager and CUDA graph) vs the diffusers
#           loop; one RLR update vs the naive one-graph update, truncated backprop, DDPO; achieved
#           TFLOP/s vs dense fp16 peak. Its files are rewritten after every row
#   tests   the GPU tests natively (TRITON_INTERPRET unset): Triton compiled and _C's CUDA kernels vs
#           the reference in every dtype (fp32 log-densities for fp16/bf16 inputs), the contract on
#           every backend, CUDA-graph rollout vs eager (plain and under a prompt schedule), finetune
#           replaying its rollouts from a CUDA graph, NVTX ranges reaching a real backend.
#           RLR_FAST_REQUIRE_GPU=1 makes a missing GPU or compiled Triton a failure, not skips
#   ncu     Nsight Compute on the fused forward kernels (Triton and CUDA), selected by the dispatcher's
#           NVTX range "ddim_step"; bounded (2^22 elements, 4 kernels) to finish in half its limit
# Then bench/gpu_report.py writes <results>/<gpu>.md with every figure, the device, driver, torch and
# date, and with $OUT set the files this run wrote (at most 8) are copied there. Exits 1 when any
# stage but ncu failed, ran out of time or was skipped for lack of time (ncu needs hardware counters
# that some machines refuse).
set -uo pipefail
cd "$(dirname "$0")/.."

DRY_RUN=0
STAGES="setup,build,tests,ncu,memory,speed"
RESULTS=
while (($#)); do
  case $1 in
    --dry-run) DRY_RUN=1 ;;
    --stages) STAGES=$2; shift ;;
    --results) RESULTS=$2; shift ;;
    *) echo "usage: bash bench/gpu_check.sh [--dry-run] [--stages a,b] [--results DIR]" >&2; exit 2 ;;
  esac
  shift
done

GPU_BUDGET_S=455  # the whole GPU run: what a device session has left for it after the machine's start
REPORT_S=15       # kept back for the report
# Each stage's limit on the GPU; with REPORT_S they add up to 445 s, under GPU_BUDGET_S (tests/test_gpu_check.py)
declare -A LIMIT=([setup]=30 [build]=100 [memory]=70 [speed]=145 [tests]=55 [ncu]=30)
ORDER=(setup build memory speed tests ncu)
SLOWER=$((DRY_RUN ? 3 : 1))  # the dry run's stages on a busy 2-core CPU, against the GPU machine's 16 cores
for name in "${ORDER[@]}"; do LIMIT[$name]=$((SLOWER * LIMIT[$name])); done
BUDGET_S=${BUDGET_S:-$((SLOWER * GPU_BUDGET_S))}
GPU_TESTS="tests/test_kernels.py tests/test_compiled.py tests/test_ddim.py tests/test_cuda_graph.py
 tests/test_profiling.py tests/test_train.py::test_finetune_on_a_gpu_replays_its_rollouts_from_a_cuda_graph
 tests/test_step_conditioning.py::test_graph_rollout_under_schedule_equals_eager_on_gpu"
PY=${PYTHON:-python3}
SITE=/tmp/rlr_fast_site
if [ -z "$RESULTS" ]; then  # a dry run never writes into the repository's committed results
  if ((DRY_RUN)); then RESULTS=$(mktemp -d /tmp/gpu_check_dry_run.XXXXXX); else RESULTS=bench/results; fi
fi
mkdir -p "$RESULTS"
RESULTS=$(cd "$RESULTS" && pwd)
WORK=$(mktemp -d)
touch "$WORK/start"  # files in RESULTS newer than this are this run's
LOG=$RESULTS/gpu_check.log
: >"$LOG"
export PY SITE WORK RESULTS DRY_RUN GPU_TESTS PYTHONUNBUFFERED=1 RLR_FAST_BENCH_RESULTS=$RESULTS
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1  # the GPU machine has no network: fail fast, never wait on a hub
if ((!DRY_RUN)) && [ -z "${CUDA_HOME:-}" ] && [ -f /usr/local/cuda/include/cuda_runtime.h ]; then
  # torch otherwise takes the toolkit from `which nvcc`, and a wrapper in /usr/local/bin links without -lcudart
  export CUDA_HOME=/usr/local/cuda
fi
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
  echo "results go to $RESULTS"
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
  echo "nvcc: $(command -v nvcc || echo none); CUDA_HOME=${CUDA_HOME:-unset}"
  command -v nvcc >/dev/null && nvcc --version | tail -2
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
  # The target: the kernel section of bench/speed.py, each fused backend's forward run once inside
  # the NVTX range "ddim_step" (RLR_FAST_PROFILE=1 switches the ranges on): 2 kernels (step, finalize)
  # each for Triton and CUDA, 2^22 elements per tensor (6 x 8 MiB moved, ncu flushes the caches between
  # passes). ncu prints only when the target exits: -c 4 stops profiling there, and its limit is twice
  # what it needs.
  local target=(env RLR_FAST_PROFILE=1 RLR_FAST_BENCH_RESULTS="$WORK" "$PY" bench/speed.py --sections kernel
                --repeats 1 --warmup 0 --calls 1 --kernel-elements $((1 << 22)))
  if ((DRY_RUN)); then
    echo "dry run: the ncu target alone, without ncu"
    "${target[@]}"
    return
  fi
  local ncu
  ncu=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda/bin/ncu 2>/dev/null | head -1)
  [ -n "$ncu" ] || { echo "ncu not found" >&2; return 1; }
  "$ncu" --nvtx --nvtx-include "ddim_step/" --clock-control none --target-processes all -c 4 \
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
START=$SECONDS

copy_out() {  # what this run has written so far, into $OUT: a run cut short still returns it
  [ -n "${OUT:-}" ] || return 0
  find "$RESULTS" -maxdepth 1 -type f -newer "$WORK/start" -exec cp {} "$OUT/" \;
}

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
  copy_out
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

echo "results: $RESULTS"
copy_out
[ -n "${OUT:-}" ] && echo "copied to \$OUT: $(ls "$OUT" | tr '\n' ' ')"
rm -rf "$WORK"

failed=0
[ -n "${REPORT:-}" ] || failed=1
for name in setup build memory speed tests; do
  case ${STATUS[$name]} in ok | "not selected") ;; *) failed=1 ;; esac
done
exit $failed
