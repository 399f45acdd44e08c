"""Bias correction after the fact: KL to FP and top-1 of a checkpoint with each correction mode.

Starts from a calibrated checkpoint (nearest or GPTQ rounding), unfolds the post-GELU shift,
applies :func:`adalog.pipelines.bias_correction.correct_biases` on seeded views of the
calibration images, folds the shift again and scores on the first ``--images`` dev-rest images
(as ``gptq_layers.py``).
``--full-eval`` also evaluates every variant on all of dev-rest in float32 and float64.

Example:
    python benchmarks/bias_correction.py runs/w4a4_refcalib_v2 --calib-tensor \\
        ../shared/data/imagenet-sample/reference_calib32_vit_tiny.safetensors --full-eval \\
        --out benchmarks/logs/bias_correction_w4a4.json
"""

from __future__ import annotations

import argparse
import time

from gptq_layers import PosthocSetup, full_eval

from adalog.io import atomic_write_json
from adalog.pipelines.bias_correction import correct_biases
from adalog.pipelines.calibrate import fold_post_gelu_shift
from adalog.pipelines.checkpoint import load_quantized
from adalog.pipelines.reconstruct import unfold_post_gelu_shift


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("qdir", help="calibrated checkpoint")
    parser.add_argument("--calib-tensor", help="safetensors with calibration inputs 'x'")
    parser.add_argument("--modes", nargs="+", default=["layer", "network"])
    parser.add_argument("--views", type=int, default=256)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--full-eval", action="store_true")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    setup = PosthocSetup.load(args.qdir, args.calib_tensor, args.views, args.images)
    base, config = setup.base, setup.config

    models = {"none": base}
    rows = [{"mode": "none", "seconds": 0.0} | setup.score(base)]
    for mode in args.modes:
        model = load_quantized(args.qdir)
        unfold_post_gelu_shift(model)
        start = time.perf_counter()
        correct_biases(model, setup.views, mode, config.calib_batch_size, progress=True)
        seconds = time.perf_counter() - start
        fold_post_gelu_shift(model)
        models[mode] = model
        rows.append({"mode": mode, "seconds": seconds} | setup.score(model))
        print(rows[-1], flush=True)
    result = {"qdir": args.qdir, "views": args.views, "images": args.images, "rows": rows}
    if args.full_eval:
        result["dev_rest"] = full_eval(models)
    atomic_write_json(args.out, result)
    print("| bias correction | KL to FP | argmax = FP | top-1 | seconds |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['mode']} | {r['kl_to_fp']:.3f} | {r['agree_with_fp']:.3f} | {r['top1']:.3f} "
            f"| {r['seconds']:.0f} |"
        )
    for name, scores in result.get("dev_rest", {}).items():
        print(f"dev-rest {name}: " + ", ".join(f"{k} {v:.4f}" for k, v in scores.items()))


if __name__ == "__main__":
    main()
