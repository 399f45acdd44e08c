"""Bias correction of a calibrated model (beyond the reference; measured, not a config option).

Quantization errors are not zero-mean: a clipped input or a row of weights rounded mostly one
way shifts a layer's outputs on average, and the next LayerNorm does not remove a per-channel
shift. Each quantized linear/conv gets ``E[y_FP] - E[y_Q]`` added to its bias (per output
channel, averaged over the calibration views' tokens), which removes that shift:

* ``"layer"``: the layer's own error. One FP pass; every layer's quantized output is computed
  on the same FP inputs as its FP output (no interaction between layers, so one pass).
* ``"network"``: the whole network's drift (empirical bias correction). Layer by layer in
  forward order, the quantized model (with the corrections made so far) runs up to that layer
  and its mean output is matched to the FP model's. Costs one partial pass per layer.

Runs on a model whose raw mode is its FP model (post-GELU shift not folded yet); the biases it
changes are FP tensors, so checkpoints and exports need nothing new. On the W4A4 ViT-Tiny the
``layer`` mode barely moved the KL to FP and ``network`` made it worse
(``benchmarks/bias_correction.py``, RESULTS.md), so calibration does not call this.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn
from tqdm import tqdm

from adalog.models.hooks import StopForward, forward_batches, forward_hooks
from adalog.models.qmodules import QuantConv2d, QuantLinear, set_quant_mode

__all__ = ["BIAS_CORRECTION_MODES", "correct_biases", "correctable_layers"]

BiasCorrection = Literal["layer", "network"]
BIAS_CORRECTION_MODES: tuple[str, ...] = ("layer", "network")


def correctable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every quantized linear/conv with a quantized weight, in forward (registration) order."""
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, (QuantLinear, QuantConv2d)) and not module.weight_quant.is_identity
    }


def _channel_sum(y: Tensor, conv: bool) -> tuple[Tensor, int]:
    """Per-output-channel float64 sum of ``y`` and the number of values per channel."""
    y = y.double()
    if conv:  # (B, C, H, W)
        return y.sum(dim=(0, 2, 3)), y.numel() // y.shape[1]
    flat = y.reshape(-1, y.shape[-1])
    return flat.sum(0), flat.shape[0]


class _MeanAccumulator:
    def __init__(self) -> None:
        self.sums: dict[str, Tensor] = {}
        self.counts: dict[str, int] = {}

    def add(self, name: str, y: Tensor, conv: bool) -> None:
        total, count = _channel_sum(y, conv)
        self.sums[name] = self.sums[name] + total if name in self.sums else total
        self.counts[name] = self.counts.get(name, 0) + count

    def mean(self, name: str) -> Tensor:
        return self.sums[name] / self.counts[name]


def _add_to_bias(module: QuantLinear | QuantConv2d, delta: Tensor) -> None:
    with torch.no_grad():
        bias = module.ensure_bias()
        bias.add_(delta.to(bias.dtype))


def _layer_own_error(
    model: nn.Module, layers: dict[str, nn.Module], images: Tensor, batch_size: int
) -> dict[str, Tensor]:
    """``E[y_FP - y_Q]`` per layer on FP inputs (one raw-mode pass)."""
    acc = _MeanAccumulator()
    busy: set[str] = set()

    def hook(name, module, inputs, output):
        if name in busy:  # the quantized re-run below fires this hook again
            return
        busy.add(name)
        try:
            module.set_quant(True)
            quantized = module(inputs[0])
        finally:
            module.set_quant(False)
            busy.discard(name)
        acc.add(name, output - quantized, isinstance(module, QuantConv2d))

    set_quant_mode(model, False)
    with forward_hooks(layers, hook):
        forward_batches(model, images, batch_size)
    return {name: acc.mean(name) for name in layers}


def _output_means(
    model: nn.Module, layers: dict[str, nn.Module], images: Tensor, batch_size: int
) -> dict[str, Tensor]:
    """Mean output per channel of each of ``layers`` over one pass of ``model`` as it is;
    stops each forward after the last of ``layers`` in forward order."""
    acc = _MeanAccumulator()
    last = list(layers)[-1]

    def hook(name, module, _inputs, output):
        acc.add(name, output, isinstance(module, QuantConv2d))
        if name == last:
            raise StopForward

    with forward_hooks(layers, hook):
        forward_batches(model, images, batch_size)
    return {name: acc.mean(name) for name in layers}


def correct_biases(
    model: nn.Module,
    images: Tensor,
    mode: BiasCorrection = "layer",
    batch_size: int = 32,
    progress: bool = False,
    layers: dict[str, nn.Module] | None = None,
) -> dict[str, Tensor]:
    """Add ``E[y_FP] - E[y_Q]`` to the bias of each of ``layers`` (default: every quantized
    linear/conv); returns the corrections. ``model``: wrapped, calibrated, raw mode FP (shift
    not folded). Leaves the model in quant mode."""
    if mode not in BIAS_CORRECTION_MODES:
        raise ValueError(f"bias correction {mode!r}: expected one of {BIAS_CORRECTION_MODES}")
    model.eval()
    layers = correctable_layers(model) if layers is None else layers
    if mode == "layer":
        corrections = _layer_own_error(model, layers, images, batch_size)
        for name, delta in corrections.items():
            _add_to_bias(layers[name], delta)
    else:  # network
        corrections: dict[str, Tensor] = {}
        set_quant_mode(model, False)
        fp_means = _output_means(model, layers, images, batch_size)
        set_quant_mode(model, True)
        for name in tqdm(list(layers), desc="bias correction", disable=not progress):
            quant_mean = _output_means(model, {name: layers[name]}, images, batch_size)[name]
            corrections[name] = fp_means[name] - quant_mean
            _add_to_bias(layers[name], corrections[name])
    set_quant_mode(model, True)
    return corrections
