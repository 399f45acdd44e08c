#!/usr/bin/env bash
# The issue-3 accuracy runs on the shared ViT-Tiny, one after another (about 15 min each on the
# 2-core machine). Each writes benchmarks/logs/<name>.json and .log; a finished run is skipped.
set -u
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
REF=../shared/data/imagenet-sample/reference_calib32_vit_tiny.safetensors
run() {  # name, then quantize_eval.py arguments
  local name=$1; shift
  [ -f "benchmarks/logs/$name.json" ] && { echo "skip $name"; return; }
  $PY benchmarks/quantize_eval.py "$@" --out "benchmarks/logs/$name.json" \
    > "benchmarks/logs/$name.log" 2>&1 && tail -1 "benchmarks/logs/$name.log"
}
DEIT=../shared/models/deit_tiny_patch16_224.fb_in1k_lnq.safetensors
run deit_tiny_w4a4_calib32_seed5 --model deit_tiny_patch16_224 --weights "$DEIT" --preset w4a4 --seed 5
run vit_tiny_w6a6_refcalib --preset w6a6 --calib-tensor "$REF"
for seed in 5 6 7; do
  run "vit_tiny_w3a3_calib32_seed$seed" --preset w3a3 --seed "$seed"
done
run vit_tiny_w3a3_refcalib --preset w3a3 --calib-tensor "$REF"
run vit_tiny_w4a4_calib32_seed5 --preset w4a4 --seed 5
