"""Probe: re-choose per-tensor activation scales on the logits instead of each layer's output.

The reference search picks each input quantizer's scale by its own layer's output error. This
probe starts from a calibrated checkpoint and, block by block in forward order, multiplies the
scale of selected uniform input quantizers by candidate factors, keeping the factor that gives
the lowest mean KL(FP || Q) of the logits on seeded augmented views of the calibration images
(never evaluation images). The quantized prefix up to the block is computed once per block;
each candidate runs the rest of the network. Scored on the first ``--images`` dev-rest images
and, with ``--full-eval``, on all of dev-rest in float32 and float64. Prints each choice,
writes JSON.

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
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn
from tqdm import tqdm

from adalog.io import atomic_write_json
from adalog.models.hooks import StopForward, forward_hooks, run_forward
from adalog.models.qmodules import QuantLinear
from adalog.pipelines.checkpoint import save_quantized
from adalog.quant.modules import UniformQuantizer
from adalog.recon.blocks import TailUnit

DEFAULT_KINDS = ("attn.qkv", "attn.proj", "mlp.fc1")
DEFAULT_FACTORS = (0.7, 0.8, 0.85, 0.9, 0.95, 1.0, 1.05, 1.1, 1.15, 1.2, 1.3)


def block_input(model: nn.Module, x: Tensor, index: int) -> Tensor:
    """What ``model.blocks[index]`` receives for ``x`` (the forward stops there)."""
    seen = {}

    def hook(name, module, inputs, output) -> None:
        seen["x"] = inputs[0]
        raise StopForward

    with forward_hooks({"block": model.blocks[index]}, hook):
        run_forward(model, x)
    return seen["x"]


def search(
    model: nn.Module, views: Tensor, fp_logits: Tensor, kinds: tuple[str, ...], factors
) -> list[dict]:
    """Greedy forward-order search; returns one record per quantizer."""
    records = []
    with torch.no_grad():
        for b, block in enumerate(tqdm(model.blocks, desc="blocks")):
            h, rest = block_input(model, views, b), TailUnit(model, b)
            for kind in kinds:
                quant = block.get_submodule(kind).input_quant
                if not isinstance(quant, UniformQuantizer) or quant.scale.numel() != 1:
                    continue
                base = quant.scale.clone()
                losses = {}
                for f in factors:
                    quant.scale = base * f
                    losses[f] = mean_kl(rest(h), fp_logits)
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
    if min(args.factors) <= 0 or min(args.views, args.rounds, args.images) < 1:
        parser.error("--factors must be positive; --views, --rounds and --images at least 1")

    setup = PosthocSetup.load(args.qdir, args.calib_tensor, args.views, args.images)
    model = setup.base
    if not isinstance(model, VisionTransformer):
        raise SystemExit(f"{args.qdir}: needs a ViT/DeiT checkpoint, not {type(model).__name__}")
    linears = {n for n, m in model.blocks[0].named_modules() if isinstance(m, QuantLinear)}
    if unknown := sorted(set(args.kinds) - linears):
        raise SystemExit(f"--kinds {unknown}: not quantized linears of a block ({sorted(linears)})")
    with torch.no_grad():
        fp_views = fp_twin(model)(setup.views)
    before = setup.score(model)
    print("before", before, flush=True)
    start = time.perf_counter()
    rounds = []
    for _ in range(args.rounds):
        rounds.append(search(model, setup.views, fp_views, tuple(args.kinds), args.factors))
        after = setup.score(model)
        print("after round", after, flush=True)
    result = {
        "qdir": args.qdir,
        "views": args.views,
        "kinds": args.kinds,
        "factors": args.factors,
        "seconds": time.perf_counter() - start,
        "before": before,
        "after": after,
        "rounds": rounds,
    }
    if args.save:
        model.adalog_meta = model.adalog_meta | {"logit_scale_search": result["rounds"]}
        save_quantized(model, args.save)
    if args.full_eval:
        result["dev_rest"] = full_eval({"searched": model})
    atomic_write_json(args.out, result)
    print(f"before {before}\nafter {after}")
    if "dev_rest" in result:
        print(f"dev-rest {result['dev_rest']['searched']}")


if __name__ == "__main__":
    main()
