"""Probe: how strongly should the post-LayerNorm channel scales be folded (§3)?

RepQ-ViT's fold (the reference) moves the whole per-channel scale ``r_c`` from the LayerNorm
output into the next linear's weight columns, ``W[:, c]·r_c``; that makes the activation easy to
quantize per tensor but widens the 4-bit weight rows. This script folds ``r_c^α`` instead for a
few ``α`` and runs the reference generic search (§5.7(A)) on each post-LayerNorm linear (qkv,
fc1) of every block, on the layer's FP inputs, and reports the relative output error
``‖X̂Ŵᵀ + b − Y‖² / ‖Y‖²`` per layer and ``α``. ``α = 1`` is the reference.

    python benchmarks/fold_strength.py --calib-tensor \
        ../shared/data/imagenet-sample/reference_calib32_vit_tiny.safetensors \
        --out benchmarks/logs/fold_strength_w4a4.json
"""

from __future__ import annotations

import argparse
import copy
import json

import torch
from calibration_speed import VIT_TINY, VIT_TINY_WEIGHTS
from safetensors.torch import load_file

from adalog.config import AdaLogConfig
from adalog.io import atomic_write_json
from adalog.models import create_model
from adalog.models.hooks import forward_batches, forward_hooks
from adalog.models.rotation import random_orthogonal
from adalog.models.wrap import wrap_model
from adalog.search.procedures import SearchSettings, calibrate_linear, channelwise_input_search


def partial_fold(norm, module, x, settings, alpha: float):
    """Fold ``r^α`` (§3 with exponent ``α``) into copies of ``norm`` and ``module``; return the
    copies and the transformed inputs."""
    norm, module = copy.deepcopy(norm), copy.deepcopy(module)
    scales, zps = channelwise_input_search(x, module.input_quant.n_bits, settings)
    s_star, z_star = scales.mean(), zps.mean().round()
    r = (scales / s_star).pow(alpha)
    delta = -zps * scales / r + z_star * s_star  # channel minima aligned at -z*·s*
    with torch.no_grad():
        norm.weight.div_(r)
        norm.bias.div_(r).sub_(delta)
        module.weight.mul_(r)
        module.ensure_bias().add_(module.weight @ delta)
    module.input_quant.set_params(s_star.reshape(1), z_star.reshape(1))
    return norm, module, x / r - delta


def rotate(module, x, rotation):
    """``x Wᵀ = (x Q)(W Q)ᵀ`` for orthogonal ``Q``: rotate the input and the weight columns."""
    module = copy.deepcopy(module)
    with torch.no_grad():
        module.weight.copy_(module.weight @ rotation)
    return module, x @ rotation


def relative_error(module, x, y) -> float:
    with torch.no_grad():
        out = module.input_quant(x) @ module.weight_quant(module.weight).T + module.bias
    return float((out - y).square().sum() / y.square().sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=VIT_TINY)
    parser.add_argument("--weights", default=str(VIT_TINY_WEIGHTS))
    parser.add_argument("--calib-tensor", required=True)
    parser.add_argument("--preset", default="w4a4")
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0])
    parser.add_argument("--blocks", type=int, nargs="*", help="block indices (default: all)")
    parser.add_argument(
        "--rotate",
        action="store_true",
        help="also score each α with a random orthogonal rotation of the linear's input",
    )
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    config = AdaLogConfig.preset(args.preset)
    settings = SearchSettings(
        eq_n=config.eq_n, rounds=config.search_rounds, steps=config.fpcs_steps
    )
    model = create_model(args.model, weights=args.weights).eval()
    images = load_file(args.calib_tensor)["x"]
    targets = [t for t in wrap_model(model, config) if t.role == "linear_ln"]
    blocks = set(args.blocks) if args.blocks is not None else None
    targets = [t for t in targets if blocks is None or int(t.name.split(".")[1]) in blocks]
    records: dict[str, list] = {t.name: [] for t in targets}

    def hook(name, module, inputs, output):
        records[name].append((inputs[0].flatten(0, -2), output.flatten(0, -2)))

    with forward_hooks({t.name: t.module for t in targets}, hook):
        forward_batches(model, images, config.calib_batch_size)
    results = {}
    for target in targets:
        x = torch.cat([r[0] for r in records[target.name]])
        y = torch.cat([r[1] for r in records[target.name]])
        norm = model.get_submodule(target.norm)
        row = {}
        for alpha in args.alphas:
            _, module, x_folded = partial_fold(norm, target.module, x, settings, alpha)
            variants = [(str(alpha), module, x_folded)]
            if args.rotate:
                rotation = random_orthogonal(x.shape[1], seed=0).float()
                variants.append((f"{alpha}+rot", *rotate(module, x_folded, rotation)))
            for key, variant, inputs in variants:
                calibrate_linear(
                    inputs,
                    y,
                    variant.weight,
                    variant.bias,
                    variant.weight_quant,
                    variant.input_quant,
                    settings,
                )
                row[key] = relative_error(variant, inputs, y)
        results[target.name] = row
        print(target.name, " ".join(f"{a}:{e:.4f}" for a, e in row.items()), flush=True)
        summary = {"preset": args.preset, "alphas": args.alphas, "layers": results}
        atomic_write_json(args.out, summary)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
