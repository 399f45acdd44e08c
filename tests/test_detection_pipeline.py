"""Detectors through the pipelines: COCO evaluation (checked with an oracle), bad input, and a
small random Swin Mask R-CNN through quantize -> save -> load -> detect-eval."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from adalog.cli import main
from adalog.config import AdaLogConfig
from adalog.data.coco import CocoInstances
from adalog.data.shapes import SHAPE_CLASSES, write_shapes_split
from adalog.errors import DataError
from adalog.models import create_model
from adalog.models.detection import DetectorSpec
from adalog.models.qmodules import QuantConv2d, QuantConvTranspose2d, QuantLinear
from adalog.pipelines.calibrate import quantize
from adalog.pipelines.checkpoint import load_quantized, save_quantized
from adalog.pipelines.detection_eval import evaluate_detector
from adalog.quant import LogQuantizer

#: a detector small enough to calibrate in seconds: narrow, 64-pixel images, few proposals
SMALL = {"embed_dim": 16, "depths": [2, 1, 1, 1], "num_heads": [1, 1, 2, 2], "fpn_channels": 16,
         "box_features": 32, "mask_convs": 1, "min_size": 64, "max_size": 64}  # fmt: skip


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shapes")
    write_shapes_split(root, "val", 4, seed=5, size=64, max_shapes=3)
    write_shapes_split(root, "calib", 2, seed=6, size=64, max_shapes=3)
    return root


class Oracle(nn.Module):
    """Answers with the ground truth of the set (optionally with labels rotated)."""

    def __init__(self, data: CocoInstances, rotate_labels: bool = False) -> None:
        super().__init__()
        self.adalog_detector_spec = DetectorSpec(classes=SHAPE_CLASSES)
        self.anchor = nn.Parameter(torch.zeros(1))
        self.data, self.rotate, self.calls = data, rotate_labels, 0

    def forward(self, images):
        target = self.data.target(self.calls)
        self.calls += 1
        labels = target["labels"] % 3 + 1 if self.rotate else target["labels"]
        count = len(labels)
        return [{"boxes": target["boxes"], "labels": labels, "scores": torch.ones(count),
                 "masks": target["masks"][:, None].float()}]  # fmt: skip


def test_coco_evaluation_of_the_ground_truth_is_perfect(shapes):
    data = CocoInstances(shapes / "val", shapes / "annotations_val.json", SHAPE_CLASSES)
    result = evaluate_detector(Oracle(data), shapes / "val", shapes / "annotations_val.json")
    assert result["n_images"] == 4
    for key in ("bbox_AP", "bbox_AP50", "bbox_AP75", "segm_AP", "segm_AP50", "segm_AP75"):
        assert result[key] == pytest.approx(1.0), key
    wrong = evaluate_detector(
        Oracle(data, rotate_labels=True), shapes / "val", shapes / "annotations_val.json"
    )
    assert wrong["bbox_AP"] == 0.0 and wrong["segm_AP50"] == 0.0


def test_bad_coco_input_is_refused_before_any_model_work(shapes, tmp_path):
    ann = shapes / "annotations_val.json"
    with pytest.raises(DataError, match="annotation file not found"):
        CocoInstances(shapes / "val", tmp_path / "none.json", SHAPE_CLASSES)
    with pytest.raises(DataError, match="4 image\\(s\\) of .* missing"):
        CocoInstances(tmp_path, ann, SHAPE_CLASSES)
    with pytest.raises(DataError, match="categories unknown to the model: 3 \\(triangle\\)"):
        CocoInstances(shapes / "val", ann, ("disc", "square"))
    document = json.loads(ann.read_text())
    document["annotations"][0]["category_id"] = 9
    (tmp_path / "odd.json").write_text(json.dumps(document))
    with pytest.raises(DataError, match="unknown to the model: 9"):
        CocoInstances(shapes / "val", tmp_path / "odd.json", SHAPE_CLASSES)


def _small_detector() -> nn.Module:
    torch.manual_seed(0)
    model = create_model("mask_rcnn_swin_shapes", pretrained=False, **SMALL)
    model.rpn._post_nms_top_n["testing"] = 30  # calibration cost only: the reload has 1000
    model.roi_heads.detections_per_img = 5
    return model


@pytest.fixture(scope="module")
def quantized(shapes, tmp_path_factory):
    model = _small_detector()
    config = AdaLogConfig.w4a4(eq_n=32, search_rounds=1, fpcs_steps=2)
    quantize(model, shapes / "calib", config, progress=False)
    qdir = tmp_path_factory.mktemp("qdet")
    save_quantized(model, qdir)
    return model, qdir


def test_every_detector_layer_is_quantized_the_protocol_way(quantized):
    model, _ = quantized
    body = model.backbone.body
    assert body.patch_embed.proj.input_quant.n_bits == 8  # the image
    assert model.backbone.fpn.layer_blocks[0][0].input_quant.n_bits == 4
    assert model.rpn.head.conv[0][0].input_quant.n_bits == 4
    assert isinstance(model.roi_heads.mask_predictor.conv5_mask, QuantConvTranspose2d)
    assert isinstance(body.layers[0].blocks[0].mlp.fc2.input_quant, LogQuantizer)
    assert isinstance(body.layers[0].blocks[0].attn.matmul2.a_quant, LogQuantizer)
    assert isinstance(model.roi_heads.box_predictor.cls_score, QuantLinear)
    leftover = [
        n for n, m in model.named_modules() if type(m) in (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)
    ]
    assert leftover == []
    for m in model.modules():  # every quantizer was calibrated (none left at scale 1)
        if isinstance(m, (QuantConv2d, QuantLinear)):
            assert not torch.all(m.weight_quant.scale == 1.0)


def test_quantized_detector_reloads_with_the_same_outputs(quantized):
    model, qdir = quantized
    reloaded = load_quantized(qdir)
    reloaded.rpn._post_nms_top_n["testing"] = 30
    reloaded.roi_heads.detections_per_img = 5
    reloaded.roi_heads.score_thresh = model.roi_heads.score_thresh = 0.0
    image = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        (a,), (b,) = model([image]), reloaded([image])
    assert len(a["boxes"]) > 0
    torch.testing.assert_close(a["boxes"], b["boxes"])
    torch.testing.assert_close(a["masks"], b["masks"])
    with torch.no_grad():
        model.eval().apply(lambda m: m.set_quant(False) if hasattr(m, "set_quant") else None)
        (fp,) = model([image])
        model.apply(lambda m: m.set_quant(True) if hasattr(m, "set_quant") else None)
    assert not torch.equal(fp["scores"], a["scores"])  # quantization changed something


def test_detect_eval_command_writes_the_contract_json(quantized, shapes, tmp_path, capsys):
    _, qdir = quantized
    out = tmp_path / "ap.json"
    ann = str(shapes / "annotations_val.json")
    argv = ["detect-eval", "--quantized", str(qdir), "--coco-root", str(shapes / "val"),
            "--ann", ann, "--limit", "2", "--json", str(out)]  # fmt: skip
    assert main(argv) == 0
    result = json.loads(out.read_text())
    assert result["n_images"] == 2 and result["bits"] == {"w": 4, "a": 4, "s": 4}
    for key in ("bbox_AP", "bbox_AP50", "bbox_AP75", "segm_AP", "segm_AP50", "segm_AP75"):
        assert 0.0 <= result[key] <= 1.0
    argv[argv.index("--ann") + 1] = str(tmp_path / "missing.json")
    assert main(argv) == 1
    assert "annotation file not found" in capsys.readouterr().err


def test_quantize_command_refuses_what_detectors_do_not_support(shapes, tmp_path, capsys):
    base = ["quantize", "--model", "mask_rcnn_swin_shapes", "--calib-data", str(shapes / "calib"),
            "--out", str(tmp_path / "q")]  # fmt: skip
    assert main([*base, "--reconstruct"]) == 1
    assert "detectors are calibrate-only" in capsys.readouterr().err
    assert (
        main([*base, "--weights", str(tmp_path / "none.pt"), "--model-kwargs", '{"fpn_width": 8}'])
        == 1
    )
    assert "unknown detector setting(s) fpn_width" in capsys.readouterr().err


def test_generated_shapes_are_seeded_and_their_annotations_match_the_masks(tmp_path):
    from pycocotools import mask as mask_utils

    first = write_shapes_split(tmp_path / "a", "val", 3, seed=9, size=48)
    second = write_shapes_split(tmp_path / "b", "val", 3, seed=9, size=48)
    assert first.read_text() == second.read_text()
    assert (tmp_path / "a/val/00002.png").read_bytes() == (
        tmp_path / "b/val/00002.png"
    ).read_bytes()
    document = json.loads(first.read_text())
    assert document["annotations"] and {c["name"] for c in document["categories"]} == set(
        SHAPE_CLASSES
    )
    for ann in document["annotations"]:
        rle = dict(ann["segmentation"], counts=ann["segmentation"]["counts"].encode())
        assert mask_utils.area(rle) == ann["area"] > 0
        assert mask_utils.toBbox(rle).tolist() == ann["bbox"]


def test_calibration_letterbox_pads_with_what_normalises_to_zero():
    from PIL import Image

    from adalog.data import letterbox_transform

    model = _small_detector()  # canvas 64 x 64
    image = Image.new("RGB", (100, 50), (255, 0, 0))
    canvas = letterbox_transform(model)(image)
    assert canvas.shape == (3, 64, 64)
    assert torch.all(canvas[0, :32] == 1.0) and torch.all(canvas[1, :32] == 0.0)
    mean = torch.tensor(model.pretrained_cfg["mean"])
    assert torch.equal(canvas[:, 32:], mean[:, None, None].expand(3, 32, 64))


def test_classifier_commands_refuse_a_detector_checkpoint(quantized, tmp_path, capsys):
    _, qdir = quantized
    assert main(["export", str(qdir), "--out", str(tmp_path / "art")]) == 1
    assert "integer export covers classifiers only" in capsys.readouterr().err
    assert main(["eval", "--quantized", str(qdir), "--data", str(tmp_path)]) == 1
    assert "score it with adalog detect-eval" in capsys.readouterr().err
