import json
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from adalog.cli import main
from tests.conftest import SAMPLE, VIT_WEIGHTS, require_shared

NAME = "vit_tiny_patch16_224"
TINY = {"depth": 1, "img_size": 32, "patch_size": 16, "embed_dim": 24, "num_heads": 2}


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


def test_unreadable_image_in_a_worker_is_one_error_line(tmp_path: Path, tiny_folder, capsys):
    """An image a DataLoader worker cannot read ends the run with one ``adalog: error:`` line
    naming the file, not the worker's traceback."""
    torch.manual_seed(0)
    weights = tmp_path / "w.safetensors"
    save_file(timm.create_model(NAME, pretrained=False, **TINY).state_dict(), str(weights))
    bad = tiny_folder / "n01440764" / "n01440764_9.png"
    bad.write_bytes(b"\x89PNG broken")
    args = ["eval", "--model", NAME, "--weights", str(weights), "--data", str(tiny_folder)]
    args += ["--model-kwargs", json.dumps(TINY), "--workers", "1", "--batch-size", "2"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and "worker" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("adalog:")]
    assert len(lines) == 1 and lines[0].startswith("adalog: error: cannot read image "), err
    assert lines[0].endswith("n01440764_9.png'")


def test_a_worker_error_keeps_its_whole_message():
    from adalog.cli import _one_line
    from adalog.errors import DataError

    text = (
        "Caught DataError in DataLoader worker process 0.\nOriginal Traceback (most recent "
        'call last):\n  File "x.py", line 1, in f\nadalog.errors.DataError: cannot read image '
        "a.png: broken\nsecond line"
    )
    assert _one_line(DataError(text)) == "cannot read image a.png: broken\nsecond line"
    assert _one_line(DataError("plain message")) == "plain message"


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
