"""Read weight files and load them strictly: every key present, none extra, every shape equal."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from adalog.errors import WeightsError

_MAX_LISTED_KEYS = 20


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
