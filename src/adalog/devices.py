"""Where adalog runs: device names, and the matmul precision searches need."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from adalog.errors import ConfigError


def model_device(model: torch.nn.Module) -> torch.device:
    """Where ``model`` works: its first parameter's device (the CPU for a parameter-free one)."""
    parameter = next(model.parameters(), None)
    return torch.device("cpu") if parameter is None else parameter.device


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` is CUDA when available, else the CPU; any other name as torch reads it. A name
    torch does not know, or CUDA on a machine without it, is a :class:`ConfigError`."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as exc:
        raise ConfigError(f"unknown device {device!r} (auto, cpu, cuda or cuda:N)") from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} asked for, but torch sees no CUDA GPU here")
    return resolved


@contextmanager
def exact_matmuls(enabled: bool = True) -> Iterator[None]:
    """TF32 off for CUDA matmuls and convolutions inside, the caller's settings restored after:
    TF32 rounds float32 products to 10 mantissa bits, enough to change which candidate of a
    search wins. Uses torch's ``fp32_precision`` settings where they exist (torch >= 2.9, which
    refuses the legacy ``allow_tf32`` flags once they are in use), else the legacy flags.
    ``enabled=False`` (data on the CPU) leaves everything as it is."""
    if not enabled:
        yield
        return
    if hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        flags = [
            (torch.backends.cuda.matmul, "fp32_precision"),
            (torch.backends.cudnn.conv, "fp32_precision"),
        ]
        exact: object = "ieee"
    else:
        flags = [(torch.backends.cuda.matmul, "allow_tf32"), (torch.backends.cudnn, "allow_tf32")]
        exact = False
    saved = [getattr(owner, name) for owner, name in flags]
    for owner, name in flags:
        setattr(owner, name, exact)
    try:
        yield
    finally:
        for (owner, name), value in zip(flags, saved, strict=True):
            setattr(owner, name, value)
