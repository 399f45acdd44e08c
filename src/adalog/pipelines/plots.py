"""Readable PNG figures for ablation runs: accuracy per variant, activation histograms with each
quantizer's representable levels drawn over them."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display

import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from adalog.config import AdaLogConfig  # noqa: E402
from adalog.models.parts import FC2, MATMUL_AV, model_parts  # noqa: E402
from adalog.models.wrap import wrap_model  # noqa: E402

ACTIVATIONS = {
    "post_softmax": (MATMUL_AV, "a_quant", "post-Softmax attention probabilities"),
    "post_gelu": (FC2, "input_quant", "post-GELU activations (fc2 input)"),
}


def _block_module(model: nn.Module, block: int, part: str) -> nn.Module:
    """The attn·v matmul or the fc2 of transformer block ``block`` (counted over the whole
    model)."""
    found = model_parts(model).find(model, part)
    if not 0 <= block < len(found):
        raise IndexError(f"block {block} out of range: the model has {len(found)} blocks")
    return found[block][1]


def capture_activations(model: nn.Module, images: Tensor, block: int) -> dict[str, Tensor]:
    """FP post-Softmax and post-GELU activations of one block (wraps ``model`` in raw mode)."""
    wrap_model(model, AdaLogConfig())
    captured: dict[str, Tensor] = {}
    handles = []
    for key, (part, _, _) in ACTIVATIONS.items():

        def hook(module, inputs, output, key=key):
            captured[key] = inputs[0].detach().flatten().cpu()  # numpy plots it

        handles.append(_block_module(model, block, part).register_forward_hook(hook))
    with torch.no_grad():
        model(images)
    for handle in handles:
        handle.remove()
    return captured


def quantizer_values(model: nn.Module, block: int) -> dict[str, list[float]]:
    """Representable values of the block's post-Softmax and post-GELU quantizers."""
    out = {}
    for key, (part, attr, _) in ACTIVATIONS.items():
        quant = getattr(_block_module(model, block, part), attr)
        out[key] = quant.representable_values().tolist()
    return out


def plot_accuracy(
    rows: list[dict[str, Any]],
    path: str | Path,
    title: str,
    fp32: dict[str, Any] | None = None,
) -> None:
    """Horizontal bars of top-1 per variant, coloured by group (order kept), value printed on
    each bar; the FP model's top-1 as a dashed line when given."""
    names = [r["variant"] for r in rows]
    top1 = [100 * r["top1"] for r in rows]
    groups = list(dict.fromkeys(r["group"] for r in rows))
    palette = plt.get_cmap("tab10")
    colors = [palette(groups.index(r["group"]) % 10) for r in rows]
    fig, ax = plt.subplots(figsize=(8, 0.4 * len(rows) + 1.8))
    bars = ax.barh(range(len(rows)), top1, color=colors)
    ax.set_yticks(range(len(rows)), names)
    ax.invert_yaxis()
    ax.set_xlabel("top-1 accuracy (%)")
    ax.set_title(title)
    ax.bar_label(bars, fmt="%.1f", padding=2)
    ax.set_xlim(0, 100)
    handles = [plt.Rectangle((0, 0), 1, 1, color=palette(i % 10)) for i in range(len(groups))]
    labels = list(groups)
    if fp32 is not None:
        handles.append(ax.axvline(100 * fp32["top1"], color="black", linestyle="--"))
        labels.append(f"FP32 ({100 * fp32['top1']:.1f})")
    ax.legend(handles, labels, loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_levels(
    activations: dict[str, Tensor],
    variants: list[tuple[str, dict[str, list[float]]]],
    key: str,
    path: str | Path,
    block: int,
) -> None:
    """One row per variant: the activation histogram (grey) with its quantizer's levels (red).

    Post-Softmax values are drawn on a log2 axis (they crowd near 0); the zero state and any
    non-positive level sit at the left edge.
    """
    data = activations[key]
    log_axis = key == "post_softmax"
    label = ACTIVATIONS[key][2]
    fig, axes = plt.subplots(
        len(variants),
        1,
        figsize=(9, 1.6 * len(variants) + 1),
        sharex=True,
        squeeze=False,
        layout="constrained",  # keeps the figure title clear of the first panel's
    )
    floor = -24.0
    values = torch.log2(data.clamp_min(2.0**floor)) if log_axis else data
    for ax, (name, levels) in zip(axes[:, 0], variants, strict=True):
        ax.hist(values.numpy(), bins=200, color="0.6", log=True)
        for level in levels[key]:
            if log_axis:
                x = max(math.log2(level), floor) if level > 0 else floor
            else:
                x = level
            ax.axvline(x, color="tab:red", linewidth=0.8)
        ax.set_ylabel("count")
        ax.set_title(f"{name}: {len(levels[key])} representable values", fontsize=9)
    axes[-1, 0].set_xlabel(f"log2({label}); zero drawn at {floor:.0f}" if log_axis else label)
    fig.suptitle(f"Block {block}: {label} and quantizer levels")
    fig.savefig(path, dpi=110)
    plt.close(fig)
