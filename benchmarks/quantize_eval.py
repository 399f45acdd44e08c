"""Calibrate a model with AdaLog and evaluate it on dev-rest; print a table row, write JSON.

Example (the shared benchmark, reference calibration tensors):
    python benchmarks/quantize_eval.py --preset w4a4 --calib-tensor \
        ../shared/data/imagenet-sample/reference_calib32_vit_tiny.safetensors --out runs/w4a4.json
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import torch
from calibration_speed import seconds_by_kind
from safetensors.torch import load_file

from adalog.config import AdaLogConfig
from adalog.io import atomic_write_json
from adalog.models import create_model
from adalog.pipelines.calibrate import calibrate, load_calibration_images
from adalog.pipelines.checkpoint import save_quantized
from adalog.pipelines.evaluate import build_eval_loader, evaluate
from adalog.pipelines.runstore import has_progress

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
SAMPLE = SHARED / "data" / "imagenet-sample"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_tiny_patch16_224")
    parser.add_argument(
        "--weights",
        default=str(SHARED / "models" / "vit_tiny_patch16_224.augreg_in21k_ft_in1k.safetensors"),
    )
    parser.add_argument("--preset", default="w4a4")
    parser.add_argument(
        "--set", nargs="*", default=[], help="config overrides key=value (JSON values)"
    )
    parser.add_argument(
        "--calib-tensor", help="safetensors file with tensor 'x' of calibration inputs"
    )
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument("--out", required=True)
    parser.add_argument("--save", help="also save the quantized model to this directory")
    parser.add_argument(
        "--resume", help="calibration progress folder: saved after every block, resumed on rerun"
    )
    parser.add_argument(
        "--search-workers", type=int, default=1, help="module searches run at once (default 1)"
    )
    parser.add_argument(
        "--dtype",
        choices=("float32", "float64"),
        default="float32",
        help="calibrate and evaluate in this float dtype (float64: no float32 rounding, e.g. to "
        "compare search engines)",
    )
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)

    overrides = {k: json.loads(v) for k, v in (item.split("=", 1) for item in args.set)}
    config = AdaLogConfig.preset(args.preset, seed=args.seed, **overrides)
    model = create_model(args.model, weights=args.weights).to(dtype)
    if args.calib_tensor:
        images = load_file(args.calib_tensor)["x"]
    else:
        images = load_calibration_images(model, SAMPLE / "dev", SAMPLE / "calib32.txt", config)
    images = images.to(dtype)
    timings: dict[str, float] = {}
    resumed = bool(args.resume) and has_progress(args.resume)
    start = time.perf_counter()
    workers = args.search_workers
    calibrate(
        model, images, config, resume_dir=args.resume, timings=timings, search_workers=workers
    )
    calib_seconds = time.perf_counter() - start  # of this process only, when resumed
    if args.save:
        save_quantized(model, args.save)
    loader = build_eval_loader(model, SAMPLE / "dev", exclude=SAMPLE / "calib32.txt")
    result = evaluate(model, loader, name=args.model, dtype=dtype)
    row = result.to_json() | {
        "preset": args.preset,
        "config": config.to_dict(),
        "calib_seconds": calib_seconds,
        "resumed": resumed,  # calib_seconds then counts this process only
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "calib_source": args.calib_tensor or "calib32.txt",
        "seconds_by_kind": seconds_by_kind(timings),
        "search_workers": args.search_workers,
        "dtype": args.dtype,
    }
    atomic_write_json(args.out, row)
    print(
        f"| {args.model} | {args.preset} {overrides or ''} | {result.top1:.4f} | {result.top5:.4f} "
        f"| {calib_seconds / 60:.1f} min | {row['peak_rss_mb']:.0f} MB |"
    )


if __name__ == "__main__":
    main()
