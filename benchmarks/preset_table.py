"""The presets table: reference vs beyond-reference (``*-plus``) presets, over calibration seeds.

Reads the JSON rows that ``quantize_eval.py`` (via ``run_plus_queue.sh``) and
``reconstruct_eval.py`` wrote under benchmarks/logs, groups them by model, bits and preset, and
prints one Markdown row per group: mean and sample standard deviation of the dev-rest top-1
over its seeds, each seed's top-1, minutes (calibration plus any reconstruction) and peak RSS,
with the reference implementation's figure beside it where ../shared/REFERENCE.md has one.
A ``*`` marks a resumed run: its minutes count its last process only. Writes the same as JSON
(``minutes`` and ``resumed`` per seed).

    python benchmarks/preset_table.py --out benchmarks/logs/preset_table.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from adalog.io import atomic_write_json

LOGS = Path(__file__).resolve().parent / "logs"
#: The reference implementation's own dev-rest top-1 (../shared/REFERENCE.md); the other
#: model/bit combinations are still "pending" there.
REFERENCE_IMPLEMENTATION = {("vit_tiny_patch16_224", "w4a4"): 0.6004}
#: (preset row, file-name tag after the bits, suffix): ``quantize_eval.py`` rows for the
#: calibrate-only presets, ``reconstruct_eval.py`` rows for the reconstructed ones.
PRESET_ROWS = (
    ("reference", "", "_ref"),
    ("plus, calibrate only", "plus", ""),
    ("plus (light reconstruction)", "plus_light", ""),
    ("plus + fast reconstruction", "plus_fast", ""),
)
#: (model, bits, preset) -> file-name pattern of its rows (one per calibration seed).
GROUPS = {
    (model, bits, preset): f"{short}_{bits}{tag}_calib32_seed*{suffix}.json"
    for model, short in (
        ("vit_tiny_patch16_224", "vit_tiny"),
        ("deit_tiny_patch16_224", "deit_tiny"),
    )
    for bits in ("w3a3", "w4a4", "w6a6")
    for preset, tag, suffix in PRESET_ROWS
}


def _seconds(row: dict) -> float:
    """Calibration plus reconstruction time of one run (its last process only, if resumed)."""
    return (row.get("calib_seconds") or 0.0) + (row.get("reconstruct_seconds") or 0.0)


def summarise(rows: list[dict]) -> dict:
    top1 = [r["top1"] for r in rows]
    return {
        "seeds": [r["config"]["seed"] for r in rows],
        "top1": top1,
        "mean": statistics.fmean(top1),
        "sd": statistics.stdev(top1) if len(top1) > 1 else None,
        "minutes": [round(_seconds(r) / 60, 1) for r in rows],
        "resumed": [bool(r.get("resumed")) for r in rows],
        "peak_rss_mb": max(r["peak_rss_mb"] for r in rows),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--logs", type=Path, default=LOGS)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    table = []
    print(
        "| model | bits | preset | seeds | dev-rest top-1 mean (sd) | per seed | reference "
        "implementation | calibration + reconstruction (min) | peak RSS |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for (model, bits, preset), pattern in GROUPS.items():
        rows = [json.loads(p.read_text()) for p in sorted(args.logs.glob(pattern))]
        if not rows:
            continue
        summary = summarise(rows) | {"model": model, "bits": bits, "preset": preset}
        summary["reference_implementation"] = REFERENCE_IMPLEMENTATION.get((model, bits))
        table.append(summary)
        sd = "" if summary["sd"] is None else f" ({summary['sd']:.4f})"
        minutes = " / ".join(
            f"{m}*" if r else str(m)
            for m, r in zip(summary["minutes"], summary["resumed"], strict=True)
        )
        ref = summary["reference_implementation"]
        print(
            f"| {model} | {bits} | {preset} | {', '.join(map(str, summary['seeds']))} "
            f"| {summary['mean']:.4f}{sd} | {' / '.join(f'{t:.4f}' for t in summary['top1'])} "
            f"| {'' if ref is None else f'{ref:.4f}'} "
            f"| {minutes} "
            f"| {summary['peak_rss_mb']:.0f} MB |"
        )
    atomic_write_json(args.out, table)


if __name__ == "__main__":
    main()
