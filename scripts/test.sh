#!/usr/bin/env bash
# Set up (scripts/setup.sh), lint, type-check, and run the whole offline test suite on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
.venv/bin/ruff check --quiet .
.venv/bin/ruff format --check --quiet .
.venv/bin/mypy
exec .venv/bin/python -m pytest -q tests "$@"
