"""GPTQ weight rounding: the algorithm on synthetic layers, and the calibration option."""

import pytest
import timm
import torch

import adalog
import adalog.cli
from adalog.config import AdaLogConfig
from adalog.errors import ConfigError
from adalog.models.qmodules import QuantConv2d, QuantLinear
from adalog.pipelines.weight_rounding import gptq_layers
from adalog.quant import asym_fake_quant
from adalog.search.gptq import gptq_round, input_gram

SMALL = AdaLogConfig.w4a4(eq_n=32, search_rounds=1, fpcs_steps=2)
VIT_KW = {"depth": 2, "img_size": 64, "patch_size": 16}


def _grid(rows: torch.Tensor, n_bits: int = 4):
    """A per-row min/max grid and its fake quantizer."""
    lo, hi = rows.min(1).values, rows.max(1).values
    scale = (hi - lo) / (2**n_bits - 1)
    zero = torch.round(-lo / scale)
    return lambda column: asym_fake_quant(column, scale, zero, n_bits)


def _correlated_inputs(n: int, dim: int, seed: int = 0) -> torch.Tensor:
    """Samples of one fixed correlated distribution (``seed`` picks the samples)."""
    mixing = torch.randn(dim, dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    mixing = torch.eye(dim, dtype=torch.float64) + 0.3 * mixing
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, dim, generator=g, dtype=torch.float64) @ mixing


def test_orthogonal_inputs_give_nearest_rounding():
    """With H diagonal no column's error feeds another: GPTQ is round-to-nearest."""
    rows = torch.randn(6, 10, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    quant = _grid(rows)
    gram = torch.diag(torch.linspace(1.0, 5.0, 10, dtype=torch.float64))
    rounded = gptq_round(rows, gram, quant, damp=0.01)
    assert torch.equal(rounded, quant(rows.T).T)


def test_error_feedback_lowers_output_error_on_held_out_inputs():
    rows = torch.randn(16, 24, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    quant = _grid(rows)
    fit, held_out = _correlated_inputs(2000, 24, seed=3), _correlated_inputs(2000, 24, seed=4)
    rounded = gptq_round(rows, input_gram(fit), quant)
    nearest = quant(rows.T).T
    assert torch.equal(quant(rounded.T).T, rounded)  # on the grid
    assert not torch.equal(rounded, nearest)

    def error(w_hat: torch.Tensor) -> float:
        return (held_out @ (rows - w_hat).T).square().sum().item()

    assert error(rounded) < 0.7 * error(nearest)


def test_columns_without_input_are_rounded_to_nearest():
    rows = torch.randn(5, 8, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    quant = _grid(rows)
    x = _correlated_inputs(500, 8, seed=6)
    x[:, 3] = 0.0
    rounded = gptq_round(rows, input_gram(x), quant)
    assert torch.equal(rounded[:, 3], quant(rows[:, 3]))
    assert torch.isfinite(rounded).all()


def test_token_normalized_gram_ignores_token_magnitudes():
    x = _correlated_inputs(50, 6, seed=7)
    scaled = x * torch.logspace(-3, 3, 50, dtype=torch.float64)[:, None]
    assert torch.allclose(input_gram(scaled), input_gram(x), rtol=1e-10, atol=1e-12)
    assert torch.allclose(input_gram(x, normalize_tokens=False), x.T @ x)
    assert torch.allclose(torch.diagonal(input_gram(x)).sum(), torch.tensor(50.0).double())


def test_gram_shape_is_checked():
    with pytest.raises(ValueError, match="gram must be"):
        gptq_round(torch.zeros(2, 3), torch.eye(4), lambda c: c)


def _calibrated(config: AdaLogConfig) -> torch.nn.Module:
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **VIT_KW).eval()
    images = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    return adalog.quantize(model, images, config, progress=False)


def test_gptq_calibration_rerounds_only_the_selected_layers_on_their_grids():
    nearest = _calibrated(SMALL)
    gptq = _calibrated(SMALL.with_overrides(weight_rounding="gptq", gptq_views=8))
    selected = set(gptq_layers(gptq))
    assert len(selected) == 9 and "head" not in selected  # patch embed + 4 linears per block
    assert {"patch_embed.proj", "blocks.0.attn.qkv", "blocks.1.mlp.fc2"} <= selected
    changed = 0
    for name, module in gptq.named_modules():
        if not isinstance(module, (QuantLinear, QuantConv2d)):
            continue
        reference = nearest.get_submodule(name)
        # same grids: the searches ran on FP captures before any re-rounding
        assert torch.equal(module.weight_quant.scale, reference.weight_quant.scale), name
        w_hat = module.quantized_weight()
        if name in selected:
            assert torch.equal(module.weight_quant(module.weight), module.weight), name
            changed += not torch.equal(w_hat, reference.quantized_weight())
        else:
            assert torch.equal(w_hat, reference.quantized_weight()), name
    assert changed >= 8  # of 9 selected layers


def test_gptq_models_are_refused_by_reconstruct():
    model = _calibrated(SMALL.with_overrides(weight_rounding="gptq", gptq_views=4))
    images = torch.randn(2, 3, 64, 64)
    with pytest.raises(ConfigError, match="GPTQ-rounded"):
        adalog.reconstruct(model, images, adalog.ReconstructConfig.fast(), progress=False)


def test_weight_rounding_config_is_validated():
    with pytest.raises(ConfigError, match="weight_rounding"):
        AdaLogConfig(weight_rounding="stochastic")
    with pytest.raises(ConfigError, match="gptq_damp"):
        AdaLogConfig(gptq_damp=0.0)


def test_cli_refuses_gptq_with_reconstruction_before_calibrating(
    tmp_path, random_deit_and_images, capsys
):
    weights, data = random_deit_and_images
    args = ["quantize", "--model", "deit_tiny_patch16_224", "--weights", str(weights)]
    args += ["--calib-data", str(data), "--out", str(tmp_path / "q")]
    args += ["--weight-rounding", "gptq", "--reconstruct"]
    assert adalog.cli.main(args) != 0
    assert "--weight-rounding gptq" in capsys.readouterr().err
    assert not (tmp_path / "q").exists()


def test_gptq_calibration_of_a_swin_model_keeps_weights_on_grid():
    torch.manual_seed(0)
    kwargs = {"img_size": 64, "window_size": 4, "depths": (1, 1), "num_heads": (1, 2)}
    model = timm.create_model("swin_tiny_patch4_window7_224", embed_dim=24, **kwargs).eval()
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    config = SMALL.with_overrides(weight_rounding="gptq", gptq_views=4)
    adalog.quantize(model, images, config, progress=False)
    selected = gptq_layers(model)
    assert "layers.1.downsample.reduction" in selected and "head.fc" not in selected
    for name, module in selected.items():
        assert torch.equal(module.weight_quant(module.weight), module.weight), name
    with torch.no_grad():
        assert torch.isfinite(model(images)).all()
