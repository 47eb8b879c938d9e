#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the whole offline test suite on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/python -m pytest -q tests "$@"
