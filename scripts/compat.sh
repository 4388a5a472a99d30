#!/usr/bin/env bash
# Newer releases, tested rather than hoped for (issue 19): a scratch venv with the newest release of
# every dependency in requirements.txt but torch (held at constraints.txt's pin, as a CUDA machine holds
# its own), rlr_fast installed into it, then a fast subset: import outside the repository (the installed
# wheel) and from its root (the source tree, with the `kernels` distribution where a dependency brings
# it), a 2-step demo from the root, and the estimator, rollout, kernel and packaging tests. Then the GPU
# machine's older stack (Triton 3.6, transformers 5.17) over the same venv, kernel tests again.
# numpy's "Conversion of an array with ndim > 0 to a scalar" warning is an error here, as numpy 2.4.6 and
# 2.5 make it (Triton 3.6's interpreter tripped on it). Prints the versions tried and the outcome of each
# check; the last run's are in bench/results/compat.md. The subset takes minutes on 2 idle cores, far
# longer on busy ones.
#
#   nice -n 10 bash scripts/compat.sh            # venv in /tmp/rlr_fast_compat (COMPAT_DIR)
#   COMPAT_WHEEL=dist/rlr_fast-0.1.0-*.whl nice -n 10 bash scripts/compat.sh   # skip the build
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
SCRATCH=${COMPAT_DIR:-/tmp/rlr_fast_compat}
TORCH_PIN=$(grep -E '^torch==' constraints.txt)
PACKAGES=$(sed -e 's/#.*//' -e 's/[=<>!~ ].*//' requirements.txt | grep -v '^$' | tr '\n' ' ')
NUMPY_25="error:Conversion of an array with ndim:DeprecationWarning"
SUBSET=(tests/test_estimators.py tests/test_rollout.py tests/test_kernels.py tests/test_packaging.py)
declare -a OUTCOMES

check() {  # check NAME COMMAND...: run it, keep its log, record ok / FAILED
  local name=$1
  shift
  echo "=== $name"
  if "$@" >"$SCRATCH/$name.log" 2>&1; then OUTCOMES+=("$name: ok"); else OUTCOMES+=("$name: FAILED (exit $?)"); fi
  tail -3 "$SCRATCH/$name.log"
}

versions() {  # the installed versions of what rlr_fast runs on
  python -c 'import importlib.metadata as md
names = ("torch diffusers transformers peft accelerate triton numpy safetensors kernels huggingface_hub "
         "tokenizers pytest").split()
print(", ".join(f"{n} {d.version}" for n in names for d in list(md.distributions(name=n))[:1]))'
}

rm -rf "$SCRATCH"
mkdir -p "$SCRATCH"
python3 -m venv "$SCRATCH/venv"
. "$SCRATCH/venv/bin/activate"
python -m pip install -q --upgrade pip
python -m pip install -q "$TORCH_PIN"
# shellcheck disable=SC2086  # PACKAGES is a list of names
python -m pip install -q --upgrade --upgrade-strategy eager -c constraints.txt $PACKAGES || exit 1
# rlr_fast as a user installs it: a wheel (COMPAT_WHEEL: one built already against the same torch)
python -m pip install -q --no-deps --no-build-isolation "${COMPAT_WHEEL:-.}" || exit 1
echo "newest: $(versions)" | tee "$SCRATCH/versions.txt"

export TRITON_INTERPRET=1 OMP_NUM_THREADS=1
check import_outside bash -c "cd /tmp && python -c 'import rlr_fast, json; print(json.dumps(rlr_fast.build_info()))'"
# from the root, where kernels/ sits: transformers imports the `kernels` distribution when it is installed
check import_root python -c "import rlr_fast.train, kernels; print('kernels from', kernels.__path__)"
check demo_2_steps python -m rlr_fast finetune --preset demo --set train_steps=2 --set "out_dir=$SCRATCH/demo"
check tests_newest python -m pytest -q -p no:cacheprovider -p no:randomly -W "$NUMPY_25" -m "not slow" "${SUBSET[@]}"

python -m pip install -q "triton==3.6.0" "transformers==5.17.0" -c constraints.txt || exit 1
echo "gpu stack: $(versions)" | tee -a "$SCRATCH/versions.txt"
check tests_gpu_stack python -m pytest -q -p no:cacheprovider -p no:randomly -W "$NUMPY_25" -m "not slow" \
  tests/test_kernels.py tests/test_packaging.py

echo
cat "$SCRATCH/versions.txt"
printf '%s\n' "${OUTCOMES[@]}"
cd "$ROOT" && [[ "${OUTCOMES[*]}" != *FAILED* ]]
