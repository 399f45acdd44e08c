"""Load the public Swin detection checkpoints (mmdetection 2.x layout) into the torchvision
build, strictly (../shared/detection/SWIN_DETECTION.md §10a, §10e, §11).

Every mmdet key maps to exactly one key of :func:`build_detector`'s model by an explicit rule;
the classifier's background row moves from last to first, and the class-specific box and mask
outputs gain the background slot torchvision expects. A key no rule maps, a model key no file
key fills, and a shape mismatch are all listed in one error.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor
from torchvision.models.detection import MaskRCNN

from adalog.errors import WeightsError
from adalog.models.weights import load_weights, read_state_dict

Rule = tuple[re.Pattern, str, Callable[[Tensor], Tensor] | None]


def _background_first(rows: Tensor) -> Tensor:
    """mmdet's classifier keeps background in its last row; torchvision in its first."""
    return torch.cat([rows[-1:], rows[:-1]])


def _prepend(count: int) -> Callable[[Tensor], Tensor]:
    """Zero outputs for background in front of class-specific box deltas or mask logits
    (torchvision never reads them at inference)."""

    def prepend(rows: Tensor) -> Tensor:
        return torch.cat([rows.new_zeros((count, *rows.shape[1:])), rows])

    return prepend


def _shift_stage(match: re.Match) -> str:
    # the releases merge patches at the end of stage i, timm at the start of stage i + 1
    return f"backbone.body.layers.{int(match[1]) + 1}.downsample.{match[2]}"


_RULES: list[tuple[str, str | Callable[[re.Match], str], Callable[[Tensor], Tensor] | None]] = [
    (r"backbone\.patch_embed\.(.+)", r"backbone.body.patch_embed.\1", None),
    (r"backbone\.layers\.(\d+)\.blocks\.(.+)", r"backbone.body.layers.\1.blocks.\2", None),
    (r"backbone\.layers\.(\d+)\.downsample\.(.+)", _shift_stage, None),
    (r"backbone\.norm(\d)\.(.+)", r"backbone.out_norms.\1.\2", None),
    (r"neck\.lateral_convs\.(\d+)\.conv\.(.+)", r"backbone.fpn.inner_blocks.\1.0.\2", None),
    (r"neck\.fpn_convs\.(\d+)\.conv\.(.+)", r"backbone.fpn.layer_blocks.\1.0.\2", None),
    (r"rpn_head\.rpn_conv\.(.+)", r"rpn.head.conv.0.0.\1", None),
    (r"rpn_head\.rpn_cls\.(.+)", r"rpn.head.cls_logits.\1", None),
    (r"rpn_head\.rpn_reg\.(.+)", r"rpn.head.bbox_pred.\1", None),
    (r"roi_head\.bbox_head\.shared_fcs\.0\.(.+)", r"roi_heads.box_head.fc6.\1", None),
    (r"roi_head\.bbox_head\.shared_fcs\.1\.(.+)", r"roi_heads.box_head.fc7.\1", None),
    (r"roi_head\.bbox_head\.fc_cls\.(.+)", r"roi_heads.box_predictor.cls_score.\1",
     _background_first),
    (r"roi_head\.bbox_head\.fc_reg\.(.+)", r"roi_heads.box_predictor.bbox_pred.\1", _prepend(4)),
    (r"roi_head\.mask_head\.convs\.(\d+)\.conv\.(.+)", r"roi_heads.mask_head.\1.0.\2", None),
    (r"roi_head\.mask_head\.upsample\.(.+)", r"roi_heads.mask_predictor.conv5_mask.\1", None),
    (r"roi_head\.mask_head\.conv_logits\.(.+)", r"roi_heads.mask_predictor.mask_fcn_logits.\1",
     _prepend(1)),
]  # fmt: skip
_COMPILED = [(re.compile(pattern + r"\Z"), target, change) for pattern, target, change in _RULES]
#: timm rebuilds this index itself (a non-persistent buffer); the file's copy is checked, not loaded
_POSITION_INDEX = re.compile(
    r"backbone\.layers\.(\d+)\.blocks\.(\d+)\.attn\.relative_position_index\Z"
)


def convert_mmdet_state_dict(state: dict[str, Tensor], model: MaskRCNN) -> dict[str, Tensor]:
    """``state`` (mmdet key layout) renamed and re-ordered for ``model``; unmapped keys and
    relative-position indices that differ from the model's are refused."""
    converted: dict[str, Tensor] = {}
    unmapped: list[str] = []
    for key, value in state.items():
        position = _POSITION_INDEX.match(key)
        if position:
            _check_position_index(model, position, key, value)
            continue
        for pattern, target, change in _COMPILED:
            match = pattern.match(key)
            if match:
                name = target(match) if callable(target) else match.expand(target)
                converted[name] = change(value) if change else value
                break
        else:
            unmapped.append(key)
    if unmapped:
        shown = ", ".join(sorted(unmapped)[:20])
        more = f" (+{len(unmapped) - 20} more)" if len(unmapped) > 20 else ""
        raise WeightsError(f"checkpoint keys with no place in the detector: {shown}{more}")
    return converted


def _check_position_index(model: MaskRCNN, match: re.Match, key: str, value: Tensor) -> None:
    path = f"backbone.body.layers.{match[1]}.blocks.{match[2]}.attn"
    try:
        expected = model.get_submodule(path).relative_position_index
    except AttributeError:
        raise WeightsError(f"checkpoint key {key} has no block in the detector") from None
    if value.shape != expected.shape or not torch.equal(value.to(expected), expected):
        raise WeightsError(f"{key} differs from the window size the detector was built with")


def load_mmdet_checkpoint(model: MaskRCNN, source: str | Path | dict[str, Tensor]) -> None:
    """Load a public Swin detection checkpoint (``.pth`` with a ``state_dict``, or that state
    dict) strictly."""
    state = source if isinstance(source, dict) else read_state_dict(source)
    load_weights(model, convert_mmdet_state_dict(state, model))
