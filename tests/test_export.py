"""Integer export: packing round trips, artifact round trip and validation errors."""

import json
from pathlib import Path

import pytest
import timm
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import adalog
import adalog.cli
from adalog.config import AdaLogConfig
from adalog.errors import ArtifactError
from adalog.pipelines.export import (
    META_FILE,
    TENSORS_FILE,
    export_artifact,
    fake_quant_model,
    read_artifact,
)
from adalog.quant.log import adalog_lut_numerators
from adalog.quant.packing import pack_codes, packed_size, unpack_codes

TINY = {"depth": 1, "img_size": 64, "patch_size": 16, "embed_dim": 32, "num_heads": 2}


@pytest.mark.parametrize("n_bits", [2, 3, 4, 6, 8])
def test_pack_unpack_round_trip_and_size(n_bits):
    codes = torch.randint(0, 2**n_bits, (1001,), generator=torch.Generator().manual_seed(n_bits))
    packed = pack_codes(codes, n_bits)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-1001 * n_bits // 8)
    assert torch.equal(unpack_codes(packed, n_bits, 1001), codes)


def test_packing_layout_by_hand():
    # 3-bit codes 5, 3, 7 → stream bits (lsb first) 1,0,1 1,1,0 1,1,1 → bytes 0b11011101, 0b1
    assert pack_codes(torch.tensor([5, 3, 7]), 3).tolist() == [0b11011101, 0b00000001]
    assert pack_codes(torch.tensor([1, 2, 3, 0]), 2).tolist() == [0b00111001]


@given(st.integers(1, 8), st.lists(st.integers(0, 255), max_size=50))
@settings(max_examples=50, deadline=None)
def test_pack_round_trip_property(n_bits, values):
    codes = torch.tensor([v % 2**n_bits for v in values], dtype=torch.int64)
    packed = pack_codes(codes, n_bits)
    assert packed.numel() == packed_size(len(values), n_bits)
    assert torch.equal(unpack_codes(packed, n_bits, len(values)), codes)


def test_packing_refuses_bad_input():
    with pytest.raises(ValueError, match=r"\[0, 7\]"):
        pack_codes(torch.tensor([8]), 3)
    with pytest.raises(ValueError, match="1..8-bit"):
        pack_codes(torch.tensor([0]), 9)
    with pytest.raises(ValueError, match="cannot hold"):
        unpack_codes(torch.zeros(3, dtype=torch.uint8), 4, 4)


@pytest.fixture(scope="module")
def qdir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **TINY).eval()
    images = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    config = AdaLogConfig.w4a4(eq_n=32, search_rounds=1, fpcs_steps=2, w_bits=3)
    adalog.quantize(model, images, config, progress=False, model_kwargs=TINY)
    out = tmp_path_factory.mktemp("q")
    adalog.save_quantized(model, out)
    return out


def test_artifact_round_trip_gives_identical_logits(qdir: Path, tmp_path: Path):
    meta = export_artifact(qdir, tmp_path / "art")
    artifact = read_artifact(tmp_path / "art")
    assert meta["layers"].keys() == artifact.meta["layers"].keys()
    qkv = artifact.meta["layers"]["blocks.0.attn.qkv"]
    assert qkv["w_bits"] == 3 and qkv["codes_bytes"] == -(-96 * 32 * 3 // 8)
    assert qkv["input"]["type"] == "uniform"
    fc2_in = artifact.meta["layers"]["blocks.0.mlp.fc2"]["input"]
    assert fc2_in["type"] == "adalog" and fc2_in["shift_folded"] is True
    numerators = artifact.tensors["blocks.0.mlp.fc2.input_quant.lut_numerators"]
    assert torch.equal(numerators, adalog_lut_numerators(fc2_in["q"], 4).to(torch.int32))
    assert not any(k.endswith(".qkv.weight") for k in artifact.tensors)  # no FP32 weights
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        expected = adalog.load_quantized(qdir)(images)
        got = fake_quant_model(artifact)(images)
    assert torch.equal(got, expected)


def test_cli_export_reports_size(qdir: Path, tmp_path: Path, capsys):
    assert adalog.cli.main(["export", str(qdir), "--out", str(tmp_path / "a")]) == 0
    meta = json.loads((tmp_path / "a" / META_FILE).read_text())
    assert meta["size_bytes"]["artifact"] == (tmp_path / "a" / TENSORS_FILE).stat().st_size
    assert "MiB on disk" in capsys.readouterr().out


def test_bad_artifacts_are_refused(qdir: Path, tmp_path: Path):
    art = tmp_path / "art"
    export_artifact(qdir, art)
    meta = json.loads((art / META_FILE).read_text())
    (art / META_FILE).write_text(json.dumps(meta | {"format_version": 99}))
    with pytest.raises(ArtifactError, match="version 99 is not supported"):
        read_artifact(art)
    (art / META_FILE).write_text("{not json")
    with pytest.raises(ArtifactError, match="not a readable artifact"):
        read_artifact(art)
    (art / META_FILE).write_text(json.dumps(meta))
    data = (art / TENSORS_FILE).read_bytes()
    (art / TENSORS_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtifactError, match="corrupt or unreadable"):
        read_artifact(art)
    meta["layers"]["blocks.0.mlp.fc1"]["w_bits"] = 4
    (art / TENSORS_FILE).write_bytes(data)
    (art / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match="fc1.weight.codes has"):
        read_artifact(art)
    assert adalog.cli.main(["eval", "--quantized", str(tmp_path / "missing"), "--data", "x"]) != 0
