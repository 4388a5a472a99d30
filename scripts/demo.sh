#!/usr/bin/env bash
# Quick start, part 1: set up ./.venv (scripts/setup.sh) and fine-tune the embedded default model
# with RLR on CPU (the `demo` preset, a few minutes on 2 cores). Extra arguments go to
# `rlr-fast finetune`, e.g. `bash scripts/demo.sh --set train_steps=10`. A finished demo in out/demo
# is kept: run again with `--resume out/demo`, or `--set overwrite=true` to replace it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
rlr-fast finetune --preset demo "$@"
