"""ImageNet-style folders labelled by WordNet id, file lists and model-resolved transforms."""

from adalog.data.imagenet import (
    ImageRecord,
    LabeledImageFolder,
    collate_skipping_bad,
    list_images,
    read_file_list,
    scan_image_folder,
    spread_sample,
)
from adalog.data.transforms import (
    calibration_transform,
    eval_transform,
    letterbox_transform,
    model_data_config,
)

__all__ = [
    "ImageRecord",
    "LabeledImageFolder",
    "calibration_transform",
    "collate_skipping_bad",
    "eval_transform",
    "letterbox_transform",
    "list_images",
    "model_data_config",
    "read_file_list",
    "scan_image_folder",
    "spread_sample",
]
