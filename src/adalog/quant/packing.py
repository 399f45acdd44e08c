"""Bit packing of integer codes: ``n`` codes of ``b`` bits take ``ceil(n·b / 8)`` bytes.

Codes are laid out as one little-endian bit stream: code ``i`` occupies bits ``i·b .. i·b+b-1``
(least significant bit first), byte ``j`` holds stream bits ``8j .. 8j+7`` with bit 0 as its
least significant bit. Any width 1..8 packs densely (3- and 6-bit codes straddle bytes).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

__all__ = ["pack_codes", "packed_size", "unpack_codes"]


def packed_size(n_codes: int, n_bits: int) -> int:
    """Bytes needed for ``n_codes`` codes of ``n_bits`` bits."""
    _check_bits(n_bits)
    return math.ceil(n_codes * n_bits / 8)


def pack_codes(codes: Tensor, n_bits: int) -> Tensor:
    """Pack non-negative integer codes ``< 2**n_bits`` (any shape, flattened) into uint8."""
    _check_bits(n_bits)
    flat = codes.detach().reshape(-1).to(torch.int64)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= 2**n_bits):
        raise ValueError(
            f"codes must lie in [0, {2**n_bits - 1}] for {n_bits}-bit packing, "
            f"got [{int(flat.min())}, {int(flat.max())}]"
        )
    values = flat.cpu().numpy().astype(np.uint8)
    bits = (values[:, None] >> np.arange(n_bits, dtype=np.uint8)) & 1
    packed = np.packbits(bits.reshape(-1), bitorder="little")
    return torch.from_numpy(packed.copy())


def unpack_codes(packed: Tensor, n_bits: int, n_codes: int) -> Tensor:
    """Inverse of :func:`pack_codes`: the first ``n_codes`` codes as int64."""
    _check_bits(n_bits)
    if packed.dtype != torch.uint8 or packed.dim() != 1:
        raise ValueError(
            f"packed codes must be a 1-D uint8 tensor, got {packed.dtype} {packed.dim()}-D"
        )
    if packed.numel() != packed_size(n_codes, n_bits):
        raise ValueError(
            f"{packed.numel()} bytes cannot hold exactly {n_codes} {n_bits}-bit codes "
            f"(expected {packed_size(n_codes, n_bits)})"
        )
    bits = np.unpackbits(packed.cpu().numpy(), bitorder="little")[: n_codes * n_bits]
    weights = (1 << np.arange(n_bits, dtype=np.int64))[None, :]
    codes = (bits.reshape(n_codes, n_bits).astype(np.int64) * weights).sum(1)
    return torch.from_numpy(codes)


def _check_bits(n_bits: int) -> None:
    if not 1 <= n_bits <= 8:
        raise ValueError(f"packing supports 1..8-bit codes, got {n_bits}")
