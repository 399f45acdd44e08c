"""Probe: re-choose per-tensor activation scales on the logits instead of each layer's output.

The reference search picks each input quantizer's scale by its own layer's output error. This
probe starts from a calibrated checkpoint and, block by block in forward order, multiplies the
scale of selected uniform input quantizers by candidate factors, keeping the factor that gives
the lowest mean KL(FP || Q) of the logits on seeded augmented views of the calibration images
(never evaluation images). The quantized prefix up to the block is computed once per block;
each candidate runs the rest of the network. Scored on the first ``--images`` dev-rest images
and, with ``--full-eval``, on all of dev-rest in float32 and float64. Prints a table, writes JSON.

Example:
    python benchmarks/logit_scale_search.py runs/w4a4_refcalib_rot_gptq --calib-tensor \
        ../shared/data/imagenet-sample/reference_calib32_vit_tiny.safetensors \
        --out benchmarks/logs/logit_scale_search_w4a4.json
"""

from __future__ import annotations

import argparse
import time

import torch
from gptq_layers import PosthocSetup, fp_twin, full_eval, mean_kl
from torch import Tensor, nn
from tqdm import tqdm

from adalog.io import atomic_write_json
from adalog.pipelines.checkpoint import save_quantized
from adalog.quant.modules import UniformQuantizer

DEFAULT_KINDS = ("attn.qkv", "attn.proj", "mlp.fc1")
DEFAULT_FACTORS = (0.7, 0.8, 0.85, 0.9, 0.95, 1.0, 1.05, 1.1, 1.15, 1.2, 1.3)


def prefix(model: nn.Module, x: Tensor, n_blocks: int) -> Tensor:
    """Hidden state entering block ``n_blocks`` of a timm VisionTransformer."""
    x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))
    for block in model.blocks[:n_blocks]:
        x = block(x)
    return x


def suffix(model: nn.Module, h: Tensor, start: int) -> Tensor:
    """Logits from the hidden state entering block ``start``."""
    for block in model.blocks[start:]:
        h = block(h)
    return model.forward_head(model.norm(h))


def search(
    model: nn.Module, views: Tensor, fp_logits: Tensor, kinds: tuple[str, ...], factors
) -> list[dict]:
    """Greedy forward-order search; returns one record per quantizer."""
    records = []
    with torch.no_grad():
        for b, block in enumerate(tqdm(model.blocks, desc="blocks")):
            h = prefix(model, views, b)
            for kind in kinds:
                quant = block.get_submodule(kind).input_quant
                if not isinstance(quant, UniformQuantizer) or quant.scale.numel() != 1:
                    continue
                base = quant.scale.clone()
                losses = {}
                for f in factors:
                    quant.scale = base * f
                    losses[f] = mean_kl(suffix(model, h, b), fp_logits)
                best = min(losses, key=losses.get)
                quant.scale = base * best
                records.append(
                    {"quantizer": f"blocks.{b}.{kind}", "factor": best, "kl": losses[best]}
                    | {"kl_by_factor": {str(f): kl for f, kl in losses.items()}}
                )
                print(records[-1], flush=True)
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("qdir")
    parser.add_argument("--calib-tensor")
    parser.add_argument("--views", type=int, default=32)
    parser.add_argument("--kinds", nargs="+", default=list(DEFAULT_KINDS))
    parser.add_argument("--factors", nargs="+", type=float, default=list(DEFAULT_FACTORS))
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--full-eval", action="store_true")
    parser.add_argument("--save", help="write the re-searched checkpoint here")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    setup = PosthocSetup.load(args.qdir, args.calib_tensor, args.views, args.images)
    model = setup.base
    if not hasattr(model, "blocks"):
        raise SystemExit(f"{args.qdir}: a ViT/DeiT checkpoint is needed (timm VisionTransformer)")
    with torch.no_grad():
        fp_views = fp_twin(model)(setup.views)
    before = setup.score(model)
    print("before", before, flush=True)
    start = time.perf_counter()
    rounds = []
    for _ in range(args.rounds):
        rounds.append(search(model, setup.views, fp_views, tuple(args.kinds), args.factors))
        print("after round", setup.score(model), flush=True)
    result = {
        "qdir": args.qdir,
        "views": args.views,
        "kinds": args.kinds,
        "factors": args.factors,
        "seconds": time.perf_counter() - start,
        "before": before,
        "after": setup.score(model),
        "rounds": rounds,
    }
    if args.save:
        model.adalog_meta = model.adalog_meta | {"logit_scale_search": result["rounds"]}
        save_quantized(model, args.save)
    if args.full_eval:
        result["dev_rest"] = full_eval({"searched": model})
    atomic_write_json(args.out, result)
    print(f"before {before}\nafter {result['after']}\n{result.get('dev_rest')}")


if __name__ == "__main__":
    main()
