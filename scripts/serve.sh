#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the worker locally: RunPod's own FastAPI server on
# http://localhost:8000 (POST /runsync, /run). Extra arguments go to the worker.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/python handler_fast.py --rp_serve_api "$@"
