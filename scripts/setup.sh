#!/usr/bin/env bash
# Create .venv and install kinship with its test extra. Torch is pinned to the CPU machines' wheels
# (pip takes them from local disk there); elsewhere any torch >= 2.4 with its torchvision works.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
if ! python -c "import torch, torchvision" 2>/dev/null; then
  python -m pip install -q "torch==${TORCH_VERSION:-2.14.1}" "torchvision==${TORCHVISION_VERSION:-0.29.1}" 2>&1 | grep -v "^WARNING: Location" || true
fi
python -m pip install -q -e ".[test]" 2>&1 | grep -v "^WARNING: Location" || true
python -c "import kinship, torch; print('kinship ready: torch', torch.__version__)"
