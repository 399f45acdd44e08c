"""CPU throughput of an integer artifact (reference and fast engines) and of the FP32 model.

Engines: ``fp32`` (the timm model in plain torch FP32 eval: the same torch CPU runtime the fast
engine runs on), ``fake`` (the artifact's fake-quant float model), ``reference`` (int64 GEMMs)
and ``fast`` (int8 ``torch._int_mm``). For each engine and batch size: one warm-up forward, then
forwards of the same real dev-rest batch until ``--min-seconds`` have passed (at least
``--min-iters``); images/s counts forward time only. ``--top1-images N`` adds top-1 on the first
N dev-rest images per engine. Prints a Markdown table and writes JSON.

Example (one thread, as in benchmarks/RESULTS.md):
    python benchmarks/runtime_speed.py --threads 1 --top1-images 64 \
        --out benchmarks/logs/runtime_speed.json
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

from adalog.data import LabeledImageFolder, collate_skipping_bad, eval_transform, scan_image_folder
from adalog.io import atomic_write_json
from adalog.models import create_model
from adalog.pipelines.evaluate import evaluate
from adalog.pipelines.export import fake_quant_model, read_artifact
from adalog.runtime import build_integer_model

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
SAMPLE = SHARED / "data" / "imagenet-sample"
WEIGHTS = SHARED / "models" / "vit_tiny_patch16_224.augreg_in21k_ft_in1k.safetensors"
ENGINES = ("fp32", "fake", "reference", "fast")


def build(engine: str, artifact, weights: str) -> nn.Module:
    if engine == "fp32":
        return create_model(artifact.meta["model"], weights=weights)
    if engine == "fake":
        return fake_quant_model(artifact)
    return build_integer_model(artifact, engine)


@torch.no_grad()
def images_per_s(model: nn.Module, batch: torch.Tensor, min_seconds: float, min_iters: int):
    model(batch)  # warm-up
    done, elapsed = 0, 0.0
    while done < min_iters or elapsed < min_seconds:
        start = time.perf_counter()
        model(batch)
        elapsed += time.perf_counter() - start
        done += 1
    return done * batch.shape[0] / elapsed, done


def dev_rest(model: nn.Module, n: int) -> LabeledImageFolder:
    records = scan_image_folder(SAMPLE / "dev", exclude=SAMPLE / "calib32.txt")[:n]
    return LabeledImageFolder(records, eval_transform(model))


def measure(engine: str, artifact, args: argparse.Namespace) -> list[dict]:
    """Rows of one engine: images/s per batch size, top-1 if asked, kernel fallback if any."""
    model = build(engine, artifact, args.weights)
    data = dev_rest(model, max(args.batch_sizes))
    images = torch.stack([data[i][0] for i in range(len(data))])
    extra = {}
    if args.top1_images:
        loader = DataLoader(
            dev_rest(model, args.top1_images),
            batch_size=32,
            num_workers=0,
            collate_fn=collate_skipping_bad,
        )
        result = evaluate(model, loader, device="cpu", name=engine, progress=False)
        extra = {"top1": result.top1, "top1_n": result.n}
    fallback = getattr(getattr(model, "integer_kernel", None), "fallback_reason", None)
    if fallback:
        extra["kernel_fallback"] = fallback
    rows = []
    for batch_size in args.batch_sizes:
        batch = images[torch.arange(batch_size) % len(images)]
        speed, iters = images_per_s(model, batch, args.min_seconds, args.min_iters)
        print(f"{engine} batch {batch_size}: {speed:.2f} images/s ({iters} iters)", flush=True)
        rows.append({"engine": engine, "batch_size": batch_size, "images_per_s": speed} | extra)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifact", default=str(ROOT / "runs" / "w4a4_refcalib_art"))
    parser.add_argument("--weights", default=str(WEIGHTS), help="FP32 weights of the model")
    parser.add_argument("--engines", nargs="+", default=["fp32", "reference", "fast"])
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 32])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--min-seconds", type=float, default=5.0)
    parser.add_argument("--min-iters", type=int, default=2)
    parser.add_argument("--top1-images", type=int, default=0, help="0 skips the top-1 pass")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    unknown = set(args.engines) - set(ENGINES)
    if unknown:
        parser.error(f"unknown engines {sorted(unknown)}; choose from {ENGINES}")
    torch.set_num_threads(args.threads)

    artifact = read_artifact(args.artifact)
    rows = [row for engine in args.engines for row in measure(engine, artifact, args)]
    report = {
        "artifact": args.artifact,
        "model": artifact.meta["model"],
        "bits": artifact.meta["bits"],
        "threads": args.threads,
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "machine": platform.machine(),
        "rows": rows,
    }
    atomic_write_json(args.out, report)
    print(f"\nthreads = {args.threads}, torch {torch.__version__}\n")
    print("| engine | batch | images/s | ms/image | top-1 |")
    print("|---|---|---|---|---|")
    for row in rows:
        top1 = f"{row['top1']:.4f} (n={row['top1_n']})" if "top1" in row else "–"
        print(
            f"| {row['engine']} | {row['batch_size']} | {row['images_per_s']:.2f} "
            f"| {1000 / row['images_per_s']:.1f} | {top1} |"
        )


if __name__ == "__main__":
    main()
