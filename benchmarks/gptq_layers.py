"""Which layers GPTQ should re-round, and with which Gram matrix: KL to FP per variant.

Starts from a calibrated (nearest-rounded) checkpoint and applies GPTQ after the fact, which is
what ``weight_rounding="gptq"`` does at the end of calibration. Each variant re-rounds one set
of layers (a module-name suffix, or every layer but the head) with a plain or token-normalised
input Gram matrix and is scored on the first ``--images`` dev-rest images: mean KL(FP || Q) of
the logits (smoother than top-1 on a 4-bit model, whose argmax flips with float rounding),
argmax agreement with FP, top-1. Prints a Markdown table, writes JSON.

Example:
    python benchmarks/gptq_layers.py runs/w4a4_refcalib --calib-tensor \
        ../shared/data/imagenet-sample/reference_calib32_vit_tiny.safetensors \
        --out benchmarks/logs/gptq_layers_w4a4.json
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor, nn

from adalog.io import atomic_write_json
from adalog.models.qmodules import set_quant_mode
from adalog.pipelines.calibrate import GPTQ_CROP_SCALE_MIN, fold_post_gelu_shift
from adalog.pipelines.checkpoint import load_quantized
from adalog.pipelines.evaluate import build_eval_loader
from adalog.pipelines.reconstruct import unfold_post_gelu_shift
from adalog.pipelines.weight_rounding import gptq_layers, gptq_round_weights
from adalog.recon.data import augmented_views

SAMPLE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "imagenet-sample"
#: (layers: a name suffix, "all" = every layer but the head, or "all+head"; token-normalised)
VARIANTS = [
    ("attn.qkv", False),
    ("attn.proj", False),
    ("mlp.fc1", False),
    ("mlp.fc2", False),
    ("patch_embed.proj", False),
    ("head", False),
    ("mlp.fc2", True),
    ("all", False),
    ("all", True),
    ("all+head", True),
]


def _dev_rest(model: nn.Module, n: int) -> tuple[Tensor, Tensor]:
    loader = build_eval_loader(model, SAMPLE / "dev", exclude=SAMPLE / "calib32.txt")
    images, labels = [], []
    for batch in loader:
        images.append(batch[0])
        labels.append(batch[1])
        if sum(len(y) for y in labels) >= n:
            break
    return torch.cat(images)[:n], torch.cat(labels)[:n]


def _logits(model: nn.Module, images: Tensor) -> Tensor:
    with torch.no_grad():
        return torch.cat([model(images[i : i + 64]) for i in range(0, len(images), 64)])


def _select(model: nn.Module, layers: str) -> dict[str, nn.Module]:
    """The quantized layers named by a variant (the head is a candidate here)."""
    candidates = gptq_layers(model) | {"head": model.get_classifier()}
    if layers == "all":
        return gptq_layers(model)
    if layers == "all+head":
        return candidates
    return {name: m for name, m in candidates.items() if name.endswith(layers)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("qdir", help="calibrated checkpoint (weight_rounding nearest)")
    parser.add_argument("--calib-tensor", required=True, help="safetensors with calibration 'x'")
    parser.add_argument("--views", type=int, default=256)
    parser.add_argument("--damp", type=float, default=0.1)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    base = load_quantized(args.qdir)
    config = base.adalog_meta["config"]
    views = augmented_views(
        load_file(args.calib_tensor)["x"], args.views, GPTQ_CROP_SCALE_MIN, True, config["seed"]
    )
    images, labels = _dev_rest(base, args.images)
    fp = copy.deepcopy(base)
    unfold_post_gelu_shift(fp)
    set_quant_mode(fp, False)
    fp_logits = _logits(fp, images)

    def score(model: nn.Module) -> dict:
        logits = _logits(model, images)
        kl = F.kl_div(
            logits.log_softmax(-1), fp_logits.log_softmax(-1), log_target=True,
            reduction="batchmean",
        )  # fmt: skip
        return {
            "kl_to_fp": kl.item(),
            "agree_with_fp": (logits.argmax(-1) == fp_logits.argmax(-1)).float().mean().item(),
            "top1": (logits.argmax(-1) == labels).float().mean().item(),
        }

    rows = [{"layers": "none (nearest)", "normalize_tokens": None} | score(base)]
    for layers, normalize in VARIANTS:
        model = load_quantized(args.qdir)
        unfold_post_gelu_shift(model)
        selected = _select(model, layers)
        gptq_round_weights(
            model, views, damp=args.damp, layers=selected, normalize_tokens=normalize
        )
        fold_post_gelu_shift(model)
        rows.append({"layers": layers, "normalize_tokens": normalize} | score(model))
        print(rows[-1], flush=True)
    atomic_write_json(
        args.out, {"qdir": args.qdir, "views": args.views, "damp": args.damp, "rows": rows}
    )
    print("| GPTQ on | token-normalised Gram | KL to FP | argmax = FP | top-1 |")
    print("|---|---|---|---|---|")
    for r in rows:
        norm = "–" if r["normalize_tokens"] is None else ("yes" if r["normalize_tokens"] else "no")
        print(
            f"| {r['layers']} | {norm} | {r['kl_to_fp']:.3f} | {r['agree_with_fp']:.3f} "
            f"| {r['top1']:.3f} |"
        )


if __name__ == "__main__":
    main()
