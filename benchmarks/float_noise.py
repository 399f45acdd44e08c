"""How much of a quantized model's dev-rest top-1 is float rounding? Prints a table, writes JSON.

A low-bit model is a discontinuous function of its input: a value within float rounding of a
code boundary flips a code, and downstream codes follow. This evaluates one exported artifact on
dev-rest as

* the fake-quant model in float32, with the images scaled by 1, 1 + eps and 1 - eps;
* the integer runtime (exact integer products, float32 elsewhere);
* the fake-quant model and the integer runtime both in float64 (AdaLog T2 rounded in float64
  once the model is cast), where they should agree on every image;

and reports top-1 and the share of images whose argmax equals the float32 fake-quant model's.

Example:
    python benchmarks/float_noise.py --artifact runs/w4a4_refcalib_v2_art \
        --out benchmarks/logs/float_noise_w4a4.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import Tensor, nn

from adalog.io import atomic_write_json
from adalog.pipelines.evaluate import build_eval_loader
from adalog.pipelines.export import fake_quant_model, read_artifact
from adalog.runtime import build_integer_model

SAMPLE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "imagenet-sample"


def predictions(model: nn.Module, loader, dtype: torch.dtype, scale: float = 1.0):
    """Argmax and labels over the loader, the model cast to ``dtype`` (AdaLog T2 follows it)."""
    model = model.to(dtype)
    preds, labels = [], []
    with torch.no_grad():
        for images, target, _ in loader:
            preds.append(model(images.to(dtype) * scale).argmax(-1))
            labels.append(target)
    return torch.cat(preds), torch.cat(labels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifact", required=True)
    parser.add_argument("--eps", type=float, default=1e-7)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    artifact = read_artifact(args.artifact)
    fake = fake_quant_model(artifact)
    loader = build_eval_loader(fake, SAMPLE / "dev", exclude=SAMPLE / "calib32.txt")
    runs: dict[str, tuple[Tensor, Tensor]] = {
        "fake-quant fp32": predictions(fake, loader, torch.float32),
        f"fake-quant fp32, input x (1+{args.eps:g})": predictions(
            fake, loader, torch.float32, 1 + args.eps
        ),
        f"fake-quant fp32, input x (1-{args.eps:g})": predictions(
            fake, loader, torch.float32, 1 - args.eps
        ),
        "integer runtime fp32": predictions(
            build_integer_model(artifact, "fast"), loader, torch.float32
        ),
        "fake-quant fp64": predictions(fake_quant_model(artifact), loader, torch.float64),
        "integer runtime fp64": predictions(
            build_integer_model(artifact, "reference", torch.float64), loader, torch.float64
        ),
    }
    base = runs["fake-quant fp32"][0]
    fp64 = runs["fake-quant fp64"][0]
    rows = [
        {
            "run": name,
            "top1": float((pred == labels).double().mean()),
            "same_argmax_as_fp32": float((pred == base).double().mean()),
            "same_argmax_as_fp64": float((pred == fp64).double().mean()),
            "n": labels.numel(),
        }
        for name, (pred, labels) in runs.items()
    ]
    print("| run | top-1 | argmax = fake-quant fp32 | argmax = fake-quant fp64 |")
    print("|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['run']} | {r['top1']:.4f} | {r['same_argmax_as_fp32']:.1%} "
            f"| {r['same_argmax_as_fp64']:.1%} |"
        )
    atomic_write_json(args.out, {"artifact": str(args.artifact), "eps": args.eps, "rows": rows})


if __name__ == "__main__":
    main()
