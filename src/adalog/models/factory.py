"""Create timm models by name with weights from the hub or a local file, loaded strictly."""

from __future__ import annotations

import difflib
from pathlib import Path

import timm
import torch
from torch import nn

from adalog.errors import UnknownModelError, UnsupportedModelError, WeightsError

SUPPORTED_FAMILIES = ("vit", "deit", "swin")
_MAX_LISTED_KEYS = 20


def model_family(model: nn.Module) -> str:
    """Return 'vit', 'deit' or 'swin' for a supported timm model; refuse anything else.

    DeiT (distilled too) shares timm's VisionTransformer classes, so the family comes from
    the architecture name; Swin v1 is timm's SwinTransformer (v2 is a different class).
    """
    from timm.models.swin_transformer import SwinTransformer
    from timm.models.vision_transformer import VisionTransformer

    arch = getattr(model, "pretrained_cfg", {}).get("architecture", type(model).__name__)
    if isinstance(model, SwinTransformer):
        return "swin"
    if isinstance(model, VisionTransformer):
        return "deit" if str(arch).startswith("deit") else "vit"
    raise UnsupportedModelError(
        f"model '{arch}' ({type(model).__name__}) is not supported; adalog quantizes the "
        f"families {', '.join(SUPPORTED_FAMILIES)} (timm VisionTransformer incl. DeiT/distilled "
        "DeiT, and SwinTransformer v1)"
    )


def create_model(
    name: str,
    weights: str | Path | None = None,
    pretrained: bool = True,
    **kwargs,
) -> nn.Module:
    """Create timm model ``name`` (tags such as ``.augreg_in21k_ft_in1k`` allowed) in eval mode.

    Weights come from ``weights`` (a local file) when given, otherwise from timm's hub when
    ``pretrained``; a random initialisation only when both are off.
    """
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
    close = difflib.get_close_matches(name.split(".")[0], timm.list_models(), n=5)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise UnknownModelError(f"unknown timm model '{name}'.{hint}")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from .safetensors or a torch file (.pth/.bin/.pt).

    Torch files may wrap the state dict under a ``model`` or ``state_dict`` key.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weight file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any decoding failure is a bad file for the user
        raise WeightsError(f"could not read weight file {path}: {exc}") from exc
    for key in ("model", "state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{path} does not hold a state dict of tensors")
    return obj


def load_weights(model: nn.Module, weights: str | Path | dict[str, torch.Tensor]) -> None:
    """Load weights strictly: every key present, none extra, every shape equal."""
    state = weights if isinstance(weights, dict) else read_state_dict(weights)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mis_shaped = sorted(
        f"{k} (file {tuple(state[k].shape)}, model {tuple(expected[k].shape)})"
        for k in set(state) & set(expected)
        if state[k].shape != expected[k].shape
    )
    problems = [
        f"{label}: {_listing(keys)}"
        for label, keys in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("mis-shaped keys", mis_shaped),
        )
        if keys
    ]
    if problems:
        source = weights if not isinstance(weights, dict) else "state dict"
        arch = getattr(model, "pretrained_cfg", {}).get("architecture", type(model).__name__)
        raise WeightsError(f"weights {source} do not match model '{arch}': " + "; ".join(problems))
    model.load_state_dict(state, strict=True)


def _listing(keys: list[str]) -> str:
    shown = ", ".join(keys[:_MAX_LISTED_KEYS])
    more = len(keys) - _MAX_LISTED_KEYS
    return f"{shown} (+{more} more)" if more > 0 else shown
