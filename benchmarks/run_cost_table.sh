#!/usr/bin/env bash
# The cost table of benchmarks/RESULTS.md ("What a run costs"): W4A4 calibration on 32 images of
# a DeiT-Small-, ViT-Base- and Swin-Small-sized model (random weights: the cost does not depend on
# them), the larger ones cut to a few blocks and extrapolated, and the `fast` reconstruction of
# DeiT-Small, one model per process on the idle machine. Each run writes its own JSON, so a cut
# queue reruns only what is missing.
set -u
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DEVICE=${DEVICE:-cpu}
run() {  # name, then calibration_speed.py arguments
  local name=$1; shift
  [ -f "benchmarks/logs/$name.json" ] && { echo "skip $name"; return; }
  $PY benchmarks/calibration_speed.py --device "$DEVICE" "$@" --out "benchmarks/logs/$name.json" \
    > "benchmarks/logs/$name.log" 2>&1 && grep -A3 "^| model" "benchmarks/logs/$name.log"
}
run "cost_deit_small_${DEVICE}" --models deit_small_patch16_224 --blocks 3 --reconstruct fast
run "cost_vit_base_${DEVICE}" --models vit_base_patch16_224 --blocks 1
run "cost_swin_small_${DEVICE}" --models swin_small_patch4_window7_224 --blocks 2
