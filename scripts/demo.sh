#!/usr/bin/env bash
# Set up (scripts/setup.sh), then run the whole flow through the handler: upload nine generated
# photos, train the user's YAML on a tiny random-weight model (CPU, offline), list, locate the LoRA.
# Arguments go to `python -m devtools.demo` (--arch flux|sdxl|sd15, --steps N, --model ID).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export HF_HUB_DISABLE_PROGRESS_BARS=1 TRANSFORMERS_VERBOSITY=error DIFFUSERS_VERBOSITY=error
exec .venv/bin/python -m devtools.demo "$@"
