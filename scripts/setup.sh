#!/usr/bin/env bash
# Create .venv and install everything the worker and its tests need. Safe to run again.
# Without an NVIDIA GPU, torch is installed on its own first so that the CPU build is the one
# used: set TORCH_INDEX_URL to PyTorch's CPU wheel index where plain pip would pick CUDA.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
if ! command -v nvidia-smi >/dev/null 2>&1; then
  "${pip[@]}" torch==2.13.0 ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
fi
"${pip[@]}" -r requirements.txt -r requirements-dev.txt
# The package itself, editable (its dependencies are the requirements above). No build isolation:
# the setuptools pinned in requirements-dev.txt builds it, so a set-up venv re-runs offline.
"${pip[@]}" --no-deps --no-build-isolation -e .
.venv/bin/python -c 'import torch, diffusers, runpod; print("set up: torch", torch.__version__, "| diffusers", diffusers.__version__, "| runpod", runpod.__version__, "| cuda", torch.cuda.is_available())'
