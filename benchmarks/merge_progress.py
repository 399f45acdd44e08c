"""Merge the calibration progress of two resumable runs (``--resume``) of the same model, config
and images, block by block, so that two processes can calibrate different blocks at once.

Every module is calibrated on FP captures (docs/algorithm.md §10.19), so block k's search sees only
the FP network in front of it: the folded weights, biases and LayerNorms of blocks < k, not
their quantizer parameters. Process A calibrates blocks 4-7; process B redoes them with a
faster engine, then calibrates blocks 8+. If A's and B's FP tensors of blocks 4-7 are bit-identical,
B's later blocks saw exactly the captures a single run would have, and taking A's blocks 4-7 into
B's state gives exactly the single run's result. The script checks that condition and refuses
to merge otherwise, and reports (``merge_report.json``) the quantizer tensors in which the two
runs differ there.

Example (the split float64 run of the naive engine, issue 5, 2026-12-05):
    python benchmarks/merge_progress.py runs/naive_f64_progress_b runs/naive_f64_progress \
        --blocks blocks.4 blocks.5 blocks.6 blocks.7 --out runs/naive_f64_progress_merged
The merged folder resumes with the same command as either run (nothing left to calibrate: it
saves and evaluates).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from compare_checkpoints import compare, in_blocks

from adalog.errors import AdalogError
from adalog.io import atomic_write_json
from adalog.models import read_state_dict
from adalog.pipelines.runstore import PROGRESS_WEIGHTS, read_progress_meta, write_progress

RUN_KEYS = ("done_blocks", "record", "format_version")


def is_quantizer_tensor(key: str) -> bool:
    """Quantizer parameters (``*_quant.*``) do not enter the FP forward pass."""
    return any(part.endswith("_quant") for part in key.split("."))


def merge(base_dir: Path, other_dir: Path, blocks: list[str]) -> tuple[dict, dict, dict]:
    """``base``'s progress with ``other``'s tensors for ``blocks``; returns the merged state, the
    merged meta and a report of the taken blocks' differences."""
    base_meta, other_meta = read_progress_meta(base_dir), read_progress_meta(other_dir)
    differing = sorted(
        k for k in set(base_meta) | set(other_meta)
        if k not in RUN_KEYS and base_meta.get(k) != other_meta.get(k)
    )  # fmt: skip
    if differing:
        raise SystemExit(f"the runs differ in {differing}: not the same calibration")
    missing = [b for b in blocks if b not in other_meta["done_blocks"]]
    if missing:
        raise SystemExit(f"{other_dir} has not finished {missing}")
    base = read_state_dict(base_dir / PROGRESS_WEIGHTS)
    other = read_state_dict(other_dir / PROGRESS_WEIGHTS)
    taken = sorted(k for k in other if in_blocks(k, blocks))
    if not taken or any(k not in base for k in taken):
        raise SystemExit(f"the two states do not hold the same tensors for {blocks}")
    fp_differing = [
        k for k in taken if not is_quantizer_tensor(k) and not torch.equal(base[k], other[k])
    ]
    if fp_differing:
        raise SystemExit(
            f"FP tensors differ in the taken blocks ({fp_differing[:5]}): the base run's later "
            "blocks saw other captures than a single run would have; not merging"
        )
    merged = base | {k: other[k] for k in taken}
    done = list(dict.fromkeys(base_meta["done_blocks"] + blocks))
    report = {"taken_blocks": blocks} | compare(
        {k: base[k] for k in taken}, {k: other[k] for k in taken}
    )
    return merged, base_meta | {"done_blocks": done}, report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("base", type=Path, help="progress folder kept for every other block")
    parser.add_argument("other", type=Path, help="progress folder the --blocks come from")
    parser.add_argument("--blocks", nargs="+", required=True)
    parser.add_argument("--out", type=Path, required=True, help="new progress folder")
    args = parser.parse_args()
    try:
        state, meta, report = merge(args.base, args.other, args.blocks)
    except AdalogError as exc:  # unreadable progress
        raise SystemExit(f"merge_progress: {exc}") from exc
    write_progress(args.out, state, meta)
    atomic_write_json(args.out / "merge_report.json", report)
    print(
        f"{args.out}: {len(meta['done_blocks'])} units done; {report['tensors']} tensors of "
        f"{', '.join(args.blocks)} from {args.other} (FP tensors bit-identical in both runs; "
        f"{len(report['differing'])} quantizer tensors differ, see merge_report.json)"
    )


if __name__ == "__main__":
    main()
