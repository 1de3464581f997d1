#!/usr/bin/env bash
# Set up the project's virtual environment (if needed) and run lint and the test suite.
# Usage: bash scripts/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh
.venv/bin/ruff check .
.venv/bin/python -m pytest "$@"
