#!/usr/bin/env bash
# Set up rlr_fast in ./.venv: the pinned CPU torch first, the rest constrained to it, then the
# compiled extension built against that torch.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q torch==2.13.0
python -m pip install -q -r requirements.txt -c constraints.txt
python -m pip install -q -e . --no-build-isolation -c constraints.txt
python -c "import rlr_fast, json; print(json.dumps(rlr_fast.build_info()))"
