"""Uniform fake quantizers (§1.2 asymmetric, §1.3 twin) as broadcasting functions.

Every function broadcasts its parameters against ``x``, so a leading candidate dimension in the
parameters (e.g. ``scale`` of shape ``(K, 1, 1)`` against ``x`` of shape ``(1, T, C)``) evaluates
all K candidates in one call; this is what the calibration searches rely on.

Codes are returned as float tensors holding integer values so that they can stay in the autograd
graph. With ``ste=True`` (training mode, §0.2) every rounding is a straight-through round: the
forward value is rounded and the gradient is the identity. Clamps then use :func:`clamp_ste`, so
the gradient with respect to ``x`` is 1 on the closed clipping range and 0 outside it, and the
scale receives the LSQ gradient without gradient scaling (§1.2).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "asym_codes",
    "asym_dequant",
    "asym_fake_quant",
    "clamp_ste",
    "round_ste",
    "twin_codes",
    "twin_dequant",
    "twin_fake_quant",
]


class _RoundSTE(torch.autograd.Function):
    """Round half-to-even forward, identity backward.

    A custom Function rather than ``x + (round(x) - x).detach()`` so that infinite inputs (an
    overflowing ``x / s``) do not turn into NaN.
    """

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad


def round_ste(x: Tensor) -> Tensor:
    """Straight-through round (§0.2): forward ``torch.round``, gradient identity."""
    return _RoundSTE.apply(x)


def clamp_ste(x: Tensor, lo: float, hi: float) -> Tensor:
    """Clamp whose gradient is 1 on the closed range ``[lo, hi]`` and 0 outside.

    torch 1.10 (the reference's version) used this subgradient; the torch installed here gives
    0 at the bounds themselves. Rounded codes often land exactly on 0 or N-1, so the choice is
    made explicit here instead of depending on the torch version.
    """
    inside = (x >= lo) & (x <= hi)
    return torch.where(inside, x, torch.clamp(x, lo, hi).detach())


def _round(x: Tensor, ste: bool) -> Tensor:
    return round_ste(x) if ste else torch.round(x)


def _clamp(x: Tensor, lo: float, hi: float, ste: bool) -> Tensor:
    return clamp_ste(x, lo, hi) if ste else torch.clamp(x, lo, hi)


def asym_codes(
    x: Tensor, scale: Tensor, zero_point: Tensor, n_bits: int, ste: bool = False
) -> Tensor:
    """Asymmetric codes ``clamp(round(x/s) + round(z), 0, N-1)`` (§1.2).

    ``x/s`` is rounded before the zero point is added; the stored zero point is rounded again.
    """
    zp = _round(torch.as_tensor(zero_point, device=x.device), ste)
    return _clamp(_round(x / scale, ste) + zp, 0, 2**n_bits - 1, ste)


def asym_dequant(codes: Tensor, scale: Tensor, zero_point: Tensor, ste: bool = False) -> Tensor:
    """Dequantize asymmetric codes: ``(c - round(z)) * s`` (§1.2)."""
    return (codes - _round(torch.as_tensor(zero_point, device=codes.device), ste)) * scale


def asym_fake_quant(
    x: Tensor, scale: Tensor, zero_point: Tensor, n_bits: int, ste: bool = False
) -> Tensor:
    """Asymmetric uniform fake quantization onto the grid ``{(k - z)·s : k = 0..N-1}`` (§1.2).

    Without ``ste`` and outside autograd (the searches) the steps run in place on one buffer.
    """
    if ste or _tracks_grad(x, scale):
        return asym_dequant(asym_codes(x, scale, zero_point, n_bits, ste), scale, zero_point, ste)
    zp = torch.round(torch.as_tensor(zero_point, dtype=x.dtype, device=x.device))
    out = x / scale
    full = torch.broadcast_shapes(out.shape, zp.shape)
    if full != out.shape:
        out = out.expand(full).clone()
    return out.round_().add_(zp).clamp_(0, 2**n_bits - 1).sub_(zp).mul_(scale)


def _tracks_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(
        isinstance(t, Tensor) and t.requires_grad for t in tensors
    )


def twin_codes(
    x: Tensor, s_pos: Tensor, s_neg: Tensor, n_bits: int, ste: bool = False
) -> tuple[Tensor, Tensor]:
    """Twin-uniform branch codes (§1.3): positive in ``[0, H-1]``, negative in ``[-H, 0]``.

    At most one branch is non-zero for any element, because ``x > 0`` rounds to a code ``>= 0``
    on the negative branch (clamped to 0) and vice versa.
    """
    half = 2 ** (n_bits - 1)
    c_pos = _clamp(_round(x / s_pos, ste), 0, half - 1, ste)
    c_neg = _clamp(_round(x / s_neg, ste), -half, 0, ste)
    return c_pos, c_neg


def twin_dequant(c_pos: Tensor, c_neg: Tensor, s_pos: Tensor, s_neg: Tensor) -> Tensor:
    """Dequantize twin-uniform branch codes: ``c_pos·s_pos + c_neg·s_neg`` (§1.3)."""
    return c_pos * s_pos + c_neg * s_neg


def twin_fake_quant(
    x: Tensor, s_pos: Tensor, s_neg: Tensor, n_bits: int, ste: bool = False
) -> Tensor:
    """PTQ4ViT twin-uniform fake quantization (§1.3): H positive and H+1 non-positive levels."""
    c_pos, c_neg = twin_codes(x, s_pos, s_neg, n_bits, ste)
    return twin_dequant(c_pos, c_neg, s_pos, s_neg)
