"""Calibration wall time, peak RSS and per-module breakdown; prints Markdown tables, writes JSON.

Each model runs in its own fresh process so that its peak RSS is its own. The shared ViT-Tiny is
calibrated on the reference calibration tensors (calib32, no augmentation noise); the other
models are randomly initialised and calibrated on seeded random images of the same count,
which costs the same as real images.

Example (the issue's benchmark):
    python benchmarks/calibration_speed.py --out benchmarks/logs/calibration_speed.json

``--blocks N`` keeps only the first N transformer blocks of ViT/DeiT models (then the head): a
quick per-module breakdown, e.g. ``--models vit_tiny_patch16_224 --blocks 1``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import re
import resource
import time
from collections import defaultdict
from pathlib import Path

import torch
from safetensors.torch import load_file

from adalog.config import AdaLogConfig
from adalog.io import atomic_write_json
from adalog.models import create_model
from adalog.pipelines.calibrate import calibrate

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
VIT_TINY = "vit_tiny_patch16_224"
VIT_TINY_WEIGHTS = SHARED / "models" / "vit_tiny_patch16_224.augreg_in21k_ft_in1k.safetensors"
SHARED_WEIGHTS = {VIT_TINY: VIT_TINY_WEIGHTS}
REFERENCE_CALIB = SHARED / "data" / "imagenet-sample" / "reference_calib32_vit_tiny.safetensors"
DEFAULT_MODELS = [VIT_TINY, "deit_small_patch16_224", "swin_tiny_patch4_window7_224"]


def module_kind(name: str) -> str:
    """``blocks.3.attn.qkv`` → ``attn.qkv``; ``layers.1.blocks.0.mlp.fc2`` → ``mlp.fc2``."""
    return re.sub(r"^(layers\.\d+\.)?(blocks\.\d+\.)?", "", name)


def seconds_by_kind(timings: dict[str, float]) -> dict[str, float]:
    """Calibration seconds summed per module kind (``attn.qkv``, ``mlp.fc2``, ``capture``...)."""
    by_kind: dict[str, float] = defaultdict(float)
    for module, seconds in timings.items():
        by_kind[module_kind(module)] += seconds
    return dict(by_kind)


def _calibration_images(name: str, n_images: int) -> tuple[torch.Tensor, str]:
    if name == VIT_TINY and REFERENCE_CALIB.exists():
        return load_file(REFERENCE_CALIB)["x"][:n_images], "reference calib32 tensors"
    size = 224
    gen = torch.Generator().manual_seed(0)
    return torch.randn(n_images, 3, size, size, generator=gen), "seeded random images"


def _truncate(model: torch.nn.Module, n_blocks: int | None) -> None:
    if n_blocks is None:
        return
    if not hasattr(model, "blocks"):
        raise SystemExit(f"--blocks needs a ViT/DeiT model with .blocks, not {type(model)}")
    model.blocks = model.blocks[:n_blocks]


def _run_one(
    name: str, config_dict: dict, n_images: int, n_blocks: int | None, workers: int, queue
) -> None:
    config = AdaLogConfig.from_dict(config_dict)
    weights = SHARED_WEIGHTS.get(name)
    if weights is not None and weights.exists():
        model, source = create_model(name, weights=str(weights)), "shared weights"
    else:
        torch.manual_seed(0)
        model, source = create_model(name, pretrained=False), "random init"
    _truncate(model, n_blocks)
    images, image_source = _calibration_images(name, n_images)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    calibrate(model, images, config, timings=timings, search_workers=workers)
    total = time.perf_counter() - start
    queue.put(
        {
            "model": name if n_blocks is None else f"{name} (first {n_blocks} blocks)",
            "weights": source,
            "images": f"{images.shape[0]} {image_source}",
            "calib_seconds": total,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "seconds_by_kind": seconds_by_kind(timings),
            "seconds_by_module": timings,
            "search_workers": workers,
            "threads": torch.get_num_threads(),
        }
    )


def run_isolated(
    name: str, config: AdaLogConfig, n_images: int, n_blocks: int | None, workers: int
) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    args = (name, config.to_dict(), n_images, n_blocks, workers, queue)
    proc = ctx.Process(target=_run_one, args=args)
    proc.start()
    result = queue.get()
    proc.join()
    return result


def print_tables(rows: list[dict]) -> None:
    print("| model | weights | calibration | peak RSS |")
    print("|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} | {r['weights']} | {r['calib_seconds'] / 60:.1f} min "
            f"| {r['peak_rss_mb']:.0f} MB |"
        )
    for r in rows:
        # parallel searches overlap, so shares are of the summed search seconds, not wall time
        busy = sum(r["seconds_by_kind"].values())
        print(f"\n{r['model']}: seconds per module kind (all blocks)\n")
        print("| module | seconds | share |")
        print("|---|---|---|")
        for kind, sec in sorted(r["seconds_by_kind"].items(), key=lambda kv: -kv[1]):
            print(f"| {kind} | {sec:.1f} | {sec / busy:.0%} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=DEFAULT_MODELS)
    parser.add_argument("--preset", default="w4a4")
    parser.add_argument("--engine", default="fast", choices=["fast", "naive"])
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--blocks", type=int, help="keep only the first N blocks (ViT/DeiT)")
    parser.add_argument("--set", nargs="*", default=[], help="config overrides key=JSON")
    parser.add_argument(
        "--search-workers", type=int, default=1, help="module searches run at once (default 1)"
    )
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    overrides = {k: json.loads(v) for k, v in (item.split("=", 1) for item in args.set)}
    config = AdaLogConfig.preset(args.preset, search_engine=args.engine, **overrides)
    rows = []
    for name in args.models:
        rows.append(run_isolated(name, config, args.images, args.blocks, args.search_workers))
        payload = {
            "machine": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "preset": args.preset,
            "config": config.to_dict(),
            "results": rows,
        }
        atomic_write_json(args.out, payload)  # partial results survive an interruption
    print_tables(rows)


if __name__ == "__main__":
    main()
