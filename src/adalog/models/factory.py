"""Create timm models by name with weights from the hub or a local file, loaded strictly."""

from __future__ import annotations

import difflib
from pathlib import Path

import timm
import torch
from torch import nn

from adalog.errors import UnknownModelError, UnsupportedModelError, WeightsError
from adalog.models.weights import load_weights

SUPPORTED_FAMILIES = ("vit", "deit", "swin", "swin_detector")


def model_family(model: nn.Module) -> str:
    """Return 'vit', 'deit' or 'swin' for a supported timm model, 'swin_detector' for a
    detector of :mod:`adalog.models.detection`; refuse anything else.

    DeiT (distilled too) shares timm's VisionTransformer classes, so the family comes from
    the architecture name; Swin v1 is timm's SwinTransformer (v2 is a different class).
    """
    from timm.models.swin_transformer import SwinTransformer
    from timm.models.vision_transformer import VisionTransformer

    arch = getattr(model, "pretrained_cfg", {}).get("architecture", type(model).__name__)
    from adalog.models.detection import is_detector

    if is_detector(model):
        return "swin_detector"
    if isinstance(model, SwinTransformer):
        return "swin"
    if isinstance(model, VisionTransformer):
        return "deit" if str(arch).startswith("deit") else "vit"
    raise UnsupportedModelError(
        f"model '{arch}' ({type(model).__name__}) is not supported; adalog quantizes the "
        f"families {', '.join(SUPPORTED_FAMILIES)} (timm VisionTransformer incl. DeiT/distilled "
        "DeiT, and SwinTransformer v1; Swin Mask R-CNN detectors by adalog name)"
    )


def create_model(
    name: str,
    weights: str | Path | None = None,
    pretrained: bool = True,
    **kwargs,
) -> nn.Module:
    """Create timm model ``name`` (tags such as ``.augreg_in21k_ft_in1k`` allowed) in eval mode.

    Weights come from ``weights`` (a local file) when given, otherwise from timm's hub when
    ``pretrained``; a random initialisation only when both are off. Detector names
    (:data:`adalog.models.detection.DETECTORS`) build a detector instead; ``kwargs`` then
    override fields of its spec.
    """
    from adalog.models.detection import DETECTORS, create_detector

    if name in DETECTORS:
        return create_detector(name, weights, pretrained, **kwargs)
    _check_name(name)
    check_family(name, **kwargs)
    use_hub = pretrained and weights is None
    try:
        model = timm.create_model(name, pretrained=use_hub, **kwargs)
    except (OSError, RuntimeError, ValueError) as exc:
        if not use_hub:
            raise
        raise WeightsError(
            f"could not download pretrained weights for '{name}' from the timm hub ({exc}). "
            "Offline? Pass a local weight file with --weights (Python: weights=...)."
        ) from exc
    if weights is not None:
        load_weights(model, weights)
    model.adalog_model_kwargs = dict(kwargs)  # recorded in checkpoints, so a reload rebuilds it
    return model.eval()


def check_family(name: str, **kwargs) -> str:
    """The family of timm model ``name``, refused if unsupported before any download or weight
    loading: the architecture is built on the meta device (no memory, no weights)."""
    with torch.device("meta"):
        probe = timm.create_model(name, pretrained=False, **kwargs)
    return model_family(probe)


def _check_name(name: str) -> None:
    if timm.is_model(name):
        return
    from adalog.models.detection import DETECTORS

    known = timm.list_models() + list(DETECTORS)
    close = difflib.get_close_matches(name.split(".")[0], known, n=5)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise UnknownModelError(f"unknown timm model '{name}'.{hint}")
