#!/usr/bin/env bash
# The main job on a fresh machine: set up .venv, then train a small MoT model and its dense twin on the bundled
# corpus, evaluate both, generate samples and write report/. Arguments go to `mot-main` (see `mot-main --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh
.venv/bin/mot-main "$@"
