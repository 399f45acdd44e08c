"""Where a quantized checkpoint loses accuracy: top-1 with one module kind left in float at a time.

Evaluates the first ``--images`` dev-rest images with everything quantized, then once per module
kind (qkv, matmul1, ...) with that kind in raw mode, scored by top-1 and by the mean KL divergence
of the logits from the FP model's (smoother than top-1 on a chaotic 4-bit model). The post-GELU
shift fold (§4) is undone first (same quantized model), so fc2's raw mode is the FP layer too.
Prints a table, writes JSON.

Example:
    python benchmarks/quant_error_breakdown.py runs/w4a4_refcalib --out logs/breakdown.json
    ... --split attn.qkv mlp.fc1   # also: input only / weights only in float
"""

from __future__ import annotations

import argparse

from gptq_layers import batched_logits, dev_rest_head, score_logits
from torch import nn

from adalog.io import atomic_write_json
from adalog.models.qmodules import QuantModule, set_quant_mode
from adalog.pipelines.checkpoint import load_quantized
from adalog.pipelines.reconstruct import unfold_post_gelu_shift

KINDS = (
    "patch_embed.proj",
    "attn.qkv",
    "attn.matmul1",
    "attn.matmul2",
    "attn.proj",
    "mlp.fc1",
    "mlp.fc2",
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
    images, labels = dev_rest_head(model, args.images)
    unfold_post_gelu_shift(model)
    set_quant_mode(model, False)
    fp_logits = batched_logits(model, images)

    def score() -> dict[str, float]:
        return score_logits(batched_logits(model, images), fp_logits, labels)

    set_quant_mode(model, True)
    result = {"all_quantized": score(), "kind_left_in_float": {}}
    for kind in KINDS:
        modules = [
            m for n, m in model.named_modules() if isinstance(m, QuantModule) and n.endswith(kind)
        ]
        for m in modules:
            m.set_quant(False)
        result["kind_left_in_float"][kind] = score()
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
                result["operand_left_in_float"][f"{kind} {attr}"] = score()
                for m, quant in zip(modules, saved, strict=True):
                    setattr(m, attr, quant)
    result["images"] = len(labels)
    atomic_write_json(args.out, result)
    print("| left in float | top-1 | KL to FP |\n|---|---|---|")
    rows = {"nothing": result["all_quantized"], **result["kind_left_in_float"]}
    rows.update(result.get("operand_left_in_float", {}))
    for what, metrics in rows.items():
        print(f"| {what} | {metrics['top1']:.3f} | {metrics['kl_to_fp']:.3f} |")


if __name__ == "__main__":
    main()
