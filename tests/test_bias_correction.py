"""Bias correction: each mode removes the mean output shift it is defined to remove."""

import pytest
import timm
import torch

import adalog
from adalog.config import AdaLogConfig
from adalog.models.qmodules import QuantConv2d, set_quant_mode
from adalog.pipelines.bias_correction import correct_biases, correctable_layers
from adalog.pipelines.reconstruct import unfold_post_gelu_shift

SMALL = AdaLogConfig.w4a4(eq_n=32, search_rounds=1, fpcs_steps=2)


def _calibrated_unfolded() -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, depth=2, img_size=64, patch_size=16
    ).eval()
    images = torch.randn(6, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    adalog.quantize(model, images, SMALL, progress=False)
    unfold_post_gelu_shift(model)  # raw mode is the FP model again
    return model, images


def _channel_mean(module: torch.nn.Module, y: torch.Tensor) -> torch.Tensor:
    dims = (0, 2, 3) if isinstance(module, QuantConv2d) else tuple(range(y.dim() - 1))
    return y.double().mean(dims)


def _fp_inputs(model: torch.nn.Module, images: torch.Tensor) -> dict[str, torch.Tensor]:
    layers = correctable_layers(model)
    inputs = {}
    handles = [
        m.register_forward_pre_hook(lambda mod, i, n=name: inputs.__setitem__(n, i[0]))
        for name, m in layers.items()
    ]
    set_quant_mode(model, False)
    with torch.no_grad():
        model(images)
    for handle in handles:
        handle.remove()
    return inputs


def _layer_means(model, inputs: dict[str, torch.Tensor], quant: bool) -> dict[str, torch.Tensor]:
    """Each layer alone, on the given inputs, in raw or quant mode."""
    means = {}
    with torch.no_grad():
        for name, module in correctable_layers(model).items():
            module.set_quant(quant)
            means[name] = _channel_mean(module, module(inputs[name]))
    return means


def test_layer_mode_makes_each_layers_mean_output_match_fp_on_fp_inputs():
    model, images = _calibrated_unfolded()
    inputs = _fp_inputs(model, images)
    fp = _layer_means(model, inputs, quant=False)
    before = _layer_means(model, inputs, quant=True)
    corrections = correct_biases(model, images, "layer", batch_size=4)
    after = _layer_means(model, inputs, quant=True)
    assert set(corrections) == set(fp) and "head" in fp and "patch_embed.proj" in fp
    shifted = 0
    for name in fp:
        gap_before = (before[name] - fp[name]).abs().max().item()
        gap_after = (after[name] - fp[name]).abs().max().item()
        assert gap_after <= 1e-5 * max(1.0, fp[name].abs().max().item()), name
        shifted += gap_before > 1e-3
    assert shifted >= 5  # 4-bit errors are not zero-mean in most layers


def test_network_mode_matches_the_fp_models_mean_logits():
    model, images = _calibrated_unfolded()
    set_quant_mode(model, False)
    with torch.no_grad():
        fp_logits = model(images).double().mean(0)
        set_quant_mode(model, True)
        before = model(images).double().mean(0)
    correct_biases(model, images, "network", batch_size=4)
    with torch.no_grad():
        after = model(images).double().mean(0)  # correct_biases leaves quant mode on
    assert (before - fp_logits).abs().max() > 1e-3
    assert torch.allclose(after, fp_logits, rtol=0, atol=1e-5)


def test_unknown_mode_is_refused():
    model, images = _calibrated_unfolded()
    with pytest.raises(ValueError, match="bias correction"):
        correct_biases(model, images, "global")
