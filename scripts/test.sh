#!/usr/bin/env bash
# The whole test suite (CPU; Triton kernels under the interpreter). Run inside the venv.
set -euo pipefail
cd "$(dirname "$0")/.."
export TRITON_INTERPRET=1
exec python -m pytest -q -n 2 --durations=15 tests "$@"
