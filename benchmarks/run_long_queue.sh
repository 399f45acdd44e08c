#!/usr/bin/env bash
# Long runs behind RESULTS.md's reconstruction, integer-runtime and W3A3 rows, one after another
# on the 2-core machine. Each writes benchmarks/logs/<name>.json and .log; a finished run is
# skipped, so rerunning the script resumes.
set -u
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
REF=../shared/data/imagenet-sample/reference_calib32_vit_tiny.safetensors
W=../shared/models/vit_tiny_patch16_224.augreg_in21k_ft_in1k.safetensors
run() {  # name, script, then its arguments
  local name=$1 script=$2; shift 2
  [ -f "benchmarks/logs/$name.json" ] && { echo "skip $name"; return; }
  $PY "benchmarks/$script" "$@" --out "benchmarks/logs/$name.json" \
    > "benchmarks/logs/$name.log" 2>&1 && tail -1 "benchmarks/logs/$name.log"
}
# issue 5: per-module breakdown of block 0 (W4A4, reference search sizes)
run calibration_speed_vit_tiny_block0 calibration_speed.py --models vit_tiny_patch16_224 --blocks 1
# issue 6: fast-preset reconstruction of the W4A4 checkpoint (calibrated on the same tensors)
run vit_tiny_w4a4_refcalib_recon_fast reconstruct_eval.py --quantized runs/w4a4_refcalib_v2 \
  --calib-tensor "$REF" --reconstruct fast --save runs/w4a4_refcalib_recon_fast
# issue 7: W8A8 checkpoint, its artifact, and both artifacts through the engines
run vit_tiny_w8a8_refcalib quantize_eval.py --preset w4a4 --set w_bits=8 a_bits=8 s_bits=8 conv_zp_cap=true \
  --calib-tensor "$REF" --save runs/w8a8_refcalib
[ -d runs/w8a8_refcalib_art ] || .venv/bin/adalog export runs/w8a8_refcalib --out runs/w8a8_refcalib_art
[ -d runs/w4a4_refcalib_v2_art ] || .venv/bin/adalog export runs/w4a4_refcalib_v2 --out runs/w4a4_refcalib_v2_art
for bits in w8a8 w4a4; do
  art=runs/${bits}_refcalib_art; [ "$bits" = w4a4 ] && art=runs/w4a4_refcalib_v2_art
  run "runtime_speed_$bits" runtime_speed.py --artifact "$art" --weights "$W" --threads 1
done
# issue 6: one switch at a time on top of the fast preset, same checkpoint and data (TUNE=0 skips)
if [ "${TUNE:-1}" = 1 ]; then
  for variant in 'token_norm:loss="token_norm"' 'revert:keep_if_worse=false' 'fisher:loss="fisher"' \
    'it1000:iterations=1000'; do
    run "vit_tiny_w4a4_refcalib_recon_fast_${variant%%:*}" reconstruct_eval.py \
      --quantized runs/w4a4_refcalib_v2 --calib-tensor "$REF" --reconstruct fast --rset "${variant#*:}"
  done
fi
# issues 3 and 6: W3A3 seed 7 (third seed), then its fast reconstruction (skipped with W3A3=0)
[ "${W3A3:-1}" = 0 ] && exit 0
run vit_tiny_w3a3_calib32_seed7 quantize_eval.py --preset w3a3 --seed 7 --save runs/w3a3_seed7
run vit_tiny_w3a3_seed7_recon_fast reconstruct_eval.py --quantized runs/w3a3_seed7 \
  --calib-tensor "$REF" --reconstruct fast --save runs/w3a3_seed7_recon_fast
