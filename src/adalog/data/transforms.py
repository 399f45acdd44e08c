"""Transforms resolved from the model's pretrained config, never hard-coded."""

from __future__ import annotations

from typing import Any

from timm.data import create_transform, resolve_model_data_config
from torch import nn


def model_data_config(model: nn.Module) -> dict[str, Any]:
    """input_size, interpolation, mean, std, crop_pct, crop_mode of the model's pretrained cfg."""
    return resolve_model_data_config(model)


def eval_transform(model: nn.Module):
    """timm's evaluation transform (resize, center crop, normalize) for this model."""
    return create_transform(**model_data_config(model), is_training=False)


def calibration_transform(model: nn.Module, augment: bool):
    """The eval transform, or timm's training augmentation as the reference uses (§6.1)."""
    if not augment:
        return eval_transform(model)
    cfg = model_data_config(model)
    return create_transform(
        input_size=cfg["input_size"],
        is_training=True,
        interpolation=cfg["interpolation"],
        mean=cfg["mean"],
        std=cfg["std"],
    )
