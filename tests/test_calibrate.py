"""End-to-end calibration on small random timm models: folds, determinism, checkpoints, CLI."""

import copy
import json
from pathlib import Path

import pytest
import timm
import torch

import adalog
import adalog.cli
import adalog.pipelines.calibrate as calibrate_module
from adalog.config import AdaLogConfig
from adalog.errors import ConfigError
from adalog.models.qmodules import QuantLinear, QuantModule, set_quant_mode
from adalog.models.rotation import random_orthogonal, rotate_value_heads
from adalog.pipelines.checkpoint import load_quantized
from adalog.quant import LogQuantizer, TwinUniformQuantizer

SMALL = AdaLogConfig.w4a4(eq_n=32, search_rounds=1, fpcs_steps=2)
VIT_KW = {"depth": 2, "img_size": 64, "patch_size": 16}
SWIN_KW = {"img_size": 64, "window_size": 4, "depths": (1, 1), "num_heads": (1, 2), "embed_dim": 24}
FAMILIES = [("vit_tiny_patch16_224", VIT_KW), ("swin_tiny_patch4_window7_224", SWIN_KW)]


def _model(name: str, kwargs: dict, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model(name, pretrained=False, **kwargs).eval()


def _images(n: int = 4, size: int = 64, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize(("name", "kwargs"), FAMILIES)
def test_layernorm_fold_keeps_fp_network(name, kwargs):
    model, images = _model(name, kwargs), _images()
    with torch.no_grad():
        reference = model(images)
        adalog.quantize(model, images, SMALL.with_overrides(bias_reparam=False), progress=False)
        set_quant_mode(model, False)
        folded = model(images)
    assert _relative(folded, reference) < 1e-5
    norm1 = model.get_submodule("blocks.0.norm1" if "vit" in name else "layers.0.blocks.0.norm1")
    assert not torch.allclose(norm1.weight, torch.ones_like(norm1.weight))  # the fold happened
    qkv = model.get_submodule(
        "blocks.0.attn.qkv" if "vit" in name else "layers.0.blocks.0.attn.qkv"
    )
    assert qkv.input_quant.scale.shape == (1,)  # per tensor after the fold


def test_post_gelu_fold_keeps_quantized_network():
    model, images = _model("vit_tiny_patch16_224", VIT_KW), _images()
    adalog.quantize(model, images, SMALL, progress=False)
    fc2 = model.blocks[0].mlp.fc2
    assert isinstance(fc2.input_quant, LogQuantizer) and bool(fc2.input_quant.shift_folded)
    with torch.no_grad():
        folded = model(images)
        for module in model.modules():
            if isinstance(module, QuantLinear) and isinstance(module.input_quant, LogQuantizer):
                shift = float(module.input_quant.shift)
                module.bias.add_(shift * module.quantized_weight().sum(1))
                module.input_quant.set_shift_folded(False)
        unfolded = model(images)
    assert _relative(folded, unfolded) < 1e-5


def test_quantized_model_tracks_fp_and_searches_parameters():
    model, images = _model("vit_tiny_patch16_224", VIT_KW), _images()
    with torch.no_grad():
        reference = model(images)
        adalog.quantize(model, images, AdaLogConfig.w6a6(eq_n=64, search_rounds=1), progress=False)
        quantized = model(images)
    assert _relative(quantized, reference) < 0.5
    attn = model.blocks[0].attn
    assert float(attn.matmul2.a_quant.scale) == 1.0  # post-softmax scale is never searched
    assert 10 <= int(attn.matmul2.a_quant.q) <= 73  # q candidates 10..10+eq_n-1
    assert attn.matmul1.a_quant.scale.shape == (1, 3, 1, 1)  # per head
    w_scale = attn.qkv.weight_quant.scale
    assert w_scale.shape == (attn.qkv.out_features, 1) and w_scale.unique().numel() > 1


def test_same_seed_gives_bit_identical_parameters():
    states = []
    for _ in range(2):
        model = _model("vit_tiny_patch16_224", VIT_KW)
        adalog.quantize(model, _images(), SMALL, progress=False)
        states.append(model.state_dict())
    assert states[0].keys() == states[1].keys()
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]), key


@pytest.mark.parametrize(("name", "kwargs"), FAMILIES)
def test_parallel_module_searches_equal_one_thread_sequential(name, kwargs, monkeypatch):
    """Two workers with one intra-op thread each give the one-thread sequential result bit for
    bit, search every module once, and restore the caller's thread count."""
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        sequential = _model(name, kwargs)
        adalog.quantize(sequential, _images(), SMALL, progress=False, search_workers=1)
        torch.set_num_threads(2)
        real, seen = calibrate_module._calibrate_target, []

        def recording(model, target, *args):
            seen.append((target.name, torch.get_num_threads()))
            return real(model, target, *args)

        monkeypatch.setattr(calibrate_module, "_calibrate_target", recording)
        parallel = _model(name, kwargs)
        adalog.quantize(parallel, _images(), SMALL, progress=False, search_workers=2)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    names = [n for n, _ in seen]
    assert len(names) == len(set(names)) and {t for _, t in seen} == {1}
    assert len(names) == sum(isinstance(m, QuantModule) for m in parallel.modules())
    expected = sequential.state_dict()
    assert parallel.state_dict().keys() == expected.keys()
    for key, value in parallel.state_dict().items():
        assert torch.equal(value, expected[key]), key


@pytest.mark.parametrize(("name", "kwargs"), FAMILIES)
def test_interrupted_calibration_resumes_to_the_same_parameters(
    tmp_path: Path, monkeypatch, name, kwargs
):
    """A run stopped inside a block and rerun with the same resume folder ends bit-identical
    to an uninterrupted run (Swin: the reduction's fold-created bias is restored too)."""
    whole = _model(name, kwargs)
    adalog.quantize(whole, _images(), SMALL, progress=False)
    real, calls = calibrate_module._calibrate_target, []

    def failing(model, target, *args):
        if target.block == calls_limit[0]:
            raise KeyboardInterrupt
        calls.append(target.block)
        return real(model, target, *args)

    blocks = _block_names(name, kwargs)
    calls_limit = [blocks[2]]  # stop inside the third block
    monkeypatch.setattr(calibrate_module, "_calibrate_target", failing)
    with pytest.raises(KeyboardInterrupt):
        adalog.quantize(_model(name, kwargs), _images(), SMALL, progress=False, resume_dir=tmp_path)
    saved = json.loads((tmp_path / "progress.json").read_text())["done_blocks"]
    assert saved == blocks[:2]
    calls.clear()
    calls_limit[0] = None
    resumed = adalog.quantize(
        _model(name, kwargs), _images(), SMALL, progress=False, resume_dir=tmp_path
    )
    assert blocks[0] not in calls and blocks[1] not in calls and blocks[2] in calls
    expected = whole.state_dict()
    assert resumed.state_dict().keys() == expected.keys()
    for key, value in resumed.state_dict().items():
        assert torch.equal(value, expected[key]), key
    with pytest.raises(ConfigError, match="differs in: config"):
        adalog.quantize(
            _model(name, kwargs),
            _images(),
            SMALL.with_overrides(eq_n=16),
            progress=False,
            resume_dir=tmp_path,
        )
    with pytest.raises(ConfigError, match="images_sha256"):
        adalog.quantize(
            _model(name, kwargs), _images(seed=2), SMALL, progress=False, resume_dir=tmp_path
        )


def test_progress_from_before_new_config_keys_resumes(tmp_path: Path, monkeypatch):
    """Progress written before a config key existed matches a run with that key's default."""
    first = adalog.quantize(_model("vit_tiny_patch16_224", VIT_KW), _images(), SMALL,
                            progress=False, resume_dir=tmp_path)  # fmt: skip
    meta_path = tmp_path / "progress.json"
    meta = json.loads(meta_path.read_text())
    for key in ("weight_rounding", "gptq_damp", "gptq_views"):
        del meta["config"][key]
    meta_path.write_text(json.dumps(meta))

    def no_search(*args):
        raise AssertionError("a saved block was searched again")

    monkeypatch.setattr(calibrate_module, "_calibrate_target", no_search)
    resumed = adalog.quantize(_model("vit_tiny_patch16_224", VIT_KW), _images(), SMALL,
                              progress=False, resume_dir=tmp_path)  # fmt: skip
    for key, value in resumed.state_dict().items():
        assert torch.equal(value, first.state_dict()[key]), key


def _block_names(name: str, kwargs: dict) -> list[str]:
    from adalog.models.wrap import wrap_model

    targets = wrap_model(_model(name, kwargs), SMALL)
    return list(dict.fromkeys(t.block for t in targets))


@pytest.mark.parametrize(
    ("name", "kwargs", "size"),
    [
        ("deit_tiny_patch16_224", {"img_size": 64}, 64),
        ("swin_tiny_patch4_window7_224", {}, 224),
    ],
)
def test_random_deit_and_swin_quantize_save_load(tmp_path: Path, name, kwargs, size):
    model, images = _model(name, kwargs), _images(1, size)
    adalog.quantize(model, images, SMALL, progress=False, model_kwargs=kwargs)
    with torch.no_grad():
        before = model(images)
    adalog.save_quantized(model, tmp_path / "q")
    loaded = adalog.load_quantized(tmp_path / "q")
    with torch.no_grad():
        assert torch.equal(loaded(images), before)
    if name.startswith("swin"):
        assert loaded.layers[1].downsample.reduction.bias is not None  # bias created by the fold


def test_float64_calibration_saves_and_loads_in_float64(tmp_path: Path):
    """A float64 model calibrates in float64 (quantizers and AdaLog tables included) and loads
    back in float64, bit for bit; loaded as float32 its logits agree to float32 rounding."""
    model, images = _model("vit_tiny_patch16_224", VIT_KW).double(), _images().double()
    adalog.quantize(model, images, SMALL, progress=False, model_kwargs=VIT_KW)
    floats = [t for t in model.state_dict().values() if t.is_floating_point()]
    assert {t.dtype for t in floats} == {torch.float64}
    with torch.no_grad():
        before = model(images)
    adalog.save_quantized(model, tmp_path / "q")
    loaded = adalog.load_quantized(tmp_path / "q")  # in the dtype it was saved in
    loaded_state = loaded.state_dict()
    for key, value in model.state_dict().items():
        assert torch.equal(loaded_state[key], value), key
    with torch.no_grad():
        assert torch.equal(loaded(images), before)
        as_float32 = adalog.load_quantized(tmp_path / "q", dtype=torch.float32)(images.float())
    assert _relative(as_float32.double(), before) < 1e-3


def test_checkpoint_with_an_unknown_dtype_is_refused(tmp_path: Path):
    model = _model("vit_tiny_patch16_224", VIT_KW)
    adalog.quantize(model, _images(), SMALL, progress=False, model_kwargs=VIT_KW)
    adalog.save_quantized(model, tmp_path / "q")
    meta_path = tmp_path / "q" / "adalog.json"
    assert json.loads(meta_path.read_text())["dtype"] == "float32"
    meta_path.write_text(json.dumps(json.loads(meta_path.read_text()) | {"dtype": "int8"}))
    with pytest.raises(ConfigError, match="unknown float dtype 'int8'"):
        adalog.load_quantized(tmp_path / "q")


def test_checkpoint_for_other_model_or_config_is_refused(tmp_path: Path):
    model = _model("vit_tiny_patch16_224", VIT_KW)
    adalog.quantize(model, _images(), SMALL, progress=False, model_kwargs=VIT_KW)
    adalog.save_quantized(model, tmp_path / "q")
    with pytest.raises(ConfigError, match="made for model 'vit_tiny_patch16_224'"):
        adalog.load_quantized(tmp_path / "q", expected_model="deit_small_patch16_224")
    meta_path = tmp_path / "q" / "adalog.json"
    meta = json.loads(meta_path.read_text())
    meta["config"]["post_gelu"] = "uniform"  # fc2 would have a uniform input: keys differ
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match="does not match"):
        adalog.load_quantized(tmp_path / "q")
    meta["format_version"] = 99
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match="format 99"):
        adalog.load_quantized(tmp_path / "q")


def test_cli_quantize_then_eval_quantized(tmp_path: Path, random_deit_and_images):
    weights, data = random_deit_and_images
    config = tmp_path / "small.yaml"
    SMALL.with_overrides(calib_size=2).save(config)
    qdir = tmp_path / "q"
    assert (
        adalog.cli.main(
            [
                "quantize",
                "--model",
                "deit_tiny_patch16_224",
                "--weights",
                str(weights),
                "--calib-data",
                str(data),
                "--config",
                str(config),
                "--out",
                str(qdir),
                "--seed",
                "3",
                "--post-gelu",
                "twin",
                "--post-softmax",
                "log2",
                "--s-bits",
                "3",
                "--no-fpcs",
            ]
        )
        == 0
    )
    saved = json.loads((qdir / "adalog.json").read_text())["config"]
    assert saved["seed"] == 3 and saved["fpcs"] is False
    assert (saved["post_gelu"], saved["post_softmax"], saved["s_bits"]) == ("twin", "log2", 3)
    loaded = load_quantized(qdir)
    assert isinstance(loaded.blocks[0].mlp.fc2.input_quant, TwinUniformQuantizer)
    softmax_quant = loaded.blocks[0].attn.matmul2.a_quant
    assert softmax_quant.kind == "log2" and softmax_quant.n_bits == 3
    out = tmp_path / "eval.json"
    assert (
        adalog.cli.main(
            [
                "eval",
                "--quantized",
                str(qdir),
                "--data",
                str(data),
                "--json",
                str(out),
                "--workers",
                "0",
            ]
        )
        == 0
    )
    result = json.loads(out.read_text())
    assert result["n"] == 2 and result["bits"] == {"w": 4, "a": 4, "s": 3}


def test_config_round_trip_and_validation(tmp_path: Path):
    config = AdaLogConfig.w3a3(post_gelu="twin", eq_n=64)
    for suffix in (".json", ".yaml"):
        config.save(tmp_path / f"c{suffix}")
        assert AdaLogConfig.load(tmp_path / f"c{suffix}") == config
    assert (AdaLogConfig.w6a6().w_bits, AdaLogConfig.w6a6().s_bits) == (6, 6)
    with pytest.raises(ConfigError, match="2..8"):
        AdaLogConfig(w_bits=9)
    with pytest.raises(ConfigError, match="post_gelu"):
        AdaLogConfig(post_gelu="cubic")
    with pytest.raises(ConfigError, match="unknown preset"):
        AdaLogConfig.preset("w5a5")
    with pytest.raises(ConfigError, match="fc2_token_norm"):
        AdaLogConfig(post_gelu="twin", fc2_token_norm=True)


def test_8bit_patch_embed_needs_the_conv_zero_point_cap():
    """At w_bits=8 the reference's uncapped conv grid has 128 zero points, one scale each at
    eq_n=128 (§10.10): refused with a hint; conv_zp_cap=True calibrates it on 16 zero points."""
    config = AdaLogConfig.preset(
        "w4a4", w_bits=8, a_bits=8, s_bits=8, search_rounds=1, fpcs_steps=2
    ).with_overrides(eq_n=128)
    kwargs = VIT_KW | {"depth": 1, "embed_dim": 32, "num_heads": 2}
    with pytest.raises(ValueError, match="conv_zp_cap=True"):
        adalog.quantize(_model("vit_tiny_patch16_224", kwargs), _images(), config, progress=False)
    model = adalog.quantize(
        _model("vit_tiny_patch16_224", kwargs),
        _images(),
        config.with_overrides(conv_zp_cap=True),
        progress=False,
    )
    zero_points = model.patch_embed.proj.weight_quant.zero_point
    assert zero_points.min() >= 128 - 8 and zero_points.max() <= 128 + 7


def test_cli_switches_map_to_config_overrides():
    base = ["quantize", "--model", "m", "--calib-data", "d", "--out", "o"]
    args = adalog.cli.build_parser().parse_args(
        [*base, "--fc2-token-norm", "--no-fpcs", "--rotate-values"]
    )
    assert adalog.cli.variant_overrides(args) == {
        "fc2_token_norm": True,
        "fpcs": False,
        "rotate_values": True,
    }
    assert args.search_workers == 1
    assert adalog.cli.variant_overrides(adalog.cli.build_parser().parse_args(base)) == {}


@pytest.mark.parametrize(("name", "kwargs"), FAMILIES)
def test_value_rotation_is_exact_in_float_and_orthogonal(name, kwargs):
    model, images = _model(name, kwargs), _images()
    with torch.no_grad():
        before = model(images)
        rotated = copy.deepcopy(model)
        assert rotate_value_heads(rotated) == len(
            kwargs.get("depths", [0] * kwargs.get("depth", 0))
        )
        after = rotated(images)
    assert _relative(after, before) < 1e-5
    changed = [
        k for k, v in rotated.state_dict().items() if not torch.equal(v, model.state_dict()[k])
    ]
    assert changed and all(k.endswith(("qkv.weight", "qkv.bias", "proj.weight")) for k in changed)
    q = random_orthogonal(16, seed=3)
    assert torch.allclose(q @ q.T, torch.eye(16, dtype=q.dtype), atol=1e-12)
    assert torch.equal(q, random_orthogonal(16, seed=3))


def test_rotate_values_option_calibrates_a_rotated_model(tmp_path: Path):
    """The option rotates before wrapping: same as calibrating a rotated FP model; the saved
    checkpoint holds the rotated weights, so loading does not rotate again."""
    config = SMALL.with_overrides(rotate_values=True)
    model = adalog.quantize(
        _model("vit_tiny_patch16_224", VIT_KW),
        _images(),
        config,
        progress=False,
        model_kwargs=VIT_KW,
    )
    rotated = _model("vit_tiny_patch16_224", VIT_KW)
    rotate_value_heads(rotated)
    manual = adalog.quantize(rotated, _images(), SMALL, progress=False)
    assert all(torch.equal(v, manual.state_dict()[k]) for k, v in model.state_dict().items())
    plain = adalog.quantize(
        _model("vit_tiny_patch16_224", VIT_KW), _images(), SMALL, progress=False
    )
    assert not torch.equal(plain.blocks[0].attn.proj.weight, model.blocks[0].attn.proj.weight)
    adalog.save_quantized(model, tmp_path / "q")
    loaded = load_quantized(tmp_path / "q")
    with torch.no_grad():
        assert torch.equal(loaded(_images()), model(_images()))


@pytest.mark.parametrize("bits", [3, 4, 6])
def test_plus_presets_add_the_measured_options_to_the_reference(bits: int):
    """``wNaN-plus`` = the reference ``wNaN`` with value rotation and GPTQ rounding, nothing
    else changed; overrides still win."""
    reference = AdaLogConfig.preset(f"w{bits}a{bits}")
    plus = AdaLogConfig.preset(f"w{bits}a{bits}-plus")
    assert (reference.rotate_values, reference.weight_rounding) == (False, "nearest")
    assert (plus.rotate_values, plus.weight_rounding, plus.fc2_token_norm) == (True, "gptq", False)
    assert plus.with_overrides(rotate_values=False, weight_rounding="nearest") == reference
    assert AdaLogConfig.preset(f"w{bits}a{bits}-plus", seed=9).seed == 9
    with pytest.raises(ConfigError, match="unknown preset"):
        AdaLogConfig.preset(f"w{bits}a{bits}-best")
