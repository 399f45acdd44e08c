"""Calibrate (or load a calibrated checkpoint), reconstruct, evaluate on dev-rest; print a table
row and write JSON (top-1/top-5, calibration and reconstruction seconds, peak RSS, per block,
and the mean KL divergence of the logits from the FP model's on dev-rest, smoother than top-1).

Example (ViT-Tiny W4A4, reference calibration tensors, fast reconstruction):
    python benchmarks/reconstruct_eval.py --calib-tensor \
        ../shared/data/imagenet-sample/reference_calib32_vit_tiny.safetensors \
        --reconstruct fast --out runs/w4a4_recon_fast.json --save runs/w4a4_recon_fast
Reuse a calibrated checkpoint (its bias fold is undone and redone with the new weights):
    python benchmarks/reconstruct_eval.py --quantized runs/w4a4_refcalib --calib-tensor ... \
        --reconstruct fast --rset iterations=200 --out runs/w4a4_recon_200.json
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import torch
from gptq_layers import batched_logits, dev_rest_head, fp_twin, score_logits
from safetensors.torch import load_file
from torch.utils.data import DataLoader, Subset

from adalog.config import AdaLogConfig
from adalog.io import atomic_write_json
from adalog.models import create_model
from adalog.pipelines.calibrate import calibrate, load_calibration_images
from adalog.pipelines.checkpoint import load_quantized, save_quantized
from adalog.pipelines.evaluate import build_eval_loader, evaluate
from adalog.pipelines.reconstruct import reconstruct
from adalog.pipelines.runstore import has_progress
from adalog.recon.config import ReconstructConfig

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
SAMPLE = SHARED / "data" / "imagenet-sample"


def _overrides(items: list[str]) -> dict:
    return {k: json.loads(v) for k, v in (item.split("=", 1) for item in items)}


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_tiny_patch16_224")
    parser.add_argument(
        "--weights",
        default=str(SHARED / "models" / "vit_tiny_patch16_224.augreg_in21k_ft_in1k.safetensors"),
    )
    parser.add_argument("--quantized", help="calibrated checkpoint to start from (no calibration)")
    parser.add_argument("--preset", default="w4a4")
    parser.add_argument("--set", nargs="*", default=[], help="calibration overrides key=JSON")
    parser.add_argument("--calib-tensor", help="safetensors file with calibration inputs 'x'")
    parser.add_argument("--calib-limit", type=int, help="use only the first N calibration images")
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument("--reconstruct", default="fast", help="preset or ReconstructConfig file")
    parser.add_argument("--rset", nargs="*", default=[], help="reconstruction overrides key=JSON")
    parser.add_argument("--eval-limit", type=int, help="evaluate only the first N dev-rest images")
    parser.add_argument("--out", required=True, help="JSON result file")
    parser.add_argument("--save", help="also save the reconstructed model to this directory")
    parser.add_argument(
        "--resume", help="reconstruction progress folder: saved after every unit, resumed on rerun"
    )
    return parser.parse_args()


def _model_and_config(args: argparse.Namespace):
    if args.quantized:
        model = load_quantized(args.quantized)
        return model, AdaLogConfig.from_dict(model.adalog_meta["config"])
    config = AdaLogConfig.preset(args.preset, seed=args.seed, **_overrides(args.set))
    return create_model(args.model, weights=args.weights), config


def _loader(model: torch.nn.Module, limit: int | None) -> DataLoader:
    loader = build_eval_loader(model, SAMPLE / "dev", exclude=SAMPLE / "calib32.txt")
    if limit is None:
        return loader
    subset = Subset(loader.dataset, range(min(limit, len(loader.dataset))))
    return DataLoader(subset, batch_size=loader.batch_size, collate_fn=loader.collate_fn)


def main() -> None:
    args = _parse()
    recon = ReconstructConfig.resolve(args.reconstruct).with_overrides(
        seed=args.seed, **_overrides(args.rset)
    )
    model, config = _model_and_config(args)
    if args.calib_tensor:
        images = load_file(args.calib_tensor)["x"]
    else:
        images = load_calibration_images(model, SAMPLE / "dev", SAMPLE / "calib32.txt", config)
    images = images[: args.calib_limit]
    calib_seconds = None
    if not args.quantized:
        start = time.perf_counter()
        calibrate(model, images, config)
        calib_seconds = time.perf_counter() - start
    eval_images, labels = dev_rest_head(model, args.eval_limit or 10**9)
    fp_logits, calib_fp_logits = _fp_logits(model, eval_images, images)
    calibrated_scores = score_logits(batched_logits(model, eval_images), fp_logits, labels)
    calib_before = _calib_scores(model, images, calib_fp_logits)
    stats: dict = {}
    resumed = bool(args.resume) and has_progress(args.resume)
    start = time.perf_counter()
    reconstruct(model, images, recon, stats=stats, resume_dir=args.resume)
    recon_seconds = time.perf_counter() - start
    if args.save:
        save_quantized(model, args.save)
    result = evaluate(model, _loader(model, args.eval_limit), name=model.adalog_meta["model"])
    scores = score_logits(batched_logits(model, eval_images), fp_logits, labels)
    row = result.to_json() | {
        "kl_to_fp": scores["kl_to_fp"],
        "agree_with_fp": scores["agree_with_fp"],
        "calibrated": calibrated_scores,
        "calib_kl_to_fp": {
            "calibrated": calib_before,
            "reconstructed": _calib_scores(model, images, calib_fp_logits),
        },
        "config": config.to_dict(),
        "reconstruct": recon.to_dict(),
        "calib_seconds": calib_seconds,
        "reconstruct_seconds": recon_seconds,
        "resumed": resumed,  # reconstruct_seconds then counts this process only
        "blocks": stats,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "calib_source": args.calib_tensor or "calib32.txt",
        "start": args.quantized or "calibration",
    }
    atomic_write_json(args.out, row)
    print(
        f"| {row['model']} | w{config.w_bits}a{config.a_bits} + {args.reconstruct} "
        f"{_overrides(args.rset) or ''} | {result.top1:.4f} | {result.top5:.4f} "
        f"| KL {scores['kl_to_fp']:.3f} (calibrated {calibrated_scores['kl_to_fp']:.3f}) "
        f"| {recon_seconds / 60:.1f} min | {row['peak_rss_mb']:.0f} MB |"
    )


def _calib_scores(model: torch.nn.Module, images: torch.Tensor, fp_logits: torch.Tensor) -> float:
    """Mean KL(FP || Q) of the logits on the calibration images (no labels needed)."""
    return score_logits(batched_logits(model, images), fp_logits, fp_logits.argmax(-1))["kl_to_fp"]


def _fp_logits(model: torch.nn.Module, *image_sets: torch.Tensor) -> list[torch.Tensor]:
    """Logits of the FP model on each image set: the calibrated model unfolded and in raw mode
    (its weights are the FP weights under nearest rounding, the only rounding reconstruction
    accepts)."""
    fp = fp_twin(model)
    return [batched_logits(fp, images) for images in image_sets]


if __name__ == "__main__":
    main()
