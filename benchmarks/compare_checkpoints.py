"""Tensor-by-tensor comparison of two quantized checkpoints (e.g. fast vs naive search engine).

Reports how many tensors are bit-identical and, for the others, the largest relative difference
and how many elements differ; quantizer parameters (scales, zero points, q) decide the model, so
they are listed first. Prints a Markdown table, writes JSON.

Example (issue 5: the fast engine against the straightforward one):
    python benchmarks/compare_checkpoints.py runs/w4a4_refcalib runs/w4a4_refcalib_naive \
        --out benchmarks/logs/compare_fast_naive_w4a4.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from adalog.io import atomic_write_json
from adalog.models import read_state_dict
from adalog.pipelines.checkpoint import WEIGHTS_FILE


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("first", help="quantized checkpoint folder")
    parser.add_argument("second", help="quantized checkpoint folder")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    states = [read_state_dict(Path(d) / WEIGHTS_FILE) for d in (args.first, args.second)]
    result = {"first": args.first, "second": args.second} | compare(*states)
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


if __name__ == "__main__":
    main()
