"""CPU throughput of an integer artifact (reference and fast engines) and of the FP32 model.

Engines: ``fp32`` (the timm model in plain torch FP32 eval: the same torch CPU runtime the fast
engine runs on), ``fp32-onednn`` (the same FP32 model with every ``nn.Linear`` on oneDNN's
prepacked fp32 GEMM instead of torch's default MKL sgemm: a stronger FP32 baseline on AMD CPUs,
where it is ~2.3x faster at these shapes), ``fake`` (the artifact's fake-quant float model),
``reference`` (exact int64 GEMMs), ``fast`` (int8 GEMMs, see adalog.runtime.fast), ``onnx`` (the
fast engine's graph as ONNX in ONNX Runtime, see adalog.runtime.onnx_engine) and ``fp32-onnx``
(the FP32 model's graph in ONNX Runtime: the same-engine baseline of ``onnx``).

Timing is interleaved in one process so that background load hits every engine alike: per batch
size, every model gets a warm-up forward, then rounds of one timed forward per engine (in turn)
until each engine has ``--min-seconds`` of forwards and ``--min-rounds`` rounds. images/s uses
the median forward time; ``vs_fp32`` is the median over rounds of the per-round ratio to
``fp32`` (paired, so slow drifts cancel). The batch is real dev-rest images (any ``--artifact``;
W8A8, W4A4, ...). ``--top1-images N`` adds top-1 on the first N dev-rest images per engine.
``--profile N`` adds, per engine, where N profiled forwards at the largest batch spend their
time (torch.profiler self CPU time: int8 GEMMs, fp32 GEMMs, everything else).
Prints Markdown tables and writes JSON.

Example (one thread, as in benchmarks/RESULTS.md):
    python benchmarks/runtime_speed.py --artifact runs/w8a8_refcalib_art --threads 1 \
        --engines fp32 fp32-onednn fast --out benchmarks/logs/runtime_speed_w8a8.json
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from adalog.data import LabeledImageFolder, collate_skipping_bad, eval_transform, scan_image_folder
from adalog.io import atomic_write_json
from adalog.models import create_model
from adalog.pipelines.evaluate import evaluate
from adalog.pipelines.export import fake_quant_model, read_artifact
from adalog.runtime import build_integer_model
from adalog.runtime.fast import onednn_linears
from adalog.runtime.onnx_engine import onnx_model

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
SAMPLE = SHARED / "data" / "imagenet-sample"
WEIGHTS = SHARED / "models" / "vit_tiny_patch16_224.augreg_in21k_ft_in1k.safetensors"
ENGINES = ("fp32", "fp32-onednn", "fp32-onnx", "fake", "reference", "fast", "onnx")
#: profiler op-name fragments per category (first match wins; the rest is "other")
OP_CATEGORIES = {
    "int8 GEMM": ("qlinear", "_int_mm"),
    "fp32 GEMM": ("_linear_pointwise", "aten::mm", "aten::bmm", "aten::addmm", "aten::linear"),
}


@torch.no_grad()
def profile_shares(model: nn.Module, batch: Tensor, forwards: int) -> dict[str, float]:
    """Self CPU milliseconds per forward of each op category."""
    from torch.profiler import ProfilerActivity, profile

    model(batch)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(forwards):
            model(batch)
    totals = dict.fromkeys([*OP_CATEGORIES, "other"], 0.0)
    for event in prof.key_averages():
        category = next(
            (c for c, keys in OP_CATEGORIES.items() if any(k in event.key for k in keys)), "other"
        )
        totals[category] += event.self_cpu_time_total / 1000.0 / forwards
    return totals


def build(engine: str, artifact, weights: str) -> nn.Module:
    if engine == "fp32":
        return create_model(artifact.meta["model"], weights=weights)
    if engine == "fp32-onednn":
        return onednn_linears(create_model(artifact.meta["model"], weights=weights))
    if engine == "fp32-onnx":
        return onnx_model(create_model(artifact.meta["model"], weights=weights))
    if engine == "fake":
        return fake_quant_model(artifact)
    if engine == "onnx":
        return onnx_model(build_integer_model(artifact, "fast"))
    return build_integer_model(artifact, engine)


@torch.no_grad()
def interleaved_times(
    models: dict[str, nn.Module], batch: Tensor, min_seconds: float, min_rounds: int
) -> dict[str, list[float]]:
    """Forward seconds per engine and round, engines taking turns within each round."""
    for model in models.values():
        model(batch)  # warm-up
    times: dict[str, list[float]] = {name: [] for name in models}
    while min(map(len, times.values())) < min_rounds or min(map(sum, times.values())) < min_seconds:
        for name, model in models.items():
            start = time.perf_counter()
            model(batch)
            times[name].append(time.perf_counter() - start)
    return times


def dev_rest(model: nn.Module, n: int) -> LabeledImageFolder:
    records = scan_image_folder(SAMPLE / "dev", exclude=SAMPLE / "calib32.txt")[:n]
    return LabeledImageFolder(records, eval_transform(model))


def top1(engine: str, model: nn.Module, n: int) -> dict:
    loader = DataLoader(
        dev_rest(model, n), batch_size=32, num_workers=0, collate_fn=collate_skipping_bad
    )
    result = evaluate(model, loader, device="cpu", name=engine, progress=False)
    return {"top1": result.top1, "top1_n": result.n}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifact", default=str(ROOT / "runs" / "w4a4_refcalib_art"))
    parser.add_argument("--weights", default=str(WEIGHTS), help="FP32 weights of the model")
    parser.add_argument(
        "--engines", nargs="+", default=["fp32", "fp32-onednn", "reference", "fast"]
    )
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 32])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--min-seconds", type=float, default=5.0, help="per engine and batch")
    parser.add_argument("--min-rounds", type=int, default=5)
    parser.add_argument("--top1-images", type=int, default=0, help="0 skips the top-1 pass")
    parser.add_argument("--profile", type=int, default=0, help="profiled forwards (0: none)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    unknown = set(args.engines) - set(ENGINES)
    if unknown:
        parser.error(f"unknown engines {sorted(unknown)}; choose from {ENGINES}")
    torch.set_num_threads(args.threads)

    artifact = read_artifact(args.artifact)
    models = {engine: build(engine, artifact, args.weights) for engine in args.engines}
    extra: dict[str, dict] = {engine: {} for engine in models}
    for engine, model in models.items():
        if args.top1_images:
            extra[engine] |= top1(engine, model, args.top1_images)
        fallback = getattr(getattr(model, "integer_kernel", None), "fallback_reason", None)
        if fallback:
            extra[engine]["kernel_fallback"] = fallback
    data = dev_rest(models[args.engines[0]], max(args.batch_sizes))
    images = torch.stack([data[i][0] for i in range(len(data))])
    rows = []
    for batch_size in args.batch_sizes:
        batch = images[torch.arange(batch_size) % len(images)]
        times = interleaved_times(models, batch, args.min_seconds, args.min_rounds)
        for engine, seconds in times.items():
            row = {
                "engine": engine,
                "batch_size": batch_size,
                "images_per_s": batch_size / statistics.median(seconds),
                "rounds": len(seconds),
            }
            if "fp32" in times:
                paired = [f / s for f, s in zip(times["fp32"], seconds, strict=False)]
                row["vs_fp32"] = statistics.median(paired)
            rows.append(row | extra[engine])
            print(f"{engine} batch {batch_size}: {row['images_per_s']:.2f} images/s", flush=True)
    profiles = {}
    if args.profile:
        batch = images[torch.arange(max(args.batch_sizes)) % len(images)]
        profiles = {e: profile_shares(m, batch, args.profile) for e, m in models.items()}
    report = {
        "artifact": args.artifact,
        "model": artifact.meta["model"],
        "bits": artifact.meta["bits"],
        "threads": args.threads,
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "machine": platform.machine(),
        "timing": "interleaved in one process; median forward time; vs_fp32 = median paired ratio",
        "rows": rows,
        "profile_ms_per_forward": profiles,
        "profile_batch_size": max(args.batch_sizes) if profiles else None,
    }
    atomic_write_json(args.out, report)
    print(f"\nthreads = {args.threads}, torch {torch.__version__}, bits {artifact.meta['bits']}\n")
    print("| engine | batch | images/s | ms/image | x fp32 | top-1 |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        top = f"{row['top1']:.4f} (n={row['top1_n']})" if "top1" in row else "–"
        ratio = f"{row['vs_fp32']:.2f}" if "vs_fp32" in row else "–"
        print(
            f"| {row['engine']} | {row['batch_size']} | {row['images_per_s']:.2f} "
            f"| {1000 / row['images_per_s']:.1f} | {ratio} | {top} |"
        )
    if profiles:
        print(f"\nprofile, batch {max(args.batch_sizes)}: self CPU ms per forward (share)\n")
        print("| engine | " + " | ".join(next(iter(profiles.values()))) + " | total |")
        print("|---|" + "---|" * (len(next(iter(profiles.values()))) + 1))
        for engine, parts in profiles.items():
            total = sum(parts.values())
            cells = " | ".join(f"{ms:.0f} ({ms / total:.0%})" for ms in parts.values())
            print(f"| {engine} | {cells} | {total:.0f} |")


if __name__ == "__main__":
    main()
