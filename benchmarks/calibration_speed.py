"""Calibration wall time, peak RSS and per-module breakdown; prints Markdown tables, writes JSON.

Each model runs in its own fresh process so that its peak RSS is its own. The shared ViT-Tiny is
calibrated on the reference calibration tensors (calib32, no augmentation noise); the other
models are randomly initialised and calibrated on seeded random images of the same count,
which costs the same as real images.

Example (the issue's benchmark):
    python benchmarks/calibration_speed.py --out benchmarks/logs/calibration_speed.json

``--blocks N`` keeps only the first N transformer blocks of ViT/DeiT models (then the head), or of
a Swin model's longest stage (the others whole): a quick per-module breakdown, e.g. ``--models
vit_tiny_patch16_224 --blocks 1``, or a measured part of a model too slow to calibrate whole; the
JSON then also holds the whole model's time extrapolated from the mean block of that sequence
(``extrapolated_seconds``, said so in the table).

``--reconstruct PRESET`` then reconstructs the calibrated model (``fast``: the CLI's default) on
the same images and records its time and the peak RSS of the whole process, extrapolated the same
way under ``--blocks`` (``recon_extrapolated_seconds``).

Any timm ViT/DeiT/Swin name works (random weights unless shared ones exist), at its own input
size; ``--device cuda`` calibrates on a GPU and records ``torch.cuda.max_memory_allocated``.
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
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from adalog.config import AdaLogConfig
from adalog.devices import resolve_device
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


def _calibration_images(model: torch.nn.Module, name: str, n_images: int):
    if name == VIT_TINY and REFERENCE_CALIB.exists():
        return load_file(REFERENCE_CALIB)["x"][:n_images], "reference calib32 tensors"
    _, height, width = model.pretrained_cfg.get("input_size", (3, 224, 224))
    gen = torch.Generator().manual_seed(0)
    return torch.randn(n_images, 3, height, width, generator=gen), "seeded random images"


@dataclass(frozen=True)
class Truncation:
    """The block sequence cut short: its module-name prefix, blocks kept, its full depth, and
    the blocks of the model outside it (a Swin model's other stages)."""

    prefix: str
    kept: int
    depth: int
    other_blocks: int = 0


def _extrapolated(timings: dict[str, float], cut: Truncation) -> float:
    """Whole-model seconds from a run of the first ``kept`` of ``depth`` blocks of the cut
    sequence: that sequence's mean block times ``depth``; the capture passes scaled by the
    blocks of the whole model over those run; the other modules as measured."""
    in_cut = sum(t for m, t in timings.items() if m.startswith(cut.prefix))
    capture = timings.get("capture", 0.0)
    outside = sum(timings.values()) - in_cut - capture
    ratio = (cut.depth + cut.other_blocks) / (cut.kept + cut.other_blocks)
    return in_cut / cut.kept * cut.depth + capture * ratio + outside


def _truncate(model: torch.nn.Module, n_blocks: int | None) -> Truncation | None:
    """Keep the first ``n_blocks`` blocks of a ViT/DeiT, or of a Swin model's longest stage."""
    if n_blocks is None:
        return None
    if hasattr(model, "blocks"):
        depth = len(model.blocks)
        model.blocks = model.blocks[:n_blocks]
        return Truncation("blocks.", min(n_blocks, depth), depth)
    if hasattr(model, "layers"):
        sizes = [len(layer.blocks) for layer in model.layers]
        stage = max(range(len(sizes)), key=sizes.__getitem__)
        model.layers[stage].blocks = model.layers[stage].blocks[:n_blocks]
        kept = min(n_blocks, sizes[stage])
        return Truncation(f"layers.{stage}.blocks.", kept, sizes[stage], sum(sizes) - sizes[stage])
    raise SystemExit(f"--blocks needs a ViT/DeiT/Swin model, not {type(model)}")


def _reconstruct(model, images, preset: str, cut: Truncation | None) -> dict:
    """Time the reconstruction of the calibrated ``model``; per-unit seconds kept."""
    from adalog.pipelines.reconstruct import reconstruct
    from adalog.recon.config import ReconstructConfig

    stats: dict[str, dict] = {}
    start = time.perf_counter()
    reconstruct(model, images, ReconstructConfig.preset(preset), stats=stats)
    out = {
        "reconstruct": preset,
        "recon_seconds": time.perf_counter() - start,
        "recon_seconds_by_unit": {unit: record["seconds"] for unit, record in stats.items()},
    }
    if cut is not None:
        out["recon_extrapolated_seconds"] = _extrapolated(out["recon_seconds_by_unit"], cut)
    return out


def _run_one(
    name: str,
    config_dict: dict,
    n_images: int,
    n_blocks: int | None,
    workers: int,
    device: str,
    reconstruct: str | None,
    queue,
) -> None:
    config = AdaLogConfig.from_dict(config_dict)
    device = resolve_device(device)
    weights = SHARED_WEIGHTS.get(name)
    if weights is not None and weights.exists():
        model, source = create_model(name, weights=str(weights)), "shared weights"
    else:
        torch.manual_seed(0)
        model, source = create_model(name, pretrained=False), "random init"
    cut = _truncate(model, n_blocks)
    images, image_source = _calibration_images(model, name, n_images)
    model.to(device)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    calibrate(model, images, config, timings=timings, search_workers=workers)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    total = time.perf_counter() - start
    extra = {}
    if cut is not None:
        extra["extrapolated_seconds"] = _extrapolated(timings, cut)
        extra["blocks_measured"], extra["depth"] = cut.kept, cut.depth
        extra["truncated"] = cut.prefix.rstrip(".")
    calib_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if device.type == "cuda":
        extra["cuda_max_memory_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
        extra["gpu"] = torch.cuda.get_device_name(device)
    if reconstruct is not None:
        extra |= _reconstruct(model, images, reconstruct, cut)
        if device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(device) / 2**20
            extra["recon_cuda_max_memory_mb"] = peak
    queue.put(
        {
            "model": name if n_blocks is None else f"{name} (first {n_blocks} blocks)",
            "device": str(device),
            "weights": source,
            "images": f"{images.shape[0]} {image_source}",
            "calib_seconds": total,
            "calib_peak_rss_mb": calib_rss,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "seconds_by_kind": seconds_by_kind(timings),
            "seconds_by_module": timings,
            "search_workers": workers,
            "threads": torch.get_num_threads(),
            **extra,
        }
    )


def run_isolated(
    name: str,
    config: AdaLogConfig,
    n_images: int,
    n_blocks: int | None,
    workers: int,
    device: str = "cpu",
    reconstruct: str | None = None,
) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    args = (name, config.to_dict(), n_images, n_blocks, workers, device, reconstruct, queue)
    proc = ctx.Process(target=_run_one, args=args)
    proc.start()
    result = queue.get()
    proc.join()
    return result


def print_tables(rows: list[dict]) -> None:
    columns = ["model", "weights", "device", "calibration", "whole model (extrapolated)"]
    columns += ["peak RSS", "GPU memory", "reconstruction", "whole (extrapolated)", "peak RSS"]
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for r in rows:
        blocks = f" ({r.get('blocks_measured')} of {r.get('depth')} blocks measured)"
        whole = r.get("extrapolated_seconds")
        whole = f"{whole / 60:.1f} min{blocks}" if whole else "–"
        gpu = f"{r['cuda_max_memory_mb']:.0f} MB" if "cuda_max_memory_mb" in r else "–"
        recon = recon_whole = recon_rss = "–"
        if "recon_seconds" in r:
            recon = f"{r['recon_seconds'] / 60:.1f} min ({r['reconstruct']})"
            recon_rss = f"{r['peak_rss_mb']:.0f} MB"
            if "recon_extrapolated_seconds" in r:
                recon_whole = f"{r['recon_extrapolated_seconds'] / 60:.1f} min"
        calib_rss = r.get("calib_peak_rss_mb", r["peak_rss_mb"])
        print(
            f"| {r['model']} | {r['weights']} | {r.get('device', 'cpu')} "
            f"| {r['calib_seconds'] / 60:.1f} min | {whole} | {calib_rss:.0f} MB | {gpu} "
            f"| {recon} | {recon_whole} | {recon_rss} |"
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
    parser.add_argument(
        "--blocks", type=int, help="keep only the first N blocks (ViT/DeiT; Swin: longest stage)"
    )
    parser.add_argument(
        "--reconstruct", choices=("fast", "reference"), help="then time this reconstruction"
    )
    parser.add_argument("--set", nargs="*", default=[], help="config overrides key=JSON")
    parser.add_argument(
        "--search-workers", type=int, default=1, help="module searches run at once (default 1)"
    )
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or auto")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    overrides = {k: json.loads(v) for k, v in (item.split("=", 1) for item in args.set)}
    config = AdaLogConfig.preset(args.preset, search_engine=args.engine, **overrides)
    rows = []
    for name in args.models:
        rows.append(
            run_isolated(
                name,
                config,
                args.images,
                args.blocks,
                args.search_workers,
                args.device,
                args.reconstruct,
            )
        )
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
