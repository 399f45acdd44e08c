"""Where adalog runs: device names, and the matmul precision searches need."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` is CUDA when available, else the CPU; any other name as torch reads it."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@contextmanager
def exact_matmuls() -> Iterator[None]:
    """TF32 matmuls and convolutions off inside, the caller's settings restored after: TF32
    rounds float32 products to 10 mantissa bits, enough to change which candidate of a search
    wins (a no-op on the CPU)."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn
