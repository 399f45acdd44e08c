"""AdaRound weight quantizer (docs/algorithm.md §1.8) and its rounding regulariser (§7.6).

Built from a calibrated asymmetric weight quantizer: the scale and zero point stay frozen and only
the per-weight rounding logit ``alpha`` is learned. Soft rounding adds ``h(alpha)`` (a rectified
sigmoid in [0, 1]) to ``floor(w/s)``; hard rounding adds ``1[alpha >= 0]``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from adalog.quant import UniformQuantizer, clamp_ste

ZETA = 1.1
GAMMA = -0.1


def rectified_sigmoid(alpha: Tensor) -> Tensor:
    """``h(alpha) = clamp(sigmoid(alpha)·(ζ − γ) + γ, 0, 1)``; reaches 0 and 1 exactly."""
    return torch.clamp(torch.sigmoid(alpha) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def alpha_for_fraction(frac: Tensor) -> Tensor:
    """Inverse of :func:`rectified_sigmoid` on [0, 1): the logit with ``h(alpha) = frac``."""
    return -torch.log((ZETA - GAMMA) / (frac - GAMMA) - 1.0)


def round_regularizer(h: Tensor, beta: float) -> Tensor:
    """``Σ (1 − |2h − 1|^β)``: zero only when every ``h`` is exactly 0 or 1 (§7.6)."""
    return (1.0 - (2.0 * h - 1.0).abs().pow(beta)).sum()


class AdaRoundQuantizer(nn.Module):
    """Learned-rounding stand-in for a weight's :class:`UniformQuantizer` during reconstruction.

    ``alpha`` starts so that ``h(alpha) = frac(w/s)``: the soft weight then equals the FP weight
    (inside the clipping range) and the hard weight equals nearest rounding (ties up).
    """

    def __init__(self, base: UniformQuantizer, weight: Tensor) -> None:
        super().__init__()
        if base.is_identity:
            raise ValueError("an identity (32-bit) weight quantizer has nothing to round")
        self.n_bits = base.n_bits
        self.register_buffer("scale", base.scale.detach().clone())
        self.register_buffer("zero_point", base.zero_point.detach().clone())
        ratio = weight.detach() / self.scale
        self.alpha = nn.Parameter(alpha_for_fraction(ratio - torch.floor(ratio)))
        self.soft = True

    def rounding(self) -> Tensor:
        """The per-weight rounding offset: ``h(alpha)`` (soft) or ``1[alpha >= 0]`` (hard)."""
        if self.soft:
            return rectified_sigmoid(self.alpha)
        return (self.alpha >= 0).to(self.alpha.dtype)

    def codes(self, weight: Tensor) -> Tensor:
        """``clamp(floor(w/s) + rounding + z, 0, N−1)`` (float, integer-valued when hard)."""
        zp = torch.round(self.zero_point)
        base = torch.floor(weight.detach() / self.scale)
        return clamp_ste(base + self.rounding() + zp, 0, 2**self.n_bits - 1)

    def forward(self, weight: Tensor) -> Tensor:
        return (self.codes(weight) - torch.round(self.zero_point)) * self.scale

    def regularizer(self, beta: float) -> Tensor:
        return round_regularizer(rectified_sigmoid(self.alpha), beta)

    def extra_repr(self) -> str:
        return f"n_bits={self.n_bits}, soft={self.soft}, shape={tuple(self.alpha.shape)}"
