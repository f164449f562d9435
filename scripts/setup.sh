#!/usr/bin/env bash
# Create .venv and install cns-pipeline with everything the demo and the tests need.
# Idempotent: reinstalls only when pyproject.toml or this script changed.
#
# torch: kept if the venv already has one (install your CUDA build first on a GPU machine, or set
# CNS_TORCH_SPEC, e.g. CNS_TORCH_SPEC="torch==2.13.0" on a CUDA machine). Otherwise a CPU machine
# gets the CPU build of torch 2.13.0: from a local wheel when pip's find-links has one, else from
# PyTorch's CPU index; a plain `pip install torch` would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=(.venv/bin/python -m pip)
stamp=".venv/.cns-setup-$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
[ -f "$stamp" ] && exit 0

echo "setting up .venv (first run takes a few minutes)..." >&2
"${PIP[@]}" install -q --upgrade pip
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if [ -n "${CNS_TORCH_SPEC:-}" ]; then
    "${PIP[@]}" install -q "$CNS_TORCH_SPEC"
  elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    "${PIP[@]}" install -q "torch==2.13.0"            # PyPI's Linux build is the CUDA one
  elif ls ${PIP_FIND_LINKS:-/opt/wheels}/torch-2.13.0+cpu-* >/dev/null 2>&1; then
    "${PIP[@]}" install -q "torch==2.13.0"            # local CPU wheel
  else
    "${PIP[@]}" install -q "torch==2.13.0" --extra-index-url https://download.pytorch.org/whl/cpu
  fi
fi
"${PIP[@]}" install -q -e ".[pipeline,bench,test]"
rm -f .venv/.cns-setup-*
touch "$stamp"
