"""Fast vs naive search engine on the first blocks of the shared ViT-Tiny: same parameters? speed?

The naive engine recomputes every candidate's layer output like the reference; a full model
takes hours with it, so this calibrates a truncated copy (the first ``--blocks`` blocks, then the
head) with both engines and compares every quantizer parameter. Prints a table, writes JSON.

Example:
    python benchmarks/engine_agreement.py --blocks 1 --out benchmarks/logs/engine_agreement.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from adalog.config import AdaLogConfig
from adalog.io import atomic_write_json
from adalog.models import create_model
from adalog.pipelines.calibrate import calibrate

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
WEIGHTS = SHARED / "models" / "vit_tiny_patch16_224.augreg_in21k_ft_in1k.safetensors"
CALIB = SHARED / "data" / "imagenet-sample" / "reference_calib32_vit_tiny.safetensors"


def calibrate_truncated(config: AdaLogConfig, n_blocks: int, images: torch.Tensor):
    model = create_model("vit_tiny_patch16_224", weights=str(WEIGHTS))
    model.blocks = model.blocks[:n_blocks]
    timings: dict[str, float] = {}
    start = time.perf_counter()
    calibrate(model, images, config, timings=timings)
    return model.state_dict(), time.perf_counter() - start, timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=1)
    parser.add_argument("--preset", default="w4a4")
    parser.add_argument("--set", nargs="*", default=[], help="config overrides key=JSON")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    overrides = {k: json.loads(v) for k, v in (item.split("=", 1) for item in args.set)}
    config = AdaLogConfig.preset(args.preset, **overrides)
    images = load_file(CALIB)["x"]
    runs = {
        engine: calibrate_truncated(
            config.with_overrides(search_engine=engine), args.blocks, images
        )
        for engine in ("fast", "naive")
    }
    fast, naive = runs["fast"][0], runs["naive"][0]
    quant_keys = [k for k in fast if "quant" in k]
    differing = [k for k in quant_keys if not torch.equal(fast[k], naive[k])]
    # FPCS children of different parents can sit within one float32 ulp of each other; the
    # engines' rounding may then pick the other one. Beyond that the choices differ for real.
    beyond_ulp = [k for k in differing if not torch.allclose(fast[k], naive[k], rtol=3e-7, atol=0)]
    rows = []
    for module in runs["fast"][2]:
        t_fast, t_naive = runs["fast"][2][module], runs["naive"][2][module]
        rows.append({"module": module, "fast_s": t_fast, "naive_s": t_naive})
    result = {
        "blocks": args.blocks,
        "preset": args.preset,
        "config": config.to_dict(),
        "quantizer_tensors": len(quant_keys),
        "differing": differing,
        "differing_beyond_one_ulp": beyond_ulp,
        "max_relative_difference": {
            k: ((fast[k] - naive[k]).abs().max() / naive[k].abs().max().clamp_min(1e-30)).item()
            for k in differing
        },
        "fast_seconds": runs["fast"][1],
        "naive_seconds": runs["naive"][1],
        "modules": rows,
    }
    atomic_write_json(args.out, result)
    print("| module | fast (s) | naive (s) | speed-up |")
    print("|---|---|---|---|")
    for r in rows:
        speedup = r["naive_s"] / max(r["fast_s"], 1e-9)
        print(f"| {r['module']} | {r['fast_s']:.1f} | {r['naive_s']:.1f} | {speedup:.1f}x |")
    print(
        f"\n{len(quant_keys) - len(differing)}/{len(quant_keys)} quantizer tensors bit-identical, "
        f"{len(differing) - len(beyond_ulp)} within one float32 ulp, "
        f"{len(beyond_ulp)} different: {beyond_ulp or 'none'}"
    )


if __name__ == "__main__":
    main()
