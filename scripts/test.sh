#!/usr/bin/env bash
# The test suite: sets up .venv if needed, then runs pytest (CPU, offline). Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
exec .venv/bin/python -m pytest "$@"
