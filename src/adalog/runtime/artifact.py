"""What the integer engines read from an artifact, validated: weight codes and log-code tables.

Both engines (:mod:`adalog.runtime.integer`, :mod:`adalog.runtime.fast`) decode the same
artifact entries (the schema is in :mod:`adalog.pipelines.export`); keeping that here, below
both, lets ``fast`` build on ``integer`` without ``integer`` reaching back into ``fast``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from adalog.errors import ArtifactError
from adalog.pipelines.export import Artifact
from adalog.quant import LogQuantizer
from adalog.quant.log import ADALOG_R, adalog_denominator, adalog_lut_numerators
from adalog.quant.packing import unpack_codes

__all__ = ["WeightCodes", "log_tables", "weight_codes"]


@dataclass(frozen=True)
class WeightCodes:
    """One layer's weight as stored: code ``rows[o, k]`` means ``(rows - zero[o])·scale[o]``."""

    rows: Tensor  # raw codes [O, K] (K: everything after the output dim), int64 in [0, 2^bits)
    zero: Tensor  # rounded zero points [O], int64
    scale: Tensor  # scales [O], float32
    bits: int
    shape: list[int]  # the layer's weight shape


def weight_codes(artifact: Artifact, name: str) -> WeightCodes:
    """Unpack layer ``name``'s weight codes with their per-row zero points and scales."""
    info = artifact.meta["layers"][name]
    shape, bits = list(info["weight_shape"]), int(info["w_bits"])
    raw = unpack_codes(artifact.tensors[f"{name}.weight.codes"], bits, math.prod(shape))
    zero = torch.round(artifact.tensors[f"{name}.weight_quant.zero_point"].reshape(-1))
    scale = artifact.tensors[f"{name}.weight_quant.scale"].reshape(-1).to(torch.float32)
    return WeightCodes(raw.reshape(shape[0], -1), zero.to(torch.int64), scale, bits, shape)


def log_tables(
    artifact: Artifact | None, prefix: str, quant: LogQuantizer
) -> tuple[Tensor, Tensor, int]:
    """LUT numerators ``n_k``, shifts ``t_k`` and denominator D of a log quantizer's codes
    (level ``k`` is ``2^(-t_k)·n_k/D``). AdaLog's come from the artifact and are refused unless
    they are the tables of its ``q`` (a tampered or stale LUT would silently change every
    product); Log2 / Log-√2 need no artifact entry."""
    codes = torch.arange(quant.n_levels)
    if quant.kind == "log2":
        return torch.ones_like(codes), codes, 1
    if quant.kind == "logsqrt2":
        return torch.ones_like(codes), torch.div(codes + 1, 2, rounding_mode="floor"), 1
    tensors = {} if artifact is None else artifact.tensors
    numerators = tensors.get(f"{prefix}.lut_numerators")
    shifts = tensors.get(f"{prefix}.t1")
    q = int(quant.q)
    if numerators is None or shifts is None:
        raise ArtifactError(f"{prefix}: AdaLog LUT numerators or T1 shifts missing")
    expected_t1 = torch.div(codes * q, ADALOG_R, rounding_mode="floor")
    numerators, shifts = numerators.to(torch.int64), shifts.to(torch.int64)
    if not torch.equal(numerators, adalog_lut_numerators(q, quant.n_bits)):
        raise ArtifactError(f"{prefix}: LUT numerators do not match q = {q}")
    if not torch.equal(shifts, expected_t1):
        raise ArtifactError(f"{prefix}: T1 shifts do not match q = {q}")
    return numerators, shifts, adalog_denominator(quant.n_bits)
