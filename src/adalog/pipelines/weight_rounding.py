"""GPTQ weight rounding of a calibrated model (``weight_rounding="gptq"``, beyond the reference).

After the searches have fixed every grid, one FP forward pass over the calibration images
collects each quantized layer's input Gram matrix ``X̂ᵀX̂`` (``X̂``: the FP input through the
layer's own input quantizer, i.e. what the quantized layer multiplies; every token scaled to
unit norm, see :func:`adalog.search.gptq.input_gram`), and
:func:`adalog.search.gptq.gptq_round` re-rounds the layer's weights on its grid. The weights are
stored on-grid, so the model's raw mode is no longer the FP model afterwards (as after
reconstruction).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from tqdm import tqdm

from adalog.models.hooks import forward_batches, forward_hooks
from adalog.models.qmodules import QuantConv2d, QuantLinear, set_quant_mode
from adalog.quant import asym_fake_quant
from adalog.search.gptq import gptq_round, input_gram

__all__ = ["collect_input_grams", "gptq_layers", "gptq_round_weights"]


def _layer_inputs(module: nn.Module, x: Tensor) -> Tensor:
    """What the quantized layer multiplies by its weight: quantized inputs (linear) or the
    unfolded patches (conv), as ``(T, I)``."""
    if isinstance(module, QuantConv2d):
        return module.input_patches(x)
    quant = module.input_quant
    if quant is not None and not getattr(quant, "is_identity", False):
        x = quant(x)
    return x.reshape(-1, x.shape[-1])


def gptq_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The layers GPTQ re-rounds: every quantized linear/conv but the classifier head, which
    sees one token per image (too few to estimate its Gram matrix; re-rounding it raised the
    KL to FP of ViT-Tiny W4A4 in our measurements)."""
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, (QuantLinear, QuantConv2d))
        and module is not head
        and not module.weight_quant.is_identity
    }


def collect_input_grams(
    model: nn.Module,
    layers: dict[str, nn.Module],
    images: Tensor,
    batch_size: int,
    progress: bool = False,
    normalize_tokens: bool = True,
) -> dict[str, Tensor]:
    """``X̂ᵀX̂`` (float64) of each of ``layers`` over one FP pass of ``images``."""
    grams: dict[str, Tensor] = {}

    def hook(name, module, inputs, _output):
        gram = input_gram(_layer_inputs(module, inputs[0]), normalize_tokens)
        grams[name] = gram if name not in grams else grams[name] + gram

    set_quant_mode(model, False)
    with forward_hooks(layers, hook):
        forward_batches(model, images, batch_size, "gptq: input grams", progress)
    return grams


def gptq_round_weights(
    model: nn.Module,
    images: Tensor,
    batch_size: int = 32,
    damp: float = 0.1,
    progress: bool = False,
    layers: dict[str, nn.Module] | None = None,
    normalize_tokens: bool = True,
) -> nn.Module:
    """Re-round the weights of ``layers`` (default :func:`gptq_layers`) of ``model`` (wrapped,
    calibrated, raw mode FP) with GPTQ on their calibrated grids; returns it in quant mode."""
    model.eval()
    layers = gptq_layers(model) if layers is None else layers
    grams = collect_input_grams(model, layers, images, batch_size, progress, normalize_tokens)
    for name in tqdm(list(grams), desc="gptq: rounding", disable=not progress):
        module = layers[name]
        quant = module.weight_quant
        rows = module.weight.detach().reshape(module.weight.shape[0], -1)
        scale = quant.scale.reshape(-1)
        zero = quant.zero_point.reshape(-1)

        def fake_quant(column: Tensor, s=scale, z=zero, b=quant.n_bits) -> Tensor:
            return asym_fake_quant(column, s, z, b)

        rounded = gptq_round(rows, grams[name], fake_quant, damp=damp)
        with torch.no_grad():
            module.weight.copy_(rounded.reshape(module.weight.shape))
    set_quant_mode(model, True)
    return model
