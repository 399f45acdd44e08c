"""benchmarks/fidelity.py: the reference <-> adalog mapping and the tensor-by-tensor record."""

import sys
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

import adalog
from adalog.config import AdaLogConfig
from adalog.models import read_state_dict

from .conftest import ROOT, SHARED

sys.path.insert(0, str(ROOT / "benchmarks"))
import fidelity  # noqa: E402

TINY = {"depth": 1, "embed_dim": 24, "num_heads": 2, "img_size": 32, "num_classes": 10}
QUICK = AdaLogConfig.w4a4(eq_n=32, search_rounds=1, fpcs_steps=2)
REFERENCE = SHARED / "reference" / "official_vit_tiny_w4a4.pth"
PERTURBED = "blocks.0.attn.proj.w_quantizer.scale"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors: one thread is faster, and much faster beside busy cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory) -> dict[str, Path]:
    """A calibrated 1-block ViT checkpoint, its FP weights and calibration images."""
    tmp = tmp_path_factory.mktemp("fidelity")
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **TINY).eval()
    save_file({k: v.clone() for k, v in model.state_dict().items()}, str(tmp / "fp.safetensors"))
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    save_file({"x": images}, str(tmp / "calib.safetensors"))
    adalog.quantize(model, images, QUICK, progress=False, model_kwargs=TINY)
    adalog.save_quantized(model, tmp / "q")
    return {
        "dir": tmp,
        "q": tmp / "q",
        "fp": tmp / "fp.safetensors",
        "calib": tmp / "calib.safetensors",
    }


def test_mapping_round_trip(tiny_pair):
    state = read_state_dict(tiny_pair["q"] / "model.safetensors")
    reference = fidelity.to_reference_names(state)
    assert reference["blocks.0.attn.qkv.w_quantizer.scale"].shape == (3, 24, 1)
    assert reference["blocks.0.attn.proj.w_quantizer.scale"].shape == (1, 24, 1)
    assert reference["patch_embed.proj.w_quantizer.scale"].shape == (24, 1)
    assert reference["patch_embed.proj.a_quantizer.scale"].shape == (1, 1, 1, 1)
    assert reference["blocks.0.attn.matmul2.A_quantizer.scale"].shape == (1, 1, 1, 1)
    assert reference["blocks.0.mlp.fc2.a_quantizer.table1"].dtype == torch.float32
    assert bool(reference["blocks.0.mlp.fc2.a_quantizer.bias_reparamed"])
    back, names = fidelity.from_reference(reference)
    assert back.keys() == state.keys()
    for key, tensor in state.items():
        assert back[key].dtype == tensor.dtype and torch.equal(back[key], tensor), key
    assert names["blocks.0.mlp.fc2.input_quant.t1"] == "blocks.0.mlp.fc2.a_quantizer.table1"


def test_record_reports_exactly_the_perturbed_tensor(tiny_pair, capsys):
    state = read_state_dict(tiny_pair["q"] / "model.safetensors")
    reference = fidelity.to_reference_names(state)
    reference[PERTURBED] = reference[PERTURBED].clone()
    reference[PERTURBED][0, 3, 0] *= 1.001
    torch.save(reference, tiny_pair["dir"] / "reference.pth")
    out = tiny_pair["dir"] / "record.json"
    args = [str(tiny_pair["q"]), str(tiny_pair["dir"] / "reference.pth"), "--out", str(out)]
    args += ["--calib-tensor", str(tiny_pair["calib"]), "--fp-weights", str(tiny_pair["fp"])]
    result = fidelity.main(args)
    assert out.is_file()
    differing = {k: r for k, r in result["tensors"].items() if r["class"] != "equal"}
    assert list(differing) == ["blocks.0.attn.proj.weight_quant.scale"]
    record = differing["blocks.0.attn.proj.weight_quant.scale"]
    assert record["class"] == "differs" and record["reference"] == PERTURBED
    assert record["groups_differing"] == 1 and record["elements_beyond_rounding"] == 1
    assert record["max_relative"] == pytest.approx(1e-3, rel=1e-3)
    assert "objective gap" in record["explanation"]  # re-scored on the calibration images
    assert "replayed" in record["explanation"] and "replay failed" not in record["explanation"]
    assert result["summary"] == {"equal": len(result["tensors"]) - 1, "differs": 1}
    assert result["derived_checks"]["reference_tables_match_adalog_construction"]
    for fold in result["folds"].values():  # rerunning adalog's channel search reproduces its fold
        assert fold["channels_differing"] == []
        assert fold["adalog_reconstruction"]["z_star_is_rounded_mean"]
    assert "blocks.0.attn.proj.weight_quant.scale" in capsys.readouterr().out


@pytest.mark.skipif(not REFERENCE.is_file(), reason="../shared reference state not present")
def test_mapping_covers_the_reference_state_dict():
    raw = fidelity.load_reference(REFERENCE)
    state, names = fidelity.from_reference(raw)
    assert state["blocks.0.attn.qkv.weight_quant.scale"].shape == (576, 1)
    assert state["patch_embed.proj.weight_quant.scale"].shape == (192, 1, 1, 1)
    assert state["blocks.0.mlp.fc2.input_quant.t1"].dtype == torch.int64
    back = fidelity.to_reference_names(state)
    assert back.keys() == raw.keys()
    for key, tensor in raw.items():
        assert back[key].shape == tensor.shape and torch.equal(back[key], tensor), key
