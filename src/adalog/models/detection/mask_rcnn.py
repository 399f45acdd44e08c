"""torchvision Mask R-CNN with a Swin + FPN backbone, set up like the public Swin detection
checkpoints (../shared/detection/SWIN_DETECTION.md §2-§7 and §10).

Detectors are known by name (:data:`DETECTORS`); a :class:`DetectorSpec` holds everything that
builds one, so a saved quantized detector is rebuilt from its spec. Class indices follow
torchvision: 0 is background, label ``l`` is the spec's class ``l - 1``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.rpn import RPNHead
from torchvision.ops import MultiScaleRoIAlign, roi_align
from torchvision.ops.poolers import LevelMapper

from adalog.models.detection.backbone import SwinFPN

#: COCO's 80 classes in the order of the checkpoints' classifier rows (§9)
COCO_CLASSES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant",
    "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush",
)  # fmt: skip

FPN_STRIDES = (4, 8, 16, 32)
RPN_STRIDES = (*FPN_STRIDES, 64)  # P6 is max-pooled P5
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class DetectorSpec:
    """What builds a detector: backbone size, head widths, class names, test-time resizing."""

    embed_dim: int = 96
    depths: tuple[int, ...] = (2, 2, 6, 2)
    num_heads: tuple[int, ...] = (3, 6, 12, 24)
    window_size: int = 7
    classes: tuple[str, ...] = COCO_CLASSES
    fpn_channels: int = 256
    box_features: int = 1024
    mask_convs: int = 4
    #: the shorter side is resized to ``min_size`` unless the longer one then exceeds ``max_size``
    min_size: int = 800
    max_size: int = 1333
    #: the public checkpoints' box coder: weights are the reciprocals of mmdet's stds (§10a)
    box_coder_weights: tuple[float, ...] = (10.0, 10.0, 5.0, 5.0)
    #: where the trained weights are published (mmdetection layout), if anywhere
    url: str | None = None


_RELEASES = "https://github.com/SwinTransformer/storage/releases/download/"
#: the public Mask R-CNN Swin-T/S checkpoints' architectures (Swin-S differs only in depth)
#: and the generated-shapes proxy
DETECTORS: dict[str, DetectorSpec] = {
    "mask_rcnn_swin_tiny": DetectorSpec(
        url=_RELEASES + "v1.0.2/mask_rcnn_swin_tiny_patch4_window7.pth"
    ),
    "mask_rcnn_swin_small": DetectorSpec(
        depths=(2, 2, 18, 2), url=_RELEASES + "v1.0.2/mask_rcnn_swin_small_patch4_window7.pth"
    ),
    # the proxy of benchmarks/detection_proxy.py: a narrow Swin on 192-pixel generated shapes
    "mask_rcnn_swin_shapes": DetectorSpec(
        embed_dim=32,
        depths=(2, 2, 2, 2),
        num_heads=(1, 2, 4, 8),
        classes=("disc", "square", "triangle"),
        fpn_channels=64,
        box_features=256,
        min_size=192,
        max_size=192,
    ),  # fmt: skip
}


class FixedStrideAnchors(AnchorGenerator):
    """mmdet's anchors: strides fixed per level (torchvision derives them from the padded image
    size, which is off for P6 when P5 is odd) and unrounded base sizes (§10c)."""

    def __init__(self, strides: tuple[int, ...] = RPN_STRIDES, scale: int = 8) -> None:
        sizes = tuple((s * scale,) for s in strides)
        super().__init__(sizes, ((0.5, 1.0, 2.0),) * len(strides))
        self.strides = strides

    def generate_anchors(self, scales, aspect_ratios, dtype=torch.float32, device=None) -> Tensor:
        scales = torch.as_tensor(scales, dtype=dtype, device=device)
        ratios = torch.as_tensor(aspect_ratios, dtype=dtype, device=device)
        heights = (ratios.sqrt()[:, None] * scales[None, :]).view(-1)
        widths = (1 / ratios.sqrt()[:, None] * scales[None, :]).view(-1)
        return torch.stack([-widths, -heights, widths, heights], dim=1) / 2

    def forward(self, image_list: ImageList, feature_maps: list[Tensor]) -> list[Tensor]:
        dtype, device = feature_maps[0].dtype, feature_maps[0].device
        grid_sizes = [list(f.shape[-2:]) for f in feature_maps]
        strides = [[torch.tensor(s, dtype=torch.int64, device=device)] * 2 for s in self.strides]
        self.set_cell_anchors(dtype, device)
        anchors = torch.cat(self.grid_anchors(grid_sizes, strides))
        return [anchors for _ in image_list.image_sizes]


class AlignedRoIAlign(MultiScaleRoIAlign):
    """Multi-level RoIAlign as the checkpoints were trained with: half-pixel ``aligned`` boxes,
    adaptive sampling (``sampling_ratio=0``), fixed level scales 1/4..1/32 (§10b)."""

    def __init__(self, output_size: int) -> None:
        super().__init__(["0", "1", "2", "3"], output_size, sampling_ratio=0)
        self.level_mapper = LevelMapper(2, 5)

    def forward(self, x: dict[str, Tensor], boxes: list[Tensor], image_shapes=None) -> Tensor:
        features = [x[name] for name in self.featmap_names]
        rois = torch.cat(
            [torch.cat([b.new_full((len(b), 1), i), b], dim=1) for i, b in enumerate(boxes)]
        )
        levels = self.level_mapper(boxes)
        pooled = features[0].new_zeros((len(rois), features[0].shape[1], *self.output_size))
        for level, (feature, stride) in enumerate(zip(features, FPN_STRIDES, strict=True)):
            index = torch.where(levels == level)[0]
            pooled[index] = roi_align(
                feature, rois[index], self.output_size, 1.0 / stride, 0, aligned=True
            )
        return pooled


def build_detector(spec: DetectorSpec, name: str = "mask_rcnn_swin") -> MaskRCNN:
    """A randomly initialised Mask R-CNN of ``spec`` in eval mode, test-time settings of §3/§7.

    ``pretrained_cfg`` carries what the quantization pipelines read of a timm model: the name,
    the normalisation, and the calibration canvas (the test size of a 4:3 image, stride 32).
    """
    backbone = SwinFPN(
        spec.embed_dim, spec.depths, spec.num_heads, spec.window_size, spec.fpn_channels
    )
    num_classes = len(spec.classes) + 1
    anchors = FixedStrideAnchors()
    channels, pooled = spec.fpn_channels, 7
    model = MaskRCNN(
        backbone,
        min_size=spec.min_size,
        max_size=spec.max_size,
        image_mean=list(IMAGENET_MEAN),
        image_std=list(IMAGENET_STD),
        rpn_anchor_generator=anchors,
        rpn_head=RPNHead(channels, anchors.num_anchors_per_location()[0]),
        rpn_pre_nms_top_n_test=1000,
        rpn_post_nms_top_n_test=1000,
        rpn_nms_thresh=0.7,
        box_roi_pool=AlignedRoIAlign(pooled),
        box_head=TwoMLPHead(channels * pooled * pooled, spec.box_features),
        box_predictor=FastRCNNPredictor(spec.box_features, num_classes),
        box_score_thresh=0.05,
        box_nms_thresh=0.5,
        box_detections_per_img=100,
        bbox_reg_weights=spec.box_coder_weights,
        mask_roi_pool=AlignedRoIAlign(14),
        mask_head=MaskRCNNHeads(channels, [channels] * spec.mask_convs, 1),
        mask_predictor=MaskRCNNPredictor(channels, channels, num_classes),
    )
    model.adalog_detector_spec = spec
    model.pretrained_cfg = {
        "architecture": name,
        "input_size": (3, *calibration_canvas(spec)),
        "mean": IMAGENET_MEAN,
        "std": IMAGENET_STD,
        "interpolation": "bilinear",
        "crop_pct": 1.0,
        "crop_mode": "center",
        "num_classes": len(spec.classes),
    }
    return model.eval()


def calibration_canvas(spec: DetectorSpec) -> tuple[int, int]:
    """``(height, width)`` holding any calibration image letterboxed at the test scale of a
    4:3 landscape image, rounded up to the backbone's stride 32."""
    width = min(spec.max_size, round(spec.min_size * 4 / 3))
    return _round_up(spec.min_size, 32), _round_up(width, 32)


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def detector_spec(name: str) -> DetectorSpec:
    """The spec of detector ``name``; unknown names list the known ones."""
    from adalog.errors import UnknownModelError

    if name not in DETECTORS:
        raise UnknownModelError(
            f"unknown detector '{name}'; known detectors: {', '.join(sorted(DETECTORS))}"
        )
    return DETECTORS[name]


def is_detector(model: nn.Module) -> bool:
    return hasattr(model, "adalog_detector_spec")
