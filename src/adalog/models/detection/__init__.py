"""Detectors built from torchvision's detection parts around a timm Swin backbone."""

from adalog.models.detection.checkpoint import convert_mmdet_state_dict, load_mmdet_checkpoint
from adalog.models.detection.factory import create_detector
from adalog.models.detection.mask_rcnn import (
    DETECTORS,
    DetectorSpec,
    build_detector,
    detector_spec,
    is_detector,
)

__all__ = [
    "DETECTORS",
    "DetectorSpec",
    "build_detector",
    "create_detector",
    "convert_mmdet_state_dict",
    "detector_spec",
    "is_detector",
    "load_mmdet_checkpoint",
]
