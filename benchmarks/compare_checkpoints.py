"""Tensor-by-tensor comparison of two quantized checkpoints (e.g. fast vs naive search engine).

Reports how many tensors are bit-identical and, for the others, the largest relative difference
and how many elements differ; quantizer parameters (scales, zero points, q) decide the model, so
they are listed first. Prints a Markdown table, writes JSON.

``--eval`` also scores both models on dev-rest. A 4-bit model's top-1 moves by a point or two
under float rounding alone (RESULTS.md, "Float32 noise floor"), so one float32 top-1 each cannot
resolve a 0.3-point difference: each model is evaluated in float32 with the images scaled by 1
and 1 ± 1e-7 and in float64 (weights snapped onto their float32 grid), and the table gives
every top-1, their mean, the mean KL divergence from the FP model and the share of images on
which the two models agree.

``--progress`` compares a checkpoint with the calibration progress folder of a run still under
way (``--resume``): only the blocks that run has finished, and with the checkpoint's post-GELU
fold (§4) undone, since progress is saved before it; the checkpoint is loaded in the progress
state's float dtype, so a float64 calibration is compared in float64.

Example (issue 5: the fast engine against the straightforward one):
    python benchmarks/compare_checkpoints.py runs/w4a4_refcalib runs/w4a4_refcalib_naive \
        --eval --out benchmarks/logs/compare_fast_naive_w4a4.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from gptq_layers import fp_twin, score_logits
from torch import Tensor, nn

from adalog.errors import ConfigError
from adalog.io import atomic_write_json
from adalog.models import read_state_dict
from adalog.models.qmodules import snap_weights_to_grid
from adalog.pipelines.checkpoint import WEIGHTS_FILE, load_quantized
from adalog.pipelines.evaluate import build_eval_loader
from adalog.pipelines.reconstruct import unfold_post_gelu_shift
from adalog.pipelines.runstore import read_progress_meta, read_progress_state, state_dtype

SAMPLE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "imagenet-sample"
EPS = 1e-7


def compare(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict:
    """Identical / differing tensors of two state dicts with the same keys."""
    if a.keys() != b.keys():
        only = sorted(set(a) ^ set(b))
        raise SystemExit(f"the checkpoints hold different tensors, e.g. {only[:5]}")
    differing = {}
    for key in sorted(a):
        x, y = a[key], b[key]
        if x.shape != y.shape:
            differing[key] = {"shape": [list(x.shape), list(y.shape)]}
        elif not torch.equal(x, y):
            diff = (x.double() - y.double()).abs()
            scale = y.double().abs().max().clamp_min(1e-30)
            differing[key] = {
                "elements_differing": int((diff > 0).sum()),
                "elements": x.numel(),
                "max_relative": float(diff.max() / scale),
            }
    return {"tensors": len(a), "identical": len(a) - len(differing), "differing": differing}


def in_blocks(key: str, blocks: list[str]) -> bool:
    """Whether a state key belongs to one of ``blocks`` (``blocks.3``, ``head``, ...)."""
    return any(key.startswith(block + ".") for block in blocks)


def against_progress(checkpoint: str, progress: str) -> tuple[dict, dict, list[str]]:
    """The checkpoint's state with §4's fold undone and the progress state, both restricted to
    the blocks the progress run has finished (also returned)."""
    try:
        done = read_progress_meta(progress)["done_blocks"]
    except ConfigError as exc:
        raise SystemExit(f"{progress} is not a calibration progress folder: {exc}") from exc
    second = read_progress_state(progress)
    model = load_quantized(checkpoint, dtype=state_dtype(second))
    unfold_post_gelu_shift(model)
    first = model.state_dict()

    return (
        {k: v for k, v in first.items() if in_blocks(k, done)},
        {k: v for k, v in second.items() if in_blocks(k, done)},
        done,
    )


def dev_rest_logits(model: nn.Module, loader, dtype: torch.dtype, scale: float = 1.0):
    """float64 logits and labels of dev-rest, the model and images cast to ``dtype``."""
    model = model.to(dtype)
    logits, labels = [], []
    with torch.no_grad():
        for images, target, _ in loader:
            logits.append(model(images.to(dtype) * scale).double())
            labels.append(target)
    return torch.cat(logits), torch.cat(labels)


def evaluate_pair(first: str, second: str) -> dict:
    """Top-1 of both checkpoints under four float roundings, KL to FP, argmax agreement."""
    models = {"first": load_quantized(first), "second": load_quantized(second)}
    fp = fp_twin(models["first"])
    loader = build_eval_loader(fp, SAMPLE / "dev", exclude=SAMPLE / "calib32.txt")
    fp_logits, labels = dev_rest_logits(fp, loader, torch.float32)
    runs = {"fp32": (torch.float32, 1.0), f"fp32 x(1+{EPS:g})": (torch.float32, 1 + EPS)}
    runs |= {f"fp32 x(1-{EPS:g})": (torch.float32, 1 - EPS), "fp64": (torch.float64, 1.0)}
    result: dict = {"n": labels.numel(), "runs": list(runs)}
    preds: dict[str, dict[str, Tensor]] = {}
    for key, model in models.items():
        top1, preds[key] = {}, {}
        for run, (dtype, scale) in runs.items():
            if dtype == torch.float64:
                snap_weights_to_grid(model)
            logits, _ = dev_rest_logits(model, loader, dtype, scale)
            preds[key][run] = logits.argmax(-1)
            top1[run] = float((preds[key][run] == labels).double().mean())
            if run == "fp32":
                scores = score_logits(logits, fp_logits, labels)
                result[f"{key}_kl_to_fp"] = scores["kl_to_fp"]
        result[f"{key}_top1"] = top1 | {"mean": sum(top1.values()) / len(top1)}
    result["same_argmax"] = {
        run: float((preds["first"][run] == preds["second"][run]).double().mean()) for run in runs
    }
    return result


def print_eval(result: dict) -> None:
    runs = result["runs"]
    print("\n| model | " + " | ".join(f"top-1 {r}" for r in runs) + " | mean | KL to FP |")
    print("|---|" + "---|" * (len(runs) + 2))
    for key in ("first", "second"):
        top1 = result[f"{key}_top1"]
        cells = " | ".join(f"{top1[r]:.4f}" for r in runs)
        print(f"| {key} | {cells} | {top1['mean']:.4f} | {result[f'{key}_kl_to_fp']:.4f} |")
    cells = " | ".join(f"{result['same_argmax'][r]:.1%}" for r in runs)
    print(f"| same argmax | {cells} | | |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("first", help="quantized checkpoint folder")
    parser.add_argument("second", help="quantized checkpoint folder")
    parser.add_argument("--eval", action="store_true", help="also score both on dev-rest")
    parser.add_argument(
        "--progress", action="store_true", help="second is a calibration progress folder"
    )
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    if args.progress and args.eval:
        raise SystemExit("--eval needs two finished checkpoints, not a progress folder")
    result = {"first": args.first, "second": args.second}
    if args.progress:
        *states, result["blocks"] = against_progress(args.first, args.second)
    else:
        states = [read_state_dict(Path(d) / WEIGHTS_FILE) for d in (args.first, args.second)]
    result |= compare(*states)
    if args.eval:
        result["eval"] = evaluate_pair(args.first, args.second)
    atomic_write_json(args.out, result)
    print(f"{result['identical']} of {result['tensors']} tensors bit-identical")
    quantizer_keys = ("scale", "zero_point", ".q", "s_pos", "s_neg")
    rows = sorted(result["differing"].items(), key=lambda kv: not kv[0].endswith(quantizer_keys))
    if rows:
        print("\n| tensor | elements differing | max relative difference |")
        print("|---|---|---|")
    for key, info in rows:
        if "shape" in info:
            print(f"| {key} | shapes {info['shape']} | – |")
        else:
            share = f"{info['elements_differing']} / {info['elements']}"
            print(f"| {key} | {share} | {info['max_relative']:.3g} |")
    if "eval" in result:
        print_eval(result["eval"])


if __name__ == "__main__":
    main()
