import json
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from adalog.cli import main
from tests.conftest import SAMPLE, VIT_WEIGHTS, require_shared


def test_eval_json_contract(tmp_path: Path, tiny_folder: Path):
    torch.manual_seed(0)
    weights = tmp_path / "w.safetensors"
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False)
    save_file(model.state_dict(), str(weights))
    out = tmp_path / "out" / "result.json"
    code = main(
        [
            "eval",
            "--model",
            "vit_tiny_patch16_224",
            "--weights",
            str(weights),
            "--data",
            str(tiny_folder),
            "--json",
            str(out),
            "--workers",
            "0",
            "--batch-size",
            "4",
        ]
    )
    assert code == 0
    result = json.loads(out.read_text())
    assert result["n"] == 6 and result["model"] == "vit_tiny_patch16_224"
    assert 0.0 <= result["top1"] <= result["top5"] <= 1.0
    assert not list(out.parent.glob(".*tmp"))


def test_eval_reports_user_errors_without_traceback(tmp_path: Path, capsys):
    code = main(
        [
            "eval",
            "--model",
            "vit_tiny_patch16_224",
            "--weights",
            str(tmp_path / "no.pth"),
            "--data",
            str(tmp_path),
        ]
    )
    assert code == 1
    assert "weight file not found" in capsys.readouterr().err


@pytest.mark.slow
def test_fp32_vit_tiny_on_shared_dev_is_0_826(tmp_path: Path):
    require_shared()
    out = tmp_path / "fp.json"
    assert (
        main(
            [
                "eval",
                "--model",
                "vit_tiny_patch16_224",
                "--weights",
                str(VIT_WEIGHTS),
                "--data",
                str(SAMPLE / "dev"),
                "--json",
                str(out),
            ]
        )
        == 0
    )
    result = json.loads(out.read_text())
    assert result["n"] == 500
    assert result["top1"] == pytest.approx(413 / 500)
