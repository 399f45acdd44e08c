#!/usr/bin/env bash
# Issue "beyond-reference presets": the reference and *-plus presets (calibrate only, with their
# light reconstruction, with the fast one) on the shared ViT-Tiny and DeiT-Tiny, several
# calibration seeds each, one run after another (12-40 min each on the 2-core machine). Each
# writes benchmarks/logs/<name>.json and .log and keeps its progress in runs/progress/<name>
# (calibration progress; reconstruction progress for the reconstructed rows, whose calibration
# restarts), so rerunning this script skips finished runs and resumes a cut one.
# To keep editing the tree meanwhile, run it from a copy of the whole repository (src and
# benchmarks together: the scripts import adalog modules of their own version).
set -u
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
REF=../shared/data/imagenet-sample/reference_calib32_vit_tiny.safetensors
DEIT=(--model deit_tiny_patch16_224 --weights ../shared/models/deit_tiny_patch16_224.fb_in1k_lnq.safetensors)
job() {  # name, benchmark script, then its arguments; skipped once its JSON exists
  local name=$1 script=$2; shift 2
  [ -f "benchmarks/logs/$name.json" ] && { echo "skip $name"; return; }
  $PY "benchmarks/$script" "$@" --resume "runs/progress/$name" --save "runs/$name" \
    --out "benchmarks/logs/$name.json" > "benchmarks/logs/$name.log" 2>&1 \
    && tail -1 "benchmarks/logs/$name.log"
}
run() {  # name, then quantize_eval.py arguments: calibrate only
  local name=$1; shift
  job "$name" quantize_eval.py "$@"
}
plus() {  # name, reconstruction preset, then reconstruct_eval.py arguments: what
  # `adalog quantize --preset *-plus` does (GPTQ left out: the reconstruction learns the rounding)
  local name=$1 recon=$2; shift 2
  job "$name" reconstruct_eval.py "$@" --set 'weight_rounding="nearest"' --reconstruct "$recon"
}
# adalog's reference configuration on the reference tensors: the fidelity record's checkpoint
run vit_tiny_w4a4_refcalib_fidelity --preset w4a4 --calib-tensor "$REF"
for seed in 5 6 7; do
  run "vit_tiny_w4a4plus_calib32_seed$seed" --preset w4a4-plus --seed "$seed"
  plus "vit_tiny_w4a4plus_light_calib32_seed$seed" light --preset w4a4-plus --seed "$seed"
done
# DeiT-Tiny: the reconstructing plus preset against the reference preset, three seeds
for seed in 6 7 5; do
  run "deit_tiny_w4a4_calib32_seed${seed}_ref" "${DEIT[@]}" --preset w4a4 --seed "$seed"
  plus "deit_tiny_w4a4plus_light_calib32_seed$seed" light "${DEIT[@]}" --preset w4a4-plus --seed "$seed"
done
for bits in w6a6 w3a3; do
  plus "vit_tiny_${bits}plus_light_calib32_seed5" light --preset "$bits-plus" --seed 5
  plus "deit_tiny_${bits}plus_light_calib32_seed5" light "${DEIT[@]}" --preset "$bits-plus" --seed 5
done
for bits in w6a6 w3a3; do
  run "deit_tiny_${bits}_calib32_seed5_ref" "${DEIT[@]}" --preset "$bits" --seed 5
  run "vit_tiny_${bits}_calib32_seed5_ref" --preset "$bits" --seed 5
done
plus vit_tiny_w4a4plus_fast_calib32_seed5 fast --preset w4a4-plus --seed 5
plus deit_tiny_w4a4plus_fast_calib32_seed5 fast "${DEIT[@]}" --preset w4a4-plus --seed 5
for seed in 5 6 7; do
  run "vit_tiny_w4a4_calib32_seed${seed}_ref" --preset w4a4 --seed "$seed"
  run "deit_tiny_w4a4plus_calib32_seed$seed" "${DEIT[@]}" --preset w4a4-plus --seed "$seed"
done
