"""Where a quantized checkpoint loses accuracy: top-1 with one module kind left in float at a time.

Evaluates the first ``--images`` dev-rest images with everything quantized, then once per module
kind (qkv, matmul1, ...) with that kind in raw mode. fc2 is not switched: its bias carries the
folded post-GELU shift (§4), so its raw mode is not the FP layer. Prints a table, writes JSON.

Example:
    python benchmarks/quant_error_breakdown.py runs/w4a4_refcalib --out logs/breakdown.json
    ... --split attn.qkv mlp.fc1   # also: input only / weights only in float
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn

from adalog.io import atomic_write_json
from adalog.models.qmodules import QuantModule, set_quant_mode
from adalog.pipelines.checkpoint import load_quantized
from adalog.pipelines.evaluate import build_eval_loader

SAMPLE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "imagenet-sample"
KINDS = (
    "patch_embed.proj",
    "attn.qkv",
    "attn.matmul1",
    "attn.matmul2",
    "attn.proj",
    "mlp.fc1",
    "head",
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("qdir")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument(
        "--split",
        nargs="*",
        default=[],
        help="linear kinds (e.g. attn.qkv mlp.fc1) whose input and weight quantizers are "
        "also left in float one at a time",
    )
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    model = load_quantized(args.qdir)
    loader = build_eval_loader(model, SAMPLE / "dev", exclude=SAMPLE / "calib32.txt")
    batches = []
    for images, labels, _ in loader:
        batches.append((images, labels))
        if sum(len(b[1]) for b in batches) >= args.images:
            break

    def top1() -> float:
        with torch.no_grad():
            hits = sum(int((model(x).argmax(1) == y).sum()) for x, y in batches)
        return hits / sum(len(y) for _, y in batches)

    set_quant_mode(model, True)
    result = {"all_quantized": top1(), "kind_left_in_float": {}}
    for kind in KINDS:
        modules = [
            m for n, m in model.named_modules() if isinstance(m, QuantModule) and n.endswith(kind)
        ]
        for m in modules:
            m.set_quant(False)
        result["kind_left_in_float"][kind] = top1()
        for m in modules:
            m.set_quant(True)
    if args.split:
        result["operand_left_in_float"] = {}
        for kind in args.split:
            modules = [m for n, m in model.named_modules() if n.endswith(kind)]
            for attr in ("input_quant", "weight_quant"):
                saved = [getattr(m, attr) for m in modules]
                for m in modules:
                    setattr(m, attr, nn.Identity())
                result["operand_left_in_float"][f"{kind} {attr}"] = top1()
                for m, quant in zip(modules, saved, strict=True):
                    setattr(m, attr, quant)
    result["images"] = sum(len(y) for _, y in batches)
    atomic_write_json(args.out, result)
    print(f"| all quantized | {result['all_quantized']:.3f} |")
    for kind, acc in result["kind_left_in_float"].items():
        print(f"| {kind} in float | {acc:.3f} |")
    for operand, acc in result.get("operand_left_in_float", {}).items():
        print(f"| {operand} in float | {acc:.3f} |")


if __name__ == "__main__":
    main()
