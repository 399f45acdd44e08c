"""Which layers GPTQ should re-round, and with which Gram matrix: KL to FP per variant.

Starts from a calibrated (nearest-rounded) checkpoint and applies GPTQ after the fact, which is
what ``weight_rounding="gptq"`` does at the end of calibration. Each variant re-rounds one set
of layers (a module-name suffix, or every layer but the head) with a plain or token-normalised
input Gram matrix and is scored on the first ``--images`` dev-rest images: mean KL(FP || Q) of
the logits (smoother than top-1 on a 4-bit model, whose argmax flips with float rounding),
argmax agreement with FP, top-1. Prints a Markdown table, writes JSON.

Examples:
    python benchmarks/gptq_layers.py runs/w3a3_seed7 --variants all:norm --full-eval \
        --out benchmarks/logs/gptq_w3a3_seed7.json
    python benchmarks/gptq_layers.py runs/w4a4_refcalib --calib-tensor \
        ../shared/data/imagenet-sample/reference_calib32_vit_tiny.safetensors \
        --out benchmarks/logs/gptq_layers_w4a4.json
"""

from __future__ import annotations

import argparse
import copy
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor, nn

from adalog.config import AdaLogConfig
from adalog.io import atomic_write_json
from adalog.models.qmodules import set_quant_mode, snap_weights_to_grid
from adalog.pipelines.calibrate import (
    GPTQ_CROP_SCALE_MIN,
    fold_post_gelu_shift,
    load_calibration_images,
)
from adalog.pipelines.checkpoint import load_quantized
from adalog.pipelines.evaluate import build_eval_loader, evaluate
from adalog.pipelines.reconstruct import unfold_post_gelu_shift
from adalog.pipelines.weight_rounding import gptq_layers, gptq_round_weights
from adalog.recon.data import augmented_views

SAMPLE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "imagenet-sample"
#: LAYERS:GRAM, LAYERS a name suffix, "all" (every layer but the head: weight_rounding="gptq")
#: or "all+head"; GRAM "plain" or "norm" (token-normalised, the default)
VARIANTS = [
    "attn.qkv:plain",
    "attn.proj:plain",
    "mlp.fc1:plain",
    "mlp.fc2:plain",
    "patch_embed.proj:plain",
    "head:plain",
    "mlp.fc2:norm",
    "all:plain",
    "all:norm",
    "all+head:norm",
]
DEFAULT_RULE = "all:norm"


def dev_rest_head(model: nn.Module, n: int) -> tuple[Tensor, Tensor]:
    loader = build_eval_loader(model, SAMPLE / "dev", exclude=SAMPLE / "calib32.txt")
    images, labels = [], []
    for batch in loader:
        images.append(batch[0])
        labels.append(batch[1])
        if sum(len(y) for y in labels) >= n:
            break
    return torch.cat(images)[:n], torch.cat(labels)[:n]


def batched_logits(model: nn.Module, images: Tensor) -> Tensor:
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


@dataclass
class PosthocSetup:
    """A checkpoint, the seeded calibration views an after-the-fact pass uses, and the first
    dev-rest images with their labels and the FP model's logits, for scoring variants."""

    base: nn.Module
    config: AdaLogConfig
    views: Tensor
    images: Tensor
    labels: Tensor
    fp_logits: Tensor

    @classmethod
    def load(cls, qdir: str, calib_tensor: str | None, n_views: int, n_images: int):
        base = load_quantized(qdir)
        config = AdaLogConfig.from_dict(base.adalog_meta["config"])
        if calib_tensor:
            calib = load_file(calib_tensor)["x"]
        else:
            calib = load_calibration_images(base, SAMPLE / "dev", SAMPLE / "calib32.txt", config)
        views = augmented_views(calib, n_views, GPTQ_CROP_SCALE_MIN, True, config.seed)
        images, labels = dev_rest_head(base, n_images)
        return cls(base, config, views, images, labels, batched_logits(fp_twin(base), images))

    def score(self, model: nn.Module) -> dict[str, float]:
        return score_logits(batched_logits(model, self.images), self.fp_logits, self.labels)


def fp_twin(model: nn.Module) -> nn.Module:
    """A copy of a quantized checkpoint that computes the FP model (shift fold undone)."""
    fp = copy.deepcopy(model)
    unfold_post_gelu_shift(fp)
    set_quant_mode(fp, False)
    return fp


def mean_kl(logits: Tensor, fp_logits: Tensor) -> float:
    """Mean KL(FP || Q) of the logits over the batch."""
    return F.kl_div(
        logits.log_softmax(-1), fp_logits.log_softmax(-1), log_target=True, reduction="batchmean"
    ).item()


def score_logits(logits: Tensor, fp_logits: Tensor, labels: Tensor) -> dict[str, float]:
    """Mean KL(FP || Q), argmax agreement with FP, top-1."""
    return {
        "kl_to_fp": mean_kl(logits, fp_logits),
        "agree_with_fp": (logits.argmax(-1) == fp_logits.argmax(-1)).float().mean().item(),
        "top1": (logits.argmax(-1) == labels).float().mean().item(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("qdir", help="calibrated checkpoint (weight_rounding nearest)")
    parser.add_argument(
        "--calib-tensor",
        help="safetensors with calibration inputs 'x' (default: calib32.txt through the "
        "checkpoint's seeded calibration transform, as its calibration saw them)",
    )
    parser.add_argument("--variants", nargs="+", default=VARIANTS, help="LAYERS:GRAM entries")
    parser.add_argument(
        "--full-eval",
        action="store_true",
        help=f"also evaluate nearest and {DEFAULT_RULE} on all of dev-rest, float32 and float64",
    )
    parser.add_argument("--views", type=int, default=256)
    parser.add_argument("--damp", type=float, default=0.1)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    setup = PosthocSetup.load(args.qdir, args.calib_tensor, args.views, args.images)
    base, views, score = setup.base, setup.views, setup.score

    def rounded(variant: str) -> nn.Module:
        layers, gram = variant.split(":")
        model = load_quantized(args.qdir)
        unfold_post_gelu_shift(model)
        selected = _select(model, layers)
        normalize = gram == "norm"
        gptq_round_weights(
            model, views, damp=args.damp, layers=selected, normalize_tokens=normalize
        )
        fold_post_gelu_shift(model)
        return model

    rows = [{"layers": "none (nearest)", "normalize_tokens": None} | score(base)]
    for variant in args.variants:
        layers, gram = variant.split(":")
        rows.append(
            {"layers": layers, "normalize_tokens": gram == "norm"} | score(rounded(variant))
        )
        print(rows[-1], flush=True)
    result = {"qdir": args.qdir, "views": args.views, "damp": args.damp, "rows": rows}
    if args.full_eval:
        result["dev_rest"] = full_eval({"nearest": base, DEFAULT_RULE: rounded(DEFAULT_RULE)})
    atomic_write_json(args.out, result)
    print("| GPTQ on | token-normalised Gram | KL to FP | argmax = FP | top-1 |")
    print("|---|---|---|---|---|")
    for r in rows:
        norm = "–" if r["normalize_tokens"] is None else ("yes" if r["normalize_tokens"] else "no")
        print(
            f"| {r['layers']} | {norm} | {r['kl_to_fp']:.3f} | {r['agree_with_fp']:.3f} "
            f"| {r['top1']:.3f} |"
        )

    for name, scores in result.get("dev_rest", {}).items():
        print(f"dev-rest {name}: " + ", ".join(f"{k} {v:.4f}" for k, v in scores.items()))


def full_eval(models: dict[str, nn.Module]) -> dict[str, dict[str, float]]:
    """Top-1/top-5 on all of dev-rest in float32 and float64 (weights snapped onto their
    float32 grid first, as ``adalog eval --dtype float64`` does: the exported codes)."""
    out = {}
    for name, model in models.items():
        snap_weights_to_grid(model)
        loader = build_eval_loader(model, SAMPLE / "dev", exclude=SAMPLE / "calib32.txt")
        out[name] = {}
        for dtype in (torch.float32, torch.float64):
            result = evaluate(model, loader, progress=False, dtype=dtype)
            tag = str(dtype).removeprefix("torch.")
            out[name] |= {f"top1_{tag}": result.top1, f"top5_{tag}": result.top5}
    return out


if __name__ == "__main__":
    main()
