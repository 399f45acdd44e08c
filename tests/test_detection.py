"""The Swin Mask R-CNN build: backbone numerics against timm and an independent pad-then-shift
reference, the checkpoints' anchors and RoIAlign, and the mmdet key map."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from timm.models.swin_transformer import SwinTransformer
from torchvision.models.detection.image_list import ImageList
from torchvision.ops import roi_align

from adalog.errors import WeightsError
from adalog.models.detection import (
    DetectorSpec,
    build_detector,
    convert_mmdet_state_dict,
    detector_spec,
)
from adalog.models.detection.backbone import SwinFPN
from adalog.models.detection.mask_rcnn import AlignedRoIAlign, FixedStrideAnchors
from adalog.models.factory import load_weights

KEYS = Path(__file__).resolve().parents[2] / "shared" / "detection" / "swin_detection_keys.json"
SMALL = dict(embed_dim=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8))
TINY_SPEC = DetectorSpec(
    **SMALL, classes=("disc", "square", "triangle"), fpn_channels=32, box_features=64,
    mask_convs=2, min_size=96, max_size=128,
)  # fmt: skip


def _small_backbone(seed: int = 0) -> SwinFPN:
    torch.manual_seed(seed)
    backbone = SwinFPN(**SMALL, out_channels=32).eval()
    with torch.no_grad():  # non-trivial LayerNorm affine parameters
        for name, p in backbone.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.2)
    return backbone


def _timm_twin(backbone: SwinFPN, img_size: tuple[int, int]) -> SwinTransformer:
    timm_swin = SwinTransformer(
        img_size=img_size, patch_size=4, num_classes=0, window_size=7, strict_img_size=False,
        **SMALL,
    ).eval()  # fmt: skip
    missing, unexpected = timm_swin.load_state_dict(backbone.body.state_dict(), strict=False)
    assert set(missing) == {"norm.weight", "norm.bias"} and not unexpected
    return timm_swin


def test_backbone_equals_timm_swin_where_no_padding_is_needed():
    backbone = _small_backbone()
    timm_swin = _timm_twin(backbone, (448, 448))  # no stage at or below a window
    images = torch.randn(2, 3, 224, 448)
    with torch.no_grad():
        ours = backbone.stage_outputs(images)
        theirs = timm_swin.forward_intermediates(images, norm=False, intermediates_only=True)
        theirs = [norm(t.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
                  for t, norm in zip(theirs, backbone.out_norms, strict=True)]  # fmt: skip
    assert [o.shape[-2:] for o in ours] == [(56, 112), (28, 56), (14, 28), (7, 14)]
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def _reference_window_attention(block, x: torch.Tensor) -> torch.Tensor:
    """The releases' order, written out: pad to whole 7x7 windows, roll, attend within each
    window with the region mask from explicit region labels, roll back, crop."""
    batch, height, width, channels = x.shape
    x = F.pad(x, (0, 0, 0, (-width) % 7, 0, (-height) % 7))
    hp, wp = x.shape[1:3]
    shift = block.shift_size[0]
    labels = torch.zeros(hp, wp)
    if shift:
        x = torch.roll(x, (-shift, -shift), (1, 2))
        for r in range(hp):
            for c in range(wp):
                row_region = 0 if r < hp - 7 else (1 if r < hp - shift else 2)
                col_region = 0 if c < wp - 7 else (1 if c < wp - shift else 2)
                labels[r, c] = 3 * row_region + col_region
    out = torch.empty_like(x)
    for r0 in range(0, hp, 7):
        for c0 in range(0, wp, 7):
            tokens = x[:, r0 : r0 + 7, c0 : c0 + 7].reshape(batch, 49, channels)
            region = labels[r0 : r0 + 7, c0 : c0 + 7].reshape(49)
            mask = torch.where(region[:, None] == region[None, :], 0.0, -100.0)
            attended = block.attn(tokens, mask=mask[None])
            out[:, r0 : r0 + 7, c0 : c0 + 7] = attended.view(batch, 7, 7, channels)
    if shift:
        out = torch.roll(out, (shift, shift), (1, 2))
    return out[:, :height, :width]


@pytest.mark.parametrize("size", [(9, 11), (8, 8), (14, 7)])
def test_blocks_pad_before_the_shift(size):
    backbone = _small_backbone(seed=1)
    shifted = backbone.body.layers[0].blocks[1]
    assert shifted.shift_size == (3, 3) and backbone.body.layers[0].blocks[0].shift_size == (0, 0)
    x = torch.randn(2, *size, 32)
    with torch.no_grad():
        for block in backbone.body.layers[0].blocks:
            torch.testing.assert_close(
                block._attn(x), _reference_window_attention(block, x), rtol=0, atol=1e-5
            )


def test_shift_stays_on_maps_smaller_than_a_window():
    backbone = _small_backbone()
    last = backbone.body.layers[3].blocks[1]
    assert last.window_size == (7, 7) and last.shift_size == (3, 3)
    timm_swin = _timm_twin(backbone, (256, 256))
    images = torch.randn(1, 3, 256, 256)
    with torch.no_grad():  # 256 px: every stage needs padding, where timm's order differs
        ours = backbone.stage_outputs(images)[0]
        theirs = timm_swin.forward_intermediates(images, norm=False, intermediates_only=True)[0]
    assert (
        backbone.out_norms[0](theirs.permute(0, 2, 3, 1)).permute(0, 3, 1, 2) - ours
    ).abs().max() > 1e-2


def test_anchors_keep_fixed_strides_and_unrounded_sizes():
    anchors = FixedStrideAnchors()
    base = anchors.generate_anchors([32], [0.5, 1.0, 2.0])
    torch.testing.assert_close(base[0], torch.tensor([-22.6274, -11.3137, 22.6274, 11.3137]))
    # an 800-pixel side: P5 is 25 cells, P6 13; P6 anchors sit every 64 px (torchvision: 61)
    features = [torch.zeros(1, 1, n, n) for n in (200, 100, 50, 25, 13)]
    images = ImageList(torch.zeros(1, 3, 800, 800), [(800, 800)])
    (all_anchors,) = anchors(images, features)
    p6 = all_anchors[-13 * 13 * 3 :]
    centres = (p6[:, 0] + p6[:, 2]) / 2
    assert sorted(set(centres.tolist()))[:3] == [0.0, 64.0, 128.0]


def test_roi_align_is_aligned_adaptive_and_picks_the_level_by_box_size():
    torch.manual_seed(0)
    levels = {str(i): torch.randn(1, 4, 64 // 2**i, 64 // 2**i) for i in range(4)}
    boxes = [torch.tensor([[3.0, 5.0, 60.0, 50.0], [0.0, 0.0, 250.0, 240.0]])]
    pooled = AlignedRoIAlign(7)(levels, boxes)
    rois = torch.cat([torch.zeros(2, 1), boxes[0]], dim=1)
    small = roi_align(levels["0"], rois[:1], 7, 1 / 4, 0, aligned=True)  # side ~53 -> P2
    large = roi_align(levels["2"], rois[1:], 7, 1 / 16, 0, aligned=True)  # side ~245 -> P4
    torch.testing.assert_close(pooled, torch.cat([small, large]))


def _synthetic_release(model) -> dict[str, torch.Tensor]:
    """A state dict with the public Mask R-CNN Swin-T checkpoint's keys and shapes."""
    keys = json.loads(KEYS.read_text())["mask_rcnn_swin_tiny"]
    generator = torch.Generator().manual_seed(0)
    state = {}
    for key, shape in keys.items():
        if key.endswith("relative_position_index"):
            path = key.replace("backbone.", "backbone.body.", 1).rsplit(".", 1)[0]
            state[key] = model.get_submodule(path).relative_position_index.clone()
        else:
            state[key] = torch.randn(shape, generator=generator)
    return state


@pytest.fixture(scope="module")
def swin_tiny_detector():
    return build_detector(detector_spec("mask_rcnn_swin_tiny"))


def test_release_keys_map_one_to_one_with_classes_reordered(swin_tiny_detector):
    model = swin_tiny_detector
    state = _synthetic_release(model)
    converted = convert_mmdet_state_dict(state, model)
    load_weights(model, converted)  # strict: every model key filled, shapes equal
    loaded = model.state_dict()
    cls = loaded["roi_heads.box_predictor.cls_score.weight"]
    assert torch.equal(cls[0], state["roi_head.bbox_head.fc_cls.weight"][80])
    assert torch.equal(cls[1:], state["roi_head.bbox_head.fc_cls.weight"][:80])
    reg = loaded["roi_heads.box_predictor.bbox_pred.weight"]
    assert reg.shape[0] == 324 and torch.equal(reg[4:], state["roi_head.bbox_head.fc_reg.weight"])
    logits = loaded["roi_heads.mask_predictor.mask_fcn_logits.bias"]
    assert torch.equal(logits[1:], state["roi_head.mask_head.conv_logits.bias"])
    merge = "backbone.body.layers.1.downsample.reduction.weight"
    assert torch.equal(loaded[merge], state["backbone.layers.0.downsample.reduction.weight"])
    assert torch.equal(loaded["backbone.out_norms.2.weight"], state["backbone.norm2.weight"])


def test_release_loading_lists_what_does_not_fit(swin_tiny_detector):
    model = swin_tiny_detector
    state = _synthetic_release(model)
    state["roi_head.bbox_head.extra.weight"] = torch.zeros(1)
    with pytest.raises(WeightsError, match="roi_head.bbox_head.extra.weight"):
        convert_mmdet_state_dict(state, model)
    del state["roi_head.bbox_head.extra.weight"]
    state["neck.fpn_convs.0.conv.bias"] = torch.zeros(128)
    del state["rpn_head.rpn_reg.bias"]
    with pytest.raises(WeightsError) as error:
        load_weights(model, convert_mmdet_state_dict(state, model))
    assert "rpn.head.bbox_pred.bias" in str(error.value)
    assert "backbone.fpn.layer_blocks.0.0.bias (file (128,), model (256,))" in str(error.value)


def test_small_detector_runs_and_trains():
    torch.manual_seed(0)
    model = build_detector(TINY_SPEC)
    with torch.no_grad():
        (out,) = model([torch.rand(3, 90, 120)])
    assert out["masks"].shape[1:] == (1, 90, 120) and out["labels"].max() <= 3
    model.train()
    target = {"boxes": torch.tensor([[10.0, 10.0, 50.0, 60.0]]), "labels": torch.tensor([2]),
              "masks": torch.zeros(1, 90, 120, dtype=torch.uint8)}  # fmt: skip
    target["masks"][0, 10:60, 10:50] = 1
    losses = model([torch.rand(3, 90, 120)], [target])
    assert set(losses) >= {"loss_classifier", "loss_mask", "loss_objectness"}
    sum(losses.values()).backward()
    assert model.backbone.body.layers[0].blocks[0].attn.qkv.weight.grad is not None


def test_transposed_conv_is_the_per_pixel_linear_map_it_is_calibrated_as():
    from adalog.models.qmodules import QuantConvTranspose2d

    torch.manual_seed(0)
    conv = torch.nn.ConvTranspose2d(5, 3, kernel_size=2, stride=2)
    quantized = QuantConvTranspose2d(conv, 4, input_quant=None)
    x = torch.randn(2, 5, 4, 6)
    y = conv(x)
    pixels = x.permute(0, 2, 3, 1).reshape(-1, 5)
    torch.testing.assert_close(pixels @ quantized.linear_rows().T, quantized.linear_outputs(y))
    rows = quantized.linear_rows()  # per-row scales land on (channel, kernel position)
    scale = (rows.amax(1) - rows.amin(1)) / 15
    quantized.weight_quant.set_params(scale[:, None], torch.round(-rows.amin(1) / scale)[:, None])
    quantized.set_quant(True)
    expected = torch.nn.functional.conv_transpose2d(
        x, quantized.quantized_weight(), conv.bias, stride=2
    )
    torch.testing.assert_close(quantized(x), expected)
    w_hat = quantized.quantized_weight()
    assert w_hat.shape == conv.weight.shape
    for o in range(3):  # 16 levels at most per output channel and kernel position
        for a in range(2):
            assert w_hat[:, o, a, 0].unique().numel() <= 16
    assert (w_hat - conv.weight).abs().max() <= scale.max() / 2 + 1e-6
    with pytest.raises(NotImplementedError):
        QuantConvTranspose2d(torch.nn.ConvTranspose2d(5, 3, 3, stride=2), 4, None)
