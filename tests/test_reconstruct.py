"""Block reconstruction (§7): AdaRound, fused STE quantizers, data, schedule, pipeline, CLI."""

import copy
import json
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F

import adalog
import adalog.cli
from adalog.config import PLUS_RECONSTRUCTION, AdaLogConfig
from adalog.errors import ConfigError
from adalog.models import read_state_dict
from adalog.models.qmodules import QuantConv2d, QuantLinear
from adalog.pipelines.reconstruct import round_beta, token_norm_weights, unfold_post_gelu_shift
from adalog.pipelines.runstore import PROGRESS_WEIGHTS, read_progress_meta, write_progress
from adalog.quant import GELU_SHIFT, LogQuantizer, UniformQuantizer
from adalog.recon import AdaRoundQuantizer, ReconstructConfig
from adalog.recon.adaround import rectified_sigmoid, round_regularizer
from adalog.recon.blocks import TailUnit, reconstruction_blocks, unit_entry, with_kl_tail
from adalog.recon.config import PRESETS as RECON_PRESETS
from adalog.recon.data import augmented_views
from adalog.recon.ste import TrainingQuantizer

CALIB = AdaLogConfig.w4a4(eq_n=32, search_rounds=1, fpcs_steps=2)
TINY = ReconstructConfig.reference(iterations=40, data_size=16, batch_size=8, weight_lr=1e-2)
VIT_KW = {"depth": 2, "img_size": 32, "patch_size": 8, "embed_dim": 32, "num_heads": 2}
SWIN_KW = {"img_size": 64, "window_size": 4, "depths": (1, 1), "num_heads": (1, 2), "embed_dim": 24}


def _images(n: int = 8, size: int = 32, seed: int = 1) -> torch.Tensor:
    """Smooth random images (upsampled 4x4 noise plus a little pixel noise), so that the
    reconstruction's crops look like the images themselves."""
    g = torch.Generator().manual_seed(seed)
    low = torch.randn(n, 3, 4, 4, generator=g)
    smooth = F.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)
    return smooth + 0.1 * torch.randn(n, 3, size, size, generator=g)


def _fp_model(name: str = "vit_tiny_patch16_224", kwargs: dict | None = None) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, **(kwargs or VIT_KW)).eval()


def _calibrated(name: str = "vit_tiny_patch16_224", kwargs: dict | None = None):
    model, size = _fp_model(name, kwargs), (kwargs or VIT_KW)["img_size"]
    images = _images(size=size)
    adalog.quantize(model, images, CALIB, progress=False, model_kwargs=kwargs or VIT_KW)
    return model, images


@pytest.fixture(scope="module")
def calibrated():
    """A calibrated tiny ViT, its calibration images and its FP original (never modified)."""
    fp = _fp_model()
    model, images = _calibrated()
    return model, images, fp


@pytest.fixture(scope="module")
def reconstructed(calibrated):
    model, images, _ = calibrated
    stats = {}
    out = adalog.reconstruct(copy.deepcopy(model), images, TINY, progress=False, stats=stats)
    return out, stats


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# --- AdaRound ---------------------------------------------------------------------------------


def _weight_quantizer(weight: torch.Tensor, bits: int = 4) -> UniformQuantizer:
    quant = UniformQuantizer(bits, (weight.shape[0], 1))
    scale = (weight.amax(1, keepdim=True) - weight.amin(1, keepdim=True)) / (2**bits - 1) * 0.8
    quant.set_params(scale, torch.full_like(scale, 2 ** (bits - 1)))
    return quant


def test_adaround_init_reproduces_fractional_parts_and_nearest_rounding():
    weight = torch.randn(16, 24, generator=torch.Generator().manual_seed(0))
    base = _weight_quantizer(weight)
    ada = AdaRoundQuantizer(base, weight)
    ratio = weight / base.scale
    h = rectified_sigmoid(ada.alpha)
    assert torch.allclose(h, ratio - ratio.floor(), atol=1e-5)  # h(α) = frac(w/s)
    lo = (0 - base.zero_point) * base.scale
    hi = (2**4 - 1 - base.zero_point) * base.scale
    soft = ada(weight)
    assert torch.allclose(soft, torch.maximum(torch.minimum(weight, hi), lo), atol=1e-5)
    ada.soft = False
    assert torch.equal(ada(weight), base(weight))  # hard rounding at init = nearest
    assert not torch.equal(soft, base(weight))


def test_round_regularizer_values():
    h = torch.tensor([0.0, 1.0, 0.5, 0.25])
    assert round_regularizer(h[:2], 20.0).item() == 0.0
    assert round_regularizer(h[2:3], 2.0).item() == 1.0
    assert round_regularizer(h[3:], 2.0).item() == pytest.approx(0.75)
    assert rectified_sigmoid(torch.tensor([-20.0, 20.0])).tolist() == [0.0, 1.0]


def test_regulariser_schedule_matches_reference():
    ref = ReconstructConfig.reference()
    assert round_beta(3999, ref) is None  # warm-up: iterations 1..3,999 (§12.7)
    assert round_beta(4000, ref) == pytest.approx(20.0)
    assert round_beta(12000, ref) == pytest.approx(11.0)
    assert round_beta(20000, ref) == pytest.approx(2.0)


# --- fused straight-through quantizers --------------------------------------------------------


def _uniform_per_head() -> UniformQuantizer:
    quant = UniformQuantizer(4, (1, 3, 1, 1))
    quant.set_params(
        torch.tensor([0.1, 0.2, 0.05]).view(1, 3, 1, 1), torch.tensor([7.0, 8, 9]).view(1, 3, 1, 1)
    )
    return quant


def _log(kind: str, shift: float, bits: int, scale: float, q: int | None = None) -> LogQuantizer:
    quant = LogQuantizer(bits, kind, shift=shift)
    quant.set_params(scale=scale, q=q)
    return quant


@pytest.mark.parametrize(
    ("quant", "x"),
    [
        (_uniform_per_head(), torch.randn(4, 3, 5, 6)),
        (
            _log("adalog", GELU_SHIFT, 4, 1.5, 25),
            torch.nn.functional.gelu(torch.randn(4, 50, 8) * 2),
        ),
        (_log("adalog", 0.0, 3, 0.7, 18), torch.softmax(torch.randn(2, 3, 10, 10) * 3, -1)),
        (_log("log2", GELU_SHIFT, 4, 1.2), torch.nn.functional.gelu(torch.randn(4, 50, 8) * 2)),
        (_log("logsqrt2", 0.0, 4, 0.9), torch.softmax(torch.randn(2, 3, 10, 10) * 3, -1)),
    ],
)
def test_fused_ste_equals_composed_training_mode(quant, x):
    grad_out = torch.randn_like(x)
    results = []
    for fused in (False, True):
        quant.scale.requires_grad_(True)
        xi = x.clone().requires_grad_(True)
        y = TrainingQuantizer(quant)(xi) if fused else quant.train()(xi)
        (y * grad_out).sum().backward()
        results.append((y.detach(), xi.grad, quant.scale.grad.clone()))
        quant.scale.grad = None
        quant.eval()
    quant.scale.requires_grad_(False)
    (y0, gx0, gs0), (y1, gx1, gs1) = results
    assert torch.equal(y0, y1)
    assert torch.allclose(gx0, gx1, atol=1e-5)
    assert torch.allclose(gs0, gs1, rtol=1e-4, atol=1e-4)
    assert gs0.abs().sum() > 0


def test_qdrop_keeps_a_fraction_of_elements_unquantized():
    quant = _uniform_per_head()
    x = torch.randn(8, 3, 20, 20)
    y = TrainingQuantizer(quant, 0.5, torch.Generator().manual_seed(0))(x)
    kept = (y == x).float().mean().item()
    quantized = (y == quant(x)).float().mean().item()
    assert 0.45 < kept < 0.55 and kept + quantized >= 1.0


# --- data -------------------------------------------------------------------------------------


def test_augmented_views_are_seeded_crops_of_the_given_images():
    images = _images(4, 32)
    views = augmented_views(images, 12, 0.25, True, seed=3)
    assert views.shape == (12, 3, 32, 32)
    assert torch.equal(views[:4], images)
    assert torch.equal(views, augmented_views(images, 12, 0.25, True, seed=3))
    assert not torch.equal(views, augmented_views(images, 12, 0.25, True, seed=4))
    assert not any(torch.equal(views[i], images[i % 4]) for i in range(4, 12))
    assert torch.equal(augmented_views(images, 3, 0.25, True, seed=3), images[:3])


def test_mixed_views_paste_a_box_of_another_image():
    """mix_prob=0 leaves the draws alone; with mix_prob=1 the first crop (drawn identically in
    both runs) differs from the unmixed one inside one rectangle of a quarter to three quarters
    of the image, and only there."""
    images = _images(4, 32)
    plain = augmented_views(images, 12, 0.25, True, seed=3)
    assert torch.equal(plain, augmented_views(images, 12, 0.25, True, seed=3, mix_prob=0.0))
    mixed = augmented_views(images, 12, 0.25, True, seed=3, mix_prob=1.0)
    assert torch.equal(mixed, augmented_views(images, 12, 0.25, True, seed=3, mix_prob=1.0))
    assert torch.equal(mixed[:4], images)
    changed = (mixed[4] != plain[4]).any(0)
    rows, cols = changed.any(1).nonzero()[:, 0], changed.any(0).nonzero()[:, 0]
    box = changed[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    assert 0.2 * 32 * 32 <= box.numel() <= 0.8 * 32 * 32
    assert int(changed.sum()) > 0.9 * box.numel()  # a filled rectangle, nothing outside it
    with pytest.raises(ConfigError, match="mix_prob"):
        ReconstructConfig.fast(mix_prob=1.5)


# --- pipeline ---------------------------------------------------------------------------------


def test_reconstruction_units():
    vit, _ = _calibrated()
    assert reconstruction_blocks(vit) == ["patch_embed", "blocks.0", "blocks.1", "head"]
    swin = _fp_model("swin_tiny_patch4_window7_224", SWIN_KW)
    adalog.quantize(swin, _images(2, 64), CALIB, progress=False)
    assert reconstruction_blocks(swin) == [
        "patch_embed",
        "layers.0.blocks.0",
        "layers.1.downsample",
        "layers.1.blocks.0",
        "head",
    ]
    with torch.no_grad():
        before = swin(_images(2, 64, seed=5))
    adalog.reconstruct(swin, _images(2, 64), TINY.with_overrides(iterations=3), progress=False)
    with torch.no_grad():
        after = swin(_images(2, 64, seed=5))
    assert torch.isfinite(after).all() and not torch.equal(before, after)


@pytest.mark.parametrize(("source", "kl_tail"), [("quantized", 0), ("fp", 0), ("quantized", 1)])
def test_carried_block_data_equals_a_capture_from_the_images(
    calibrated, monkeypatch, source, kl_tail
):
    """A block that reads the previous unit's output gets its data from that unit's (carried
    over, not recaptured); the result is bit for bit what capturing from the images gives,
    also for a last chunk smaller than the batch, and the carried tensors stay untouched."""
    import adalog.pipelines.reconstruct as recon

    model, images, _ = calibrated
    config = TINY.with_overrides(
        iterations=4,
        data_size=13,
        input_source=source,
        drop_prob=0.5,
        loss="token_norm",
        kl_tail=kl_tail,
    )
    block_data, checked = recon._block_data, []

    def carried_and_fresh(model, fp_model, name, data, config, gens, previous=None):
        kept = None if previous is None else copy.deepcopy(vars(previous[1]))
        carried = block_data(model, fp_model, name, data, config, gens, previous)
        if previous is not None and recon.follows(model, previous[0], unit_entry(name)):
            fresh = block_data(model, fp_model, name, data, config, gens, None)
            assert _same_fields(vars(fresh), vars(carried)), name
            assert _same_fields(kept, vars(previous[1])), name
            checked.append(name)
        return carried

    monkeypatch.setattr(recon, "_block_data", carried_and_fresh)
    adalog.reconstruct(copy.deepcopy(model), images, config, progress=False)
    assert checked == ["blocks.1..head" if kl_tail else "blocks.1"]


def _same_fields(a: dict, b: dict) -> bool:
    """Equal keys, and each pair of values both None or bit-identical tensors."""
    if a.keys() != b.keys():
        return False
    return all(a[k] is b[k] if a[k] is None else torch.equal(a[k], b[k]) for k in a)


def test_only_consecutive_sequential_members_follow_each_other():
    from adalog.pipelines.reconstruct import follows

    vit = _fp_model()
    assert follows(vit, "blocks.0", "blocks.1")
    assert not follows(vit, "blocks.1", "blocks.0")
    assert not follows(vit, "patch_embed", "blocks.0")
    assert not follows(vit, "blocks.1", "head")
    swin = _fp_model("swin_tiny_patch4_window7_224", SWIN_KW | {"depths": (2, 1)})
    assert follows(swin, "layers.0.blocks.0", "layers.0.blocks.1")
    assert not follows(swin, "layers.0.blocks.1", "layers.1.downsample")
    assert not follows(swin, "layers.0.blocks.1", "layers.1.blocks.0")


def test_weights_end_on_grid_and_model_is_restored(reconstructed, calibrated):
    model, stats = reconstructed
    assert list(stats) == ["patch_embed", "blocks.0", "blocks.1", "head"]
    for values in stats.values():  # noise-free probe losses around the training
        assert 0 < values["probe_before"] < 1 and 0 < values["probe_after"] < 1
        assert values["probe_after"] != values["probe_before"]
    n_layers = 0
    for module in model.modules():
        if isinstance(module, (QuantLinear, QuantConv2d)):
            quant = module.weight_quant
            assert isinstance(quant, UniformQuantizer)
            assert torch.equal(module.quantized_weight(), module.weight)  # stored on the grid
            codes = module.weight / quant.scale + quant.zero_point
            assert (codes - codes.round()).abs().max() < 1e-3
            assert codes.round().min() >= 0 and codes.round().max() <= 2**quant.n_bits - 1
            n_layers += 1
    assert n_layers == 1 + 2 * 4 + 1
    assert all(p.requires_grad for p in model.parameters())
    assert not any(isinstance(m, (AdaRoundQuantizer, TrainingQuantizer)) for m in model.modules())
    assert not any(b.requires_grad for b in model.buffers())
    assert model.adalog_meta["reconstruct"] == TINY.to_dict()
    calib = calibrated[0]
    for path in ("blocks.0.attn.qkv", "blocks.0.attn.proj", "head"):
        new, old = model.get_submodule(path), calib.get_submodule(path)
        assert not torch.equal(new.weight, old.quantized_weight())  # rounding was learned
        assert not torch.equal(new.input_quant.scale, old.input_quant.scale)  # scale trained
        assert torch.equal(new.input_quant.zero_point, old.input_quant.zero_point)  # frozen


def test_post_gelu_fold_is_exact_after_reconstruction(reconstructed):
    model = copy.deepcopy(reconstructed[0])
    fc2 = model.blocks[0].mlp.fc2
    assert isinstance(fc2.input_quant, LogQuantizer) and bool(fc2.input_quant.shift_folded)
    images = _images(4, seed=9)
    with torch.no_grad():
        folded = model(images)
        unfold_post_gelu_shift(model)
        unfolded = model(images)
    assert not bool(fc2.input_quant.shift_folded)
    assert ((folded - unfolded).norm() / folded.norm()).item() < 1e-5


def _block_errors(qmodel: torch.nn.Module, fp: torch.nn.Module, images: torch.Tensor) -> dict:
    """Per unit: MSE of the quantized unit against the FP unit, both fed the FP input; for
    the head, the KL divergence of the whole model's predictions from the FP ones."""
    errors, record = {}, {}
    for name in reconstruction_blocks(qmodel):
        handle = fp.get_submodule(name).register_forward_hook(
            lambda m, i, o: record.update(x=i[0], y=o)
        )
        with torch.no_grad():
            fp(images)
            handle.remove()
            errors[name] = (qmodel.get_submodule(name)(record["x"]) - record["y"]).square().mean()
    with torch.no_grad():
        log_q, p_fp = qmodel(images).log_softmax(-1), fp(images).softmax(-1)
    errors["head"] = F.kl_div(log_q, p_fp, reduction="batchmean")
    return errors


def test_reconstruction_lowers_block_output_error(calibrated):
    model, images, fp = calibrated
    config = TINY.with_overrides(iterations=300, data_size=32, weight_lr=1e-2, act_lr=1e-4)
    recon = adalog.reconstruct(copy.deepcopy(model), images, config, progress=False)
    views = augmented_views(images, 32, config.crop_scale_min, config.hflip, config.seed)
    before, after = _block_errors(model, fp, views), _block_errors(recon, fp, views)
    ratios = {name: (after[name] / before[name]).item() for name in before}
    assert ratios["patch_embed"] < 0.6 and ratios["head"] < 0.9, ratios  # training data
    assert ratios["blocks.0"] < 0.9 and ratios["blocks.1"] < 0.9, ratios
    held_out = _images(8, seed=7)
    before, after = _block_errors(model, fp, held_out), _block_errors(recon, fp, held_out)
    units = [name for name in before if name != "head"]
    assert all(after[name] < before[name] for name in units), (before, after)
    # the random model's head KL is about 2e-4 on these images, at the level of calibration
    # noise: held out, it must only not get materially worse
    assert after["head"] < 1.05 * before["head"], (before["head"], after["head"])


def test_save_load_round_trip_gives_identical_logits(reconstructed, tmp_path: Path):
    model = reconstructed[0]
    images = _images(4, seed=11)
    with torch.no_grad():
        before = model(images)
    adalog.save_quantized(model, tmp_path / "q")
    meta = json.loads((tmp_path / "q" / "adalog.json").read_text())
    assert ReconstructConfig.from_dict(meta["reconstruct"]) == TINY
    loaded = adalog.load_quantized(tmp_path / "q")
    with torch.no_grad():
        assert torch.equal(loaded(images), before)


def test_loaded_checkpoint_reconstructs_like_the_in_memory_model(
    calibrated, reconstructed, tmp_path: Path
):
    """A loaded (already folded) checkpoint is unfolded with its own weights first (§10.22)."""
    model, images, _ = calibrated
    adalog.save_quantized(model, tmp_path / "calib")
    loaded = adalog.reconstruct(adalog.load_quantized(tmp_path / "calib"), images, TINY, False)
    reference, state = _state(reconstructed[0]), _state(loaded)
    assert all(torch.equal(reference[k], state[k]) for k in reference)


def test_same_seed_is_deterministic_and_seed_matters(calibrated, reconstructed):
    model, images, _ = calibrated
    reference = _state(reconstructed[0])
    again = _state(adalog.reconstruct(copy.deepcopy(model), images, TINY, progress=False))
    assert all(torch.equal(reference[k], again[k]) for k in reference)
    other = adalog.reconstruct(
        copy.deepcopy(model), images, TINY.with_overrides(seed=6), progress=False
    )
    assert not all(torch.equal(reference[k], v) for k, v in _state(other).items())


@pytest.mark.parametrize(
    "overrides",
    [
        {"input_source": "quantized"},
        {"drop_prob": 0.5},
        {"loss": "fisher"},
        {"loss": "token_norm"},
        {"hflip": False},
        {"train_bias_norm": True},
        {"kl_tail": 1},
    ],
)
def test_option_switches_change_the_result(calibrated, reconstructed, overrides):
    model, images, _ = calibrated
    reference = _state(reconstructed[0])
    config = TINY.with_overrides(**overrides)
    variant = _state(adalog.reconstruct(copy.deepcopy(model), images, config, progress=False))
    assert not all(torch.equal(reference[k], variant[k]) for k in reference)


def test_frozen_parts_stay_frozen(calibrated):
    model, images, _ = calibrated
    config = TINY.with_overrides(train_act=False, iterations=10)
    no_act = adalog.reconstruct(copy.deepcopy(model), images, config, progress=False)
    calib, recon = _state(model), _state(no_act)
    for key in calib:
        if key.endswith(("input_quant.scale", "a_quant.scale", "b_quant.scale")):
            assert torch.equal(calib[key], recon[key]), key
        if key.endswith((".q", "zero_point", "shift", "norm1.weight", "norm2.bias")):
            assert torch.equal(calib[key], recon[key]), key
    config = TINY.with_overrides(train_weights=False, iterations=10)
    no_weights = adalog.reconstruct(copy.deepcopy(model), images, config, progress=False)
    assert torch.equal(no_weights.blocks[0].attn.qkv.weight, model.blocks[0].attn.qkv.weight)


def test_bias_norm_training_alone_lowers_every_unit_loss(calibrated):
    """With weights and scales frozen, training only the float biases and LayerNorm affines
    changes exactly those tensors and lowers the probe loss of the blocks and the head (the
    patch embedding has only its conv bias, which the crops barely constrain)."""
    model, images, _ = calibrated
    stats: dict = {}
    config = TINY.with_overrides(
        train_weights=False, train_act=False, train_bias_norm=True, bias_norm_lr=1e-3
    )
    out = adalog.reconstruct(copy.deepcopy(model), images, config, progress=False, stats=stats)
    ratios = {name: v["probe_after"] / v["probe_before"] for name, v in stats.items()}
    # measured 0.97 / 0.94 / 0.84 with torch 2.14 (0.995 for blocks.0 with torch 2.5); untrained
    # or a loss that rises gives >= 1
    assert ratios["blocks.0"] < 1.0 and ratios["blocks.1"] < 0.99 and ratios["head"] < 0.9, ratios
    calib, recon = _state(model), _state(out)
    changed = {k for k in calib if not torch.equal(calib[k], recon[k])}
    trained = ("bias", "norm1.weight", "norm2.weight")
    assert {"blocks.0.norm1.weight", "blocks.1.mlp.fc2.bias", "head.bias"} <= changed
    assert all(k.endswith(trained) for k in changed), changed - {
        k for k in changed if k.endswith(trained)
    }
    assert all(p.requires_grad for p in out.parameters())


def test_network_stage_lowers_logit_kl_and_trains_only_float_parts(calibrated):
    """``network_iterations`` alone (no block stage): activation scales, biases and LayerNorm
    affines move, weights, zero points and q do not, and the KL to the FP logits falls on the
    training views and on held-out images."""
    model, images, fp = calibrated
    stats: dict = {}
    config = TINY.with_overrides(
        iterations=0, network_iterations=40, act_lr=1e-3, bias_norm_lr=1e-3
    )
    out = adalog.reconstruct(copy.deepcopy(model), images, config, progress=False, stats=stats)
    assert list(stats) == ["network"]
    assert stats["network"]["probe_after"] < 0.8 * stats["network"]["probe_before"], stats
    calib, recon = _state(model), _state(out)
    changed = {k for k in calib if not torch.equal(calib[k], recon[k])}
    assert {"blocks.0.attn.qkv.input_quant.scale", "norm.weight", "head.bias"} <= changed
    trained = ("scale", "bias", "norm1.weight", "norm2.weight", "norm.weight")
    assert all(k.endswith(trained) for k in changed), changed
    held_out = _images(8, seed=7)
    with torch.no_grad():
        p_fp = fp(held_out).softmax(-1)
        kl = [
            F.kl_div(m(held_out).log_softmax(-1), p_fp, reduction="batchmean") for m in (model, out)
        ]
    assert kl[1] < kl[0], kl
    assert all(p.requires_grad for p in out.parameters())
    assert not any(isinstance(m, TrainingQuantizer) for m in out.modules())


def test_kl_tail_unit_maps_block_input_to_logits(calibrated):
    """``blocks.<k>..head`` runs the FP model's blocks from k on, its norm and its head: on
    the input captured at block k it gives the model's own logits bit for bit."""
    model, images, fp = calibrated
    captured = []
    hook = fp.blocks[1].register_forward_pre_hook(lambda m, args: captured.append(args[0]))
    with torch.no_grad():
        logits = fp(images)
        hook.remove()
        assert torch.equal(TailUnit(fp, 1)(captured[0]), logits)
    assert {n for n, _ in TailUnit(fp, 1).named_children()} == {"blocks", "norm", "fc_norm", "head"}
    names = reconstruction_blocks(model)
    assert with_kl_tail(model, names, 0) == names
    assert with_kl_tail(model, names, 1) == ["patch_embed", "blocks.0", "blocks.1..head"]
    assert with_kl_tail(model, names, 2) == ["patch_embed", "blocks.0..head"]
    with pytest.raises(ConfigError, match="exceeds the model's 2 blocks"):
        with_kl_tail(model, names, 3)
    swin = _fp_model("swin_tiny_patch4_window7_224", SWIN_KW)
    with pytest.raises(ConfigError, match="VisionTransformer"):
        with_kl_tail(swin, ["head"], 1)


def test_kl_tail_trains_the_last_blocks_and_head_on_the_logits(calibrated, reconstructed):
    """With ``kl_tail=1`` the last block and the head are one unit trained on the logits' KL
    (its training loss falls); its weights end on the grid, and its rounding differs from
    block-by-block training. (Its held-out probe KL on this tiny random model fell to 0.915x
    with earlier torch builds but rises with torch 2.14.1, 1.12e-4 -> 1.41e-4, on the earlier
    code too: open, see RESULTS "Lowest declared versions".)"""
    model, images, _ = calibrated
    stats: dict = {}
    config = TINY.with_overrides(kl_tail=1)
    out = adalog.reconstruct(copy.deepcopy(model), images, config, progress=False, stats=stats)
    assert list(stats) == ["patch_embed", "blocks.0", "blocks.1..head"]
    tail = stats["blocks.1..head"]
    assert tail["rec_last"] < 0.95 * tail["rec_first"], tail  # measured: 0.617
    assert stats["blocks.0"] == reconstructed[1]["blocks.0"] | {
        "seconds": stats["blocks.0"]["seconds"]
    }
    for path in ("blocks.1.mlp.fc1", "head"):
        layer, plain = out.get_submodule(path), reconstructed[0].get_submodule(path)
        assert torch.equal(layer.quantized_weight(), layer.weight)
        assert not torch.equal(layer.weight, plain.weight), path


def test_reconstruct_refuses_uncalibrated_models():
    with pytest.raises(ConfigError, match="calibrated"):
        adalog.reconstruct(_fp_model(), _images(), TINY, progress=False)


# --- config and CLI ---------------------------------------------------------------------------


def test_config_presets_round_trip_and_validation(tmp_path: Path):
    ref = ReconstructConfig.reference()
    assert (ref.iterations, ref.batch_size, ref.data_size) == (20000, 32, 1024)
    assert (ref.weight_lr, ref.act_lr, ref.round_reg) == (1e-3, 4e-5, 0.01)
    assert (ref.beta_start, ref.beta_end, ref.warmup, ref.rec_weight) == (20.0, 2.0, 0.2, 0.1)
    assert (ref.input_source, ref.drop_prob, ref.loss) == ("fp", 0.0, "mse")
    fast = ReconstructConfig.preset("fast")
    assert (fast.iterations, fast.data_size, fast.mix_prob) == (300, 1024, 0.5)
    assert (fast.input_source, fast.drop_prob) == ("quantized", 0.5)
    assert not fast.train_act and fast.train_weights and not fast.keep_if_worse
    for suffix in (".json", ".yaml"):
        fast.save(tmp_path / f"r{suffix}")
        assert ReconstructConfig.resolve(str(tmp_path / f"r{suffix}")) == fast
    assert ReconstructConfig.from_dict(fast.to_dict()) == fast
    with pytest.raises(ConfigError, match="input_source"):
        ReconstructConfig(input_source="int8")
    with pytest.raises(ConfigError, match="drop_prob"):
        ReconstructConfig(drop_prob=1.0)
    with pytest.raises(ConfigError, match="unknown reconstruction config keys"):
        ReconstructConfig.from_dict({"iters": 3})
    with pytest.raises(ConfigError, match="unknown reconstruction preset"):
        ReconstructConfig.preset("slow")


def test_cli_flag_defaults_to_fast():
    parser = adalog.cli.build_parser()
    base = ["quantize", "--model", "m", "--calib-data", "d", "--out", "o"]
    assert parser.parse_args(base).reconstruct is None
    assert parser.parse_args([*base, "--reconstruct"]).reconstruct == "fast"
    assert parser.parse_args([*base, "--reconstruct", "reference"]).reconstruct == "reference"


def test_light_preset_is_fast_cut_short():
    light = ReconstructConfig.preset("light")
    assert (light.iterations, light.data_size) == (60, 256)
    assert light.with_overrides(iterations=300, data_size=1024) == ReconstructConfig.fast()
    assert ReconstructConfig.light(iterations=7).iterations == 7


def test_plus_presets_reconstruct_classifiers_with_the_light_preset(tmp_path: Path):
    """``--preset *-plus`` without --reconstruct means the light reconstruction for a
    classifier; --reconstruct (a preset or 'none') wins; detectors, the reference presets and
    a --config file with the plus options stay calibrate-only."""
    assert PLUS_RECONSTRUCTION == "light" and PLUS_RECONSTRUCTION in RECON_PRESETS
    parser = adalog.cli.build_parser()
    base = ["quantize", "--model", "m", "--calib-data", "d", "--out", "o"]

    def recon(*flags: str, detector: bool = False):
        return adalog.cli._reconstruct_config(parser.parse_args([*base, *flags]), detector)

    assert recon("--preset", "w4a4-plus") == ReconstructConfig.light()
    assert recon("--preset", "w3a3-plus", "--seed", "9") == ReconstructConfig.light(seed=9)
    AdaLogConfig.preset("w4a4-plus").save(tmp_path / "plus.json")
    assert recon("--config", str(tmp_path / "plus.json")) is None
    assert recon("--preset", "w4a4-plus", "--reconstruct") == ReconstructConfig.fast()
    assert recon("--preset", "w4a4-plus", "--reconstruct", "none") is None
    assert recon("--preset", "w4a4-plus", detector=True) is None
    assert recon("--preset", "w4a4") is None and recon() is None
    assert recon("--reconstruct", "none") is None


def test_plus_preset_refuses_gptq_flag_unless_calibrate_only(tmp_path: Path, capsys):
    argv = ["quantize", "--model", "vit_tiny_patch16_224", "--calib-data", str(tmp_path)]
    argv += ["--preset", "w4a4-plus", "--weight-rounding", "gptq", "--out", str(tmp_path / "q")]
    assert adalog.cli.main(argv) == 1
    assert "add --reconstruct none" in capsys.readouterr().err


def test_cli_quantize_with_reconstruction(tmp_path: Path, tiny_folder: Path, monkeypatch):
    """The whole CLI path; the model factory is swapped for a one-block DeiT to keep it fast."""
    import adalog.models
    import adalog.pipelines.checkpoint as checkpoint

    def one_block_deit(name: str, weights=None, pretrained: bool = True, **kwargs):
        torch.manual_seed(0)
        return timm.create_model(name, pretrained=False, depth=1, embed_dim=32, num_heads=2)

    monkeypatch.setattr(adalog.models, "create_model", one_block_deit)
    monkeypatch.setattr(checkpoint, "create_model", one_block_deit)
    calib = tmp_path / "calib.json"
    CALIB.with_overrides(calib_size=2).save(calib)
    recon = tmp_path / "recon.json"
    TINY.with_overrides(iterations=2, data_size=4, batch_size=2).save(recon)
    qdir = tmp_path / "q"
    argv = ["quantize", "--model", "deit_tiny_patch16_224", "--calib-data", str(tiny_folder)]
    argv += ["--config", str(calib), "--seed", "3", "--reconstruct", str(recon)]
    assert adalog.cli.main([*argv, "--out", str(qdir)]) == 0
    meta = json.loads((qdir / "adalog.json").read_text())
    assert (
        meta["reconstruct"]
        == TINY.with_overrides(iterations=2, data_size=4, batch_size=2, seed=3).to_dict()
    )
    loaded = adalog.load_quantized(qdir)
    qkv = loaded.blocks[0].attn.qkv
    assert torch.equal(qkv.quantized_weight(), qkv.weight)


def test_cli_plus_preset_calibrates_with_nearest_rounding_then_reconstructs_light(
    tmp_path: Path, tiny_folder: Path, monkeypatch, capsys
):
    """The issue's contract command, ``--preset w4a4-plus`` and nothing else, calibrates with
    the plus options and nearest rounding, then reconstructs with ``light`` (the pipelines are
    replaced by recorders: what is checked is what the CLI hands them)."""
    import adalog.distributed
    import adalog.models
    import adalog.pipelines.calibrate as calibrate
    import adalog.pipelines.checkpoint as checkpoint
    import adalog.pipelines.reconstruct as reconstruct

    calls: dict = {}
    monkeypatch.setattr(
        adalog.models,
        "create_model",
        lambda name, weights=None, **kw: timm.create_model(
            name, pretrained=False, depth=1, embed_dim=32, num_heads=2
        ),
    )
    monkeypatch.setattr(calibrate, "calibrate", lambda m, x, c, **kw: calls.update(calib=c))
    monkeypatch.setattr(reconstruct, "reconstruct", lambda m, x, r, **kw: calls.update(recon=r))
    monkeypatch.setattr(checkpoint, "save_quantized", lambda m, out: None)
    monkeypatch.setattr(checkpoint, "load_quantized", lambda out: calls["model"])
    monkeypatch.setattr(
        calibrate, "calibration_batch", lambda m, *a: calls.update(model=m) or (None, {})
    )
    argv = ["quantize", "--model", "deit_tiny_patch16_224", "--calib-data", str(tiny_folder)]
    argv += ["--preset", "w4a4-plus", "--seed", "3"]
    assert adalog.cli.main([*argv, "--out", str(tmp_path / "q")]) == 0
    assert calls["calib"] == AdaLogConfig.preset("w4a4-plus", weight_rounding="nearest", seed=3)
    assert calls["recon"] == ReconstructConfig.light(seed=3)
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "reconstructs with the 'light' preset" in notes[0]
    calls.clear()
    assert adalog.cli.main([*argv, "--reconstruct", "none", "--out", str(tmp_path / "q2")]) == 0
    assert calls["calib"] == AdaLogConfig.preset("w4a4-plus", seed=3) and "recon" not in calls
    # several processes share the reconstruction; --reconstruct none leaves them nothing to do
    monkeypatch.setattr(adalog.distributed, "launched_world_size", lambda: 2)
    assert adalog.cli.main([*argv, "--reconstruct", "none", "--out", str(tmp_path / "q3")]) == 1
    assert "needs a reconstruction" in capsys.readouterr().err


def test_token_norm_weights_follow_the_layernorm():
    """A token scaled by c has its error weighted by 1/c²: the error the next LayerNorm sees."""
    torch.manual_seed(0)
    y = torch.randn(2, 5, 8)
    y[0, 1] *= 10.0
    w = token_norm_weights(y)
    assert w.shape == (2, 5, 1)
    torch.testing.assert_close(w.mean(), torch.tensor(1.0))
    expected = 1.0 / y.var(-1, keepdim=True)
    torch.testing.assert_close(w / w[1, 0], expected / expected[1, 0])


def test_units_worse_after_training_can_be_reverted(calibrated):
    """With keep_if_worse=False a unit whose probe loss rose is restored to its calibrated
    state (weights, scales and biases, bit for bit)."""
    model, images, _ = calibrated
    stats: dict = {}
    config = TINY.with_overrides(keep_if_worse=False)
    out = adalog.reconstruct(copy.deepcopy(model), images, config, progress=False, stats=stats)
    reverted = [n for n, v in stats.items() if not v["kept"]]
    assert reverted == [n for n, v in stats.items() if v["probe_after"] > v["probe_before"]]
    assert "patch_embed" in reverted  # 40 iterations leave its rounding worse than nearest
    calib = _state(model)
    for name in reverted:
        for key, value in _state(out.get_submodule(name)).items():
            assert torch.equal(value, calib[f"{name}.{key}"]), (name, key)


@pytest.mark.parametrize("loss", ["fisher", "mse"])
def test_interrupted_run_resumes_bit_for_bit(calibrated, tmp_path: Path, monkeypatch, loss):
    """Stopped after two units, then rerun on the same folder: the result equals an
    uninterrupted run's, random streams (batch order, QDrop, Fisher labels) included. With
    "mse" the resumed run captures blocks.1's data from the images, where the uninterrupted
    run carried it over from blocks.0."""
    import adalog.pipelines.reconstruct as recon

    model, images, _ = calibrated
    config = TINY.with_overrides(
        iterations=6, input_source="quantized", drop_prob=0.5, loss=loss, network_iterations=3
    )
    whole_stats: dict = {}
    whole = adalog.reconstruct(copy.deepcopy(model), images, config, False, whole_stats)
    train_block, calls = recon._train_block, []

    def stop_at_third_unit(*args, **kwargs):
        calls.append(args[1])
        if len(calls) == 3:
            raise KeyboardInterrupt
        return train_block(*args, **kwargs)

    monkeypatch.setattr(recon, "_train_block", stop_at_third_unit)
    with pytest.raises(KeyboardInterrupt):
        adalog.reconstruct(copy.deepcopy(model), images, config, False, resume_dir=tmp_path)
    monkeypatch.setattr(recon, "_train_block", train_block)
    assert read_progress_meta(tmp_path)["done_blocks"] == calls[:2]
    stats: dict = {}
    resumed = adalog.reconstruct(
        copy.deepcopy(model), images, config, False, stats, resume_dir=tmp_path
    )
    reference, state = _state(whole), _state(resumed)
    assert all(torch.equal(reference[k], state[k]) for k in reference)
    assert sorted(stats) == sorted(whole_stats) and "network" in stats
    assert stats[calls[0]]["probe_after"] == whole_stats[calls[0]]["probe_after"]


def test_resume_accepts_progress_saved_before_a_config_field_existed(
    calibrated, tmp_path: Path, monkeypatch
):
    """Progress written by a version whose ReconstructConfig lacked a field (here mix_prob)
    resumes when the field is at its default: the run is the same."""
    model, images, _ = calibrated
    config = TINY.with_overrides(iterations=2)
    adalog.reconstruct(copy.deepcopy(model), images, config, False, resume_dir=tmp_path)
    meta = read_progress_meta(tmp_path)
    del meta["reconstruct"]["mix_prob"]
    write_progress(tmp_path, read_state_dict(tmp_path / PROGRESS_WEIGHTS), meta)
    import adalog.pipelines.reconstruct as recon

    def must_not_train(*args, **kwargs):
        raise AssertionError("every unit was done: nothing should be trained again")

    monkeypatch.setattr(recon, "_train_block", must_not_train)
    stats: dict = {}
    adalog.reconstruct(copy.deepcopy(model), images, config, False, stats, resume_dir=tmp_path)
    assert sorted(stats) == sorted(meta["record"])


def test_resume_refuses_progress_of_another_run(calibrated, tmp_path: Path):
    model, images, _ = calibrated
    config = TINY.with_overrides(iterations=2)
    adalog.reconstruct(copy.deepcopy(model), images, config, False, resume_dir=tmp_path)
    for other_config, other_images in (
        (config.with_overrides(seed=9), images),
        (config.with_overrides(mix_prob=0.5), images),
        (config, images.flip(-1)),
    ):
        with pytest.raises(ConfigError, match="another run"):
            adalog.reconstruct(
                copy.deepcopy(model), other_images, other_config, False, resume_dir=tmp_path
            )


def test_cli_saves_the_calibrated_model_before_reconstructing(
    tmp_path: Path, tiny_folder: Path, monkeypatch, capsys
):
    """A reconstruction that fails leaves the calibrated model in OUT/calibrated, loadable."""
    import adalog.models
    import adalog.pipelines.checkpoint as checkpoint
    import adalog.pipelines.reconstruct as reconstruct_module

    def one_block_deit(name: str, weights=None, pretrained: bool = True, **kwargs):
        torch.manual_seed(0)
        return timm.create_model(name, pretrained=False, depth=1, embed_dim=32, num_heads=2)

    def failing(*args, **kwargs):
        raise RuntimeError("reconstruction died")

    monkeypatch.setattr(adalog.models, "create_model", one_block_deit)
    monkeypatch.setattr(checkpoint, "create_model", one_block_deit)
    monkeypatch.setattr(reconstruct_module, "reconstruct", failing)
    calib = tmp_path / "calib.json"
    CALIB.with_overrides(calib_size=2).save(calib)
    argv = ["quantize", "--model", "deit_tiny_patch16_224", "--calib-data", str(tiny_folder)]
    argv += ["--config", str(calib), "--reconstruct", "--out", str(tmp_path / "q")]
    with pytest.raises(RuntimeError, match="reconstruction died"):
        adalog.cli.main(argv)
    assert "saved the calibrated model" in capsys.readouterr().out
    calibrated = adalog.load_quantized(tmp_path / "q" / "calibrated")
    assert "reconstruct" not in calibrated.adalog_meta
    assert not (tmp_path / "q" / "adalog.json").exists()
