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
from adalog.models import read_state_dict
from adalog.models.qmodules import QuantLinear, QuantModule, set_quant_mode
from adalog.models.rotation import random_orthogonal, rotate_value_heads
from adalog.pipelines.checkpoint import load_quantized
from adalog.pipelines.runstore import PROGRESS_WEIGHTS, read_progress_meta, write_progress
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
    """Two workers with one intra-op thread each give the result of one worker whose searches
    run on one thread (captures on the caller's two) bit for bit, search every module once, and
    restore the caller's thread count. (A wholly one-thread run may differ: the FP captures'
    float reductions depend on the thread count in recent torch builds.)"""
    before = torch.get_num_threads()
    real, seen = calibrate_module._calibrate_target, []

    def one_thread(model, target, *args):
        with calibrate_module._intra_op_threads(1):
            return real(model, target, *args)

    def recording(model, target, *args):
        seen.append((target.name, torch.get_num_threads()))
        return real(model, target, *args)

    try:
        torch.set_num_threads(2)
        monkeypatch.setattr(calibrate_module, "_calibrate_target", one_thread)
        sequential = _model(name, kwargs)
        adalog.quantize(sequential, _images(), SMALL, progress=False, search_workers=1)
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
    assert read_progress_meta(tmp_path)["done_blocks"] == blocks[:2]
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
    with pytest.raises(ConfigError, match=r"config \(another config\): eq_n 32 -> 16"):
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
    with pytest.raises(ConfigError, match=r"weights_sha256 \(other starting weights\)"):
        adalog.quantize(
            _model(name, kwargs, seed=7), _images(), SMALL, progress=False, resume_dir=tmp_path
        )


def test_progress_from_before_new_config_keys_resumes(tmp_path: Path, monkeypatch):
    """Progress written before a config key existed matches a run with that key's default."""
    first = adalog.quantize(_model("vit_tiny_patch16_224", VIT_KW), _images(), SMALL,
                            progress=False, resume_dir=tmp_path)  # fmt: skip
    meta = read_progress_meta(tmp_path)
    for key in ("weight_rounding", "gptq_damp", "gptq_views"):
        del meta["config"][key]
    write_progress(tmp_path, read_state_dict(tmp_path / PROGRESS_WEIGHTS), meta)

    def no_search(*args):
        raise AssertionError("a saved block was searched again")

    monkeypatch.setattr(calibrate_module, "_calibrate_target", no_search)
    resumed = adalog.quantize(_model("vit_tiny_patch16_224", VIT_KW), _images(), SMALL,
                              progress=False, resume_dir=tmp_path)  # fmt: skip
    for key, value in resumed.state_dict().items():
        assert torch.equal(value, first.state_dict()[key]), key


@pytest.mark.parametrize("crash_at", [2, 3, 4])
def test_crash_while_saving_progress_resumes_to_the_uninterrupted_result(
    tmp_path: Path, monkeypatch, crash_at: int
):
    """The process dies at the ``crash_at``-th file rename of the progress saves (a rename is
    the only step that makes a write visible). Whatever it left, the resumed run equals an
    uninterrupted one: progress is never a state of one block with the bookkeeping of another
    (which would fold a LayerNorm twice)."""
    import adalog.io

    whole = adalog.quantize(_model("vit_tiny_patch16_224", VIT_KW), _images(), SMALL,
                            progress=False)  # fmt: skip
    real_replace, renames = adalog.io.os.replace, []

    def dying_replace(src, dst):
        renames.append(dst)
        if len(renames) == crash_at:
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(adalog.io.os, "replace", dying_replace)
    with pytest.raises(KeyboardInterrupt):
        adalog.quantize(_model("vit_tiny_patch16_224", VIT_KW), _images(), SMALL,
                        progress=False, resume_dir=tmp_path)  # fmt: skip
    monkeypatch.setattr(adalog.io.os, "replace", real_replace)
    resumed = adalog.quantize(_model("vit_tiny_patch16_224", VIT_KW), _images(), SMALL,
                              progress=False, resume_dir=tmp_path)  # fmt: skip
    for key, value in resumed.state_dict().items():
        assert torch.equal(value, whole.state_dict()[key]), key


def test_checkpoint_records_tag_kwargs_weights_and_calibration_images(
    tmp_path: Path, tiny_folder: Path
):
    """A non-default pretrained tag (ImageNet mean/std where the default tag has 0.5) and a
    non-default classifier size survive save/load, and evaluation transforms like calibration."""
    from adalog.data import eval_transform
    from adalog.models import create_model
    from adalog.pipelines.runstore import state_digest

    kwargs = {"depth": 1, "embed_dim": 32, "num_heads": 2, "num_classes": 10}
    torch.manual_seed(0)
    model = create_model("vit_small_patch16_224.dino", pretrained=False, **kwargs)
    digest = state_digest(model)
    config = SMALL.with_overrides(calib_size=2)
    adalog.quantize(model, tiny_folder, config, progress=False)
    adalog.save_quantized(model, tmp_path / "q")
    meta = json.loads((tmp_path / "q" / "adalog.json").read_text())
    assert meta["model"] == "vit_small_patch16_224.dino"
    assert meta["model_kwargs"] == kwargs and meta["weights_sha256"] == digest
    assert meta["data_config"]["mean"] == [0.485, 0.456, 0.406]
    calibration = meta["calibration"]
    assert calibration["n"] == 2 and len(calibration["images"]) == 2
    assert calibration["transform"] == "training augmentation (seed 5)"
    loaded = adalog.load_quantized(tmp_path / "q")
    assert loaded.head.out_features == 10
    normalize = eval_transform(loaded).transforms[-1]
    assert tuple(normalize.mean.tolist()) == pytest.approx((0.485, 0.456, 0.406))
    default_tag = create_model("vit_small_patch16_224", pretrained=False, **kwargs)
    assert tuple(eval_transform(default_tag).transforms[-1].mean.tolist()) == (0.5, 0.5, 0.5)


def test_default_calibration_selection_is_seeded_and_spread_over_classes(tmp_path: Path):
    """Without a list, calib_size images are drawn under the seed, one per class folder before
    a second of any (the first files in sorted order would all be one class)."""
    from adalog.pipelines.calibrate import calibration_batch
    from tests.conftest import write_image

    root = tmp_path / "val"
    wnids = [f"n0{i:07d}" for i in range(6)]
    for c, wnid in enumerate(wnids):
        for i in range(5):
            write_image(root / wnid / f"{i}.png", seed=10 * c + i, size=72)
    model = _model("vit_tiny_patch16_224", VIT_KW)
    config = SMALL.with_overrides(calib_size=4)
    images, record = calibration_batch(model, root, None, config)
    classes = [path.split("/")[0] for path in record["images"]]
    assert images.shape[0] == 4 and len(set(classes)) == 4
    assert calibration_batch(model, root, None, config)[1]["images"] == record["images"]
    other = calibration_batch(model, root, None, config.with_overrides(seed=6))[1]["images"]
    assert other != record["images"]
    everything = calibration_batch(model, root, None, config.with_overrides(calib_size=8))[1]
    assert len({p.split("/")[0] for p in everything["images"]}) == 6


def test_quantize_takes_a_folder_like_the_cli(tmp_path: Path, tiny_folder: Path):
    """``adalog.quantize(model, folder, config)`` selects and transforms the images as the CLI
    does (same checkpoint tensors), and a ready tensor is recorded as such."""
    from adalog.pipelines.calibrate import load_calibration_images

    config = SMALL.with_overrides(calib_size=3, seed=4)
    from_folder = adalog.quantize(_model("vit_tiny_patch16_224", VIT_KW), tiny_folder, config,
                                  progress=False)  # fmt: skip
    images = load_calibration_images(_model("vit_tiny_patch16_224", VIT_KW), tiny_folder, None,
                                     config)  # fmt: skip
    assert images.shape[0] == 3
    from_tensor = adalog.quantize(_model("vit_tiny_patch16_224", VIT_KW), images, config,
                                  progress=False)  # fmt: skip
    for key, value in from_folder.state_dict().items():
        assert torch.equal(value, from_tensor.state_dict()[key]), key
    assert from_folder.adalog_meta["calibration"]["selection"].startswith("random")
    assert from_tensor.adalog_meta["calibration"]["source"] == "tensor"
    assert "transform" not in from_tensor.adalog_meta["calibration"]


def test_calibration_from_a_flat_folder_and_an_absolute_file_list(tmp_path: Path):
    """Unlabelled images straight in a folder (no class sub-folders, any names), and a file
    list of absolute paths: both calibrate; labels are never asked for."""
    from adalog.pipelines.calibrate import calibration_batch
    from tests.conftest import write_image

    flat = tmp_path / "holiday photos"
    paths = [
        write_image(flat / f"IMG {i}.{ext}", seed=i) for i, ext in enumerate("png jpg".split() * 3)
    ]
    model = _model("vit_tiny_patch16_224", VIT_KW)
    config = SMALL.with_overrides(calib_size=4, seed=3)
    images, record = calibration_batch(model, flat, None, config)
    assert images.shape == (4, 3, 64, 64) and len(set(record["images"])) == 4
    assert set(record["images"]) <= {p.name for p in paths}
    listing = tmp_path / "elsewhere" / "calib.txt"
    listing.parent.mkdir()
    listing.write_text("\n".join(str(p.resolve()) for p in paths[:2]) + "\n")
    images, record = calibration_batch(model, flat, listing, config)
    assert images.shape[0] == 2 and record["images"] == [p.name for p in paths[:2]]
    quantized = adalog.quantize(model, flat, config.with_overrides(calib_size=2), progress=False)
    assert quantized.adalog_meta["calibration"]["source"] == str(flat)


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
    back in float64, bit for bit; loaded as float32 it is the same model to float32 rounding
    (a few 4-bit codes may flip: 1e-4 relative with torch 2.14, 1.1e-2 with torch 2.5)."""
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
    assert _relative(as_float32.double(), before) < 3e-2  # a wrong reload is off by O(1)


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
    with pytest.raises(ConfigError, match=r"made for model 'vit_tiny_patch16_224\.augreg"):
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


def test_cli_checks_config_and_out_before_any_work(tmp_path: Path, monkeypatch, capsys):
    """--preset with --config, an --out that is a file or a folder of other files, and bad
    --model-kwargs are refused before a model is even built."""
    import adalog.models

    def no_work(*args, **kwargs):
        raise AssertionError("work started before the arguments were checked")

    monkeypatch.setattr(adalog.models, "create_model", no_work)
    config = tmp_path / "c.json"
    SMALL.save(config)
    base = ["quantize", "--model", "vit_tiny_patch16_224", "--calib-data", str(tmp_path)]
    assert adalog.cli.main([*base, "--preset", "w4a4", "--config", str(config), "--out",
                            str(tmp_path / "q")]) == 1  # fmt: skip
    assert "--preset or --config, not both" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    assert adalog.cli.main([*base, "--out", str(tmp_path / "file")]) == 1
    assert "is a file" in capsys.readouterr().err
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("x")
    assert adalog.cli.main([*base, "--out", str(tmp_path / "busy")]) == 1
    assert "holds other files (notes.txt)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        adalog.cli.main([*base, "--out", str(tmp_path / "q"), "--model-kwargs", "[1]"])
    assert "JSON object" in capsys.readouterr().err


def test_cli_bit_width_flags_override_the_preset_or_config(tmp_path: Path):
    parser = adalog.cli.build_parser()
    base = ["quantize", "--model", "m", "--calib-data", "d", "--out", "o"]
    args = parser.parse_args([*base, "--preset", "w4a4-plus", "--w-bits", "6", "--a-bits", "5"])
    config = adalog.cli._base_config(args)
    assert (config.w_bits, config.a_bits, config.s_bits) == (6, 5, 4)
    assert config.rotate_values and config.weight_rounding == "gptq"
    SMALL.save(tmp_path / "c.yaml")
    args = parser.parse_args([*base, "--config", str(tmp_path / "c.yaml"), "--s-bits", "3"])
    assert adalog.cli._base_config(args) == SMALL.with_overrides(s_bits=3)
    ablate = ["ablate", "--model", "m", "--calib-data", "d", "--data", "d", "--out", "o"]
    args = parser.parse_args([*ablate, "--w-bits", "3", "--model-kwargs", '{"num_classes": 10}'])
    assert adalog.cli._base_config(args).w_bits == 3 and args.model_kwargs == {"num_classes": 10}
