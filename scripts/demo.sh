#!/usr/bin/env bash
# The main job on the embedded local stack: sets up .venv if needed, starts SeaweedFS, MLflow and
# Prefect on 127.0.0.1 (kept running afterwards; `.venv/bin/cns stack down` stops them), drops three
# world concepts into the bucket, runs the watch and nightly flows (the world's pretrained model, CPU), and
# prints the MLflow and Prefect URLs, the model versions and where the sample images are.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error PREFECT_SERVER_ANALYTICS_ENABLED=false
exec .venv/bin/python -m flows.demo
