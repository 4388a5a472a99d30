#!/usr/bin/env bash
# Download the Python wheels a GPU machine of the device tool lacks into .whl/ (git-ignored), for
# bench/gpu_check.sh to install there: that machine reaches no package index, runs Python 3.12 on
# x86-64 and has its own CUDA torch, Triton, transformers, accelerate and safetensors.
#   diffusers, peft   the versions requirements.txt pins (the image has no diffusers; its peft may differ)
#   nvtx              NVTX ranges from Python (rlr_fast.profiling); not in the image
# Never torch (nor triton): a second torch would shadow the machine's CUDA build. diffusers' other
# needs are in the image (it imports importlib.metadata from the standard library on 3.12).
#
#   bash bench/gpu_wheels.sh     # then carry ".whl" in the device tool's run (bench/gpu_check.sh header)
set -euo pipefail
cd "$(dirname "$0")/.."

pinned() {  # name==version as requirements.txt pins it
  grep -iE "^$1==" requirements.txt || { echo "requirements.txt pins no version of $1" >&2; exit 1; }
}
PACKAGES=("$(pinned diffusers)" "$(pinned peft)" "nvtx==0.2.17")
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64)
LIMIT_MIB=32  # the device tool carries at most 64 MiB, the repository included

rm -rf .whl
mkdir -p .whl
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${PLATFORMS[@]/#/--platform=}" -d .whl "${PACKAGES[@]}"

if ls .whl | grep -qiE '^(torch|triton)-'; then
  echo "a torch or triton wheel landed in .whl/; it would shadow the GPU machine's own" >&2
  exit 1
fi
total=$(du -cb .whl/*.whl | tail -1 | cut -f1)
ls -l .whl
echo "wheels: ${PACKAGES[*]}; total $((total / 1024)) KiB"
if (( total > LIMIT_MIB * 1024 * 1024 )); then
  echo "the wheels exceed ${LIMIT_MIB} MiB; the device tool's 64 MiB must hold the repository too" >&2
  exit 1
fi
