"""Transforms resolved from the model's pretrained config, never hard-coded."""

from __future__ import annotations

from typing import Any

import torch
from PIL import Image
from timm.data import create_transform, resolve_model_data_config
from torch import nn
from torchvision.transforms.functional import pil_to_tensor


def model_data_config(model: nn.Module) -> dict[str, Any]:
    """input_size, interpolation, mean, std, crop_pct, crop_mode of the model's pretrained cfg;
    the input size is the one the model was built for (timm keeps the tag's size in the cfg
    when ``img_size`` is passed as a kwarg)."""
    cfg = dict(resolve_model_data_config(model))
    img_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if img_size is not None and tuple(cfg["input_size"][1:]) != tuple(img_size):
        cfg["input_size"] = (cfg["input_size"][0], *img_size)
    return cfg


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


def letterbox_transform(model: nn.Module):
    """Images for a detector's calibration batch: resized whole (aspect kept) to fit the
    canvas ``input_size`` of its config, top-left on a canvas of the mean colour, which
    normalises to the zeros a detector pads its own batches with. One canvas for every image
    makes a batch of differently shaped images, at about the detector's test scale."""
    cfg = model_data_config(model)
    height, width = cfg["input_size"][1:]
    mean = torch.tensor(cfg["mean"], dtype=torch.float32)[:, None, None]

    def letterbox(image: Image.Image) -> torch.Tensor:
        scale = min(height / image.height, width / image.width)
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        pixels = pil_to_tensor(image.convert("RGB").resize(size, Image.BILINEAR)) / 255.0
        canvas = mean.expand(3, height, width).clone()
        canvas[:, : size[1], : size[0]] = pixels
        return canvas

    return letterbox
