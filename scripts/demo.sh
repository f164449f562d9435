#!/usr/bin/env bash
# The main job on this machine: learn two sample concepts, one after the other, into the tiny base
# model (CPU), then write sample images and print the info table. Sets up .venv if needed.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
out=outputs/demo
rm -rf "$out" && mkdir -p "$out"
cns=.venv/bin/cns
$cns learn data/samples/dog --model-dir "$out/model"
$cns learn data/samples/cat2 --model-dir "$out/model"
$cns generate "a photo of a <dog1> dog" "a photo of a <cat2> cat" "a <dog1> dog and a <cat2> cat on a sofa" \
  --model-dir "$out/model" --out "$out/samples"
$cns info --model-dir "$out/model"
echo "model: $out/model   samples: $out/samples (grid.png)"
