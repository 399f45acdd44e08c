#!/usr/bin/env bash
# Issue 5: the straightforward (naive) search engine over the whole ViT-Tiny W4A4, float64, on the
# reference calibration tensors, split over two one-thread processes (the runs of 2026-12-05
# before the split ran it as one). Rerunning the script resumes both; run it with setsid nohup,
# it waits for both.
#   A: runs/naive_f64_progress, the naive engine up to blocks.7, then stopped.
#   B: runs/naive_f64_progress_b, a copy of A's progress after blocks.3. The fast engine redoes
#      blocks 4-7 (only their FP tensors matter to block 8's FP captures), then the naive engine
#      calibrates blocks 8-11 and the head.
# Then benchmarks/merge_progress.py takes A's blocks 4-7 into B's progress (refused unless their
# FP tensors are bit-identical, i.e. B's naive blocks saw the captures a single run would have),
# and a last resume of the merged progress (two threads) saves and evaluates the single run's model.
# 2026-12-05: one thread per process took 34-41 min per naive block, as long as one process on
# two threads (the unsplit run), so the split halves the wall time.
set -u
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
A=runs/naive_f64_progress B=runs/naive_f64_progress_b M=runs/naive_f64_progress_merged
LOGS=benchmarks/logs
TAG=${TAG:-s19}
run() {  # progress dir, engine, save dir, out json, log (the engine is part of the fingerprint)
  OMP_NUM_THREADS=${THREADS:-1} $PY benchmarks/quantize_eval.py --preset w4a4 --dtype float64 \
    --calib-tensor ../shared/data/imagenet-sample/reference_calib32_vit_tiny.safetensors \
    --set "search_engine=\"$2\"" --resume "$1" --save "$3" --out "$4" > "$5" 2>&1
}
done_with() {  # progress dir, block
  $PY -c "import sys; from adalog.pipelines.runstore import read_progress_meta
sys.exit('$2' not in read_progress_meta('$1')['done_blocks'])" 2>/dev/null
}
set_engine() {  # progress dir, engine (rewritten atomically)
  $PY -c "
from adalog.models import read_state_dict
from adalog.pipelines.runstore import PROGRESS_WEIGHTS, read_progress_meta, write_progress
meta = read_progress_meta('$1'); meta['config']['search_engine'] = '$2'
write_progress('$1', read_state_dict('$1/' + PROGRESS_WEIGHTS), meta)"
}
stop_after() {  # progress dir, block: stop the run on that folder once the block is saved
  until done_with "$1" "$2"; do sleep 5; done
  pkill -f -- "--resume $1 --save"
}

[ -d "$B" ] || { cp -r "$A" "$B"; }  # made when A had finished blocks.3
if ! done_with "$A" blocks.7; then
  run "$A" naive /tmp/split_a_unused /tmp/split_a_unused.json \
    "$LOGS/vit_tiny_w4a4_refcalib_f64_naive_a_$TAG.log" &
  stop_after "$A" blocks.7 &
fi
if ! done_with "$B" blocks.7; then
  set_engine "$B" fast
  run "$B" fast /tmp/split_b_unused /tmp/split_b_unused.json \
    "$LOGS/vit_tiny_w4a4_refcalib_f64_split_b_fast_$TAG.log" &
  stop_after "$B" blocks.7; wait $!
fi
set_engine "$B" naive
if ! done_with "$B" head; then  # B's own model (fast blocks 4-7) is not evaluated
  run "$B" naive /tmp/split_b_unused /tmp/split_b_unused.json \
    "$LOGS/vit_tiny_w4a4_refcalib_f64_split_b_naive_$TAG.log" &
  stop_after "$B" head
fi
wait
$PY benchmarks/merge_progress.py "$B" "$A" --blocks blocks.4 blocks.5 blocks.6 blocks.7 --out "$M" \
  && THREADS=2 run "$M" naive runs/w4a4_refcalib_f64_naive "$LOGS/vit_tiny_w4a4_refcalib_f64_naive.json" \
    "$LOGS/vit_tiny_w4a4_refcalib_f64_naive_merged.log"
