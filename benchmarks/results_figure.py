"""The README's results figure, drawn from the JSON logs that RESULTS.md cites.

Each bar is the dev-rest top-1 of one run as a share of the FP32 model's, so the paper's
ImageNet figures (another evaluation set, another FP32 top-1) sit on the same axis: for
DeiT-Tiny they are drawn as markers. A run with no JSON yet is left out, never guessed.

    python benchmarks/results_figure.py --out docs/results.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

LOGS = Path(__file__).resolve().parent / "logs"
ABLATIONS = Path(__file__).resolve().parent / "ablations"
FP32 = {"ViT-Tiny": 0.8376, "DeiT-Tiny": 0.7991}  # RESULTS.md, FP32 baselines (dev-rest)
FP32_JSON = {"ViT-Tiny": ABLATIONS / "vit_tiny_w4a4" / "fp32.json"}
METHODS = ("reference preset", "*-plus, calibrate only", "*-plus preset", "+ fast reconstruction")
COLORS = ("#4c72b0", "#dd8452", "#c44e52", "#55a868")
#: (model, bits, method) -> JSON logs whose top-1 are averaged (RESULTS.md's rows)
RUNS: dict[tuple[str, str, str], list[str]] = {
    ("ViT-Tiny", "W3A3", "reference preset"): [
        f"vit_tiny_w3a3_calib32_seed{s}.json" for s in (5, 6, 7)
    ],
    ("ViT-Tiny", "W3A3", "+ fast reconstruction"): [
        "vit_tiny_w3a3_seed6_recon_fast_token_norm_s14.json",
        "vit_tiny_w3a3_seed7_recon_fast_token_norm_s13.json",
    ],
    ("ViT-Tiny", "W4A4", "reference preset"): ["vit_tiny_w4a4_refcalib.json"],
    ("ViT-Tiny", "W4A4", "*-plus, calibrate only"): [
        f"vit_tiny_w4a4plus_calib32_seed{s}.json" for s in (5, 6, 7)
    ],
    ("ViT-Tiny", "W4A4", "*-plus preset"): [
        f"vit_tiny_w4a4plus_light_calib32_seed{s}.json" for s in (5, 6, 7)
    ],
    ("ViT-Tiny", "W4A4", "+ fast reconstruction"): [
        "vit_tiny_w4a4_refcalib_recon_fast_token_norm_s14.json"
    ],
    ("ViT-Tiny", "W6A6", "reference preset"): ["vit_tiny_w6a6_refcalib.json"],
    ("ViT-Tiny", "W6A6", "*-plus preset"): ["vit_tiny_w6a6plus_light_calib32_seed5.json"],
    ("DeiT-Tiny", "W3A3", "reference preset"): ["deit_tiny_w3a3_calib32_seed5_ref.json"],
    ("DeiT-Tiny", "W3A3", "*-plus preset"): ["deit_tiny_w3a3plus_light_calib32_seed5.json"],
    ("DeiT-Tiny", "W3A3", "+ fast reconstruction"): ["deit_tiny_w3a3_seed5_recon_fast_s18.json"],
    ("DeiT-Tiny", "W4A4", "reference preset"): [
        f"deit_tiny_w4a4_calib32_seed{s}_ref.json" for s in (5, 6, 7)
    ],
    ("DeiT-Tiny", "W4A4", "*-plus, calibrate only"): [
        f"deit_tiny_w4a4plus_calib32_seed{s}.json" for s in (5, 6, 7)
    ],
    ("DeiT-Tiny", "W4A4", "*-plus preset"): [
        f"deit_tiny_w4a4plus_light_calib32_seed{s}.json" for s in (5, 6, 7)
    ],
    ("DeiT-Tiny", "W4A4", "+ fast reconstruction"): ["deit_tiny_w4a4_seed5_recon_fast_s18.json"],
    ("DeiT-Tiny", "W6A6", "reference preset"): ["deit_tiny_w6a6_calib32_seed5_ref.json"],
    ("DeiT-Tiny", "W6A6", "*-plus preset"): ["deit_tiny_w6a6plus_light_calib32_seed5.json"],
}
#: The paper's DeiT-Tiny (official code, ImageNet, FP 72.21): calibrate-only and retrain.
PAPER = {("W3A3", "calibrate"): 31.56, ("W4A4", "calibrate"): 63.52, ("W6A6", "calibrate"): 71.38}
PAPER_RETRAIN = {"W3A3": 48.78, "W4A4": 67.14}
PAPER_FP = 72.21
BITS = ("W3A3", "W4A4", "W6A6")


def run_top1(files: list[str], logs: Path = LOGS) -> tuple[float, int] | None:
    """Mean top-1 of the runs whose JSON exists, and how many; None if none does."""
    values = [json.loads((logs / f).read_text())["top1"] for f in files if (logs / f).exists()]
    return (sum(values) / len(values), len(values)) if values else None


def fp32_top1(model: str) -> float:
    path = FP32_JSON.get(model)
    return json.loads(path.read_text())["top1"] if path and path.exists() else FP32[model]


def collect(logs: Path = LOGS) -> dict[tuple[str, str, str], tuple[float, int]]:
    found = {key: run_top1(files, logs) for key, files in RUNS.items()}
    return {key: value for key, value in found.items() if value is not None}


def draw(results: dict, out: Path) -> None:
    models = ("ViT-Tiny", "DeiT-Tiny")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    width = 0.2
    for ax, model in zip(axes, models, strict=True):
        fp = fp32_top1(model)
        for m, method in enumerate(METHODS):
            xs, ys, labels = [], [], []
            for b, bits in enumerate(BITS):
                if (model, bits, method) in results:
                    top1, n = results[(model, bits, method)]
                    xs.append(b + (m - 1.5) * width)
                    ys.append(top1 / fp)
                    labels.append(f"{top1:.3f}" + (f"\n({n} runs)" if n > 1 else ""))
            ax.bar(xs, ys, width, label=method, color=COLORS[m])
            for x, y, text in zip(xs, ys, labels, strict=True):
                ax.text(x, y + 0.01, text, ha="center", va="bottom", fontsize=7)
        if model == "DeiT-Tiny":
            xs = [BITS.index(b) - 1.5 * width for (b, _), _ in PAPER.items()]
            ys = [v / PAPER_FP for v in PAPER.values()]
            ax.scatter(xs, ys, marker="_", s=300, color="black", label="paper, calibrate only")
            xs = [BITS.index(b) + 1.5 * width for b in PAPER_RETRAIN]
            ys = [v / PAPER_FP for v in PAPER_RETRAIN.values()]
            ax.scatter(xs, ys, marker="x", color="black", label="paper, retrain")
        ax.axhline(1.0, color="grey", linestyle="--", linewidth=1)
        ax.set_xticks(range(len(BITS)), BITS)
        ax.set_title(f"{model} (FP32 top-1 {fp:.3f} on dev-rest)")
        ax.set_ylim(0, 1.15)
    axes[0].set_ylabel("top-1 / FP32 top-1")
    handles = [Patch(color=c, label=m) for m, c in zip(METHODS, COLORS, strict=True)]
    handles += [h for h in axes[1].get_legend_handles_labels()[0] if not isinstance(h, Patch)]
    handles = [h for h in handles if not hasattr(h, "patches")]  # bar containers: a Patch above
    fig.legend(handles=handles, loc="lower center", ncol=5, fontsize=8, frameon=False)
    fig.suptitle("adalog on the shared benchmark (bar labels: dev-rest top-1)", fontsize=10)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/results.png", help="PNG to write")
    args = parser.parse_args(argv)
    results = collect()
    draw(results, Path(args.out))
    for (model, bits, method), (top1, n) in sorted(results.items()):
        print(f"{model:9} {bits} {method:24} {top1:.4f} ({n} runs)")
    missing = sorted(set(RUNS) - set(results))
    if missing:
        print("no JSON yet:", "; ".join(" ".join(key) for key in missing))


if __name__ == "__main__":
    main()
