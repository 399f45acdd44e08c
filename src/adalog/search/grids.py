"""Candidate generators for the calibration searches (docs/algorithm.md §5.2, §5.3).

Uniform grids are returned as ``(scales, zero_points)``, both of shape ``(K, G)`` with
``K = eq_n`` candidates for each of ``G`` independent groups (rows, channels, heads, or G = 1 for a
per-tensor quantizer). Candidate ``k`` uses zero point number ``k // S`` and scale number ``k % S``
(zero point outer, scale inner), the layout the reference's FPCS tie-breaking depends on (§12).

Zero points are a fixed window of integers around mid-range, never derived from the data (§10
item 9). Callers pass the data already grouped as ``(G, L)``: a per-tensor quantizer passes
``x.reshape(1, -1)``, a per-channel one ``x.reshape(-1, C).T``, a per-head one the head-first view.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from adalog.quant import GELU_SHIFT as POST_GELU_SHIFT
from adalog.search.percentile import QUANTILE_MAX_ELEMENTS, linear_quantile, positive_nearest_rank

#: Lower bound on uniform *activation* scales only (§5.2c, §10 item 12).
ACTIVATION_SCALE_FLOOR = 1e-4
#: Zero-point cap of the reference's last commit (linear weights, activations, matmuls; §0.1).
ZERO_POINT_CAP = 16


class UniformGrid(NamedTuple):
    """Coarse (scale, zero point) candidates, both ``(K, G)``."""

    scales: Tensor
    zero_points: Tensor


class AdaLogScaleGrid(NamedTuple):
    """Post-GELU AdaLog scale range (0-d tensors) and its dense ``n_points`` grid (§5.2e)."""

    lo: Tensor
    hi: Tensor
    scales: Tensor


def _levels(n_bits: int) -> int:
    """H = 2^(b-1), the reference's "n_levels" (§0.2). b >= 2 keeps the zp window integral."""
    if n_bits < 2:
        raise ValueError(f"uniform grids need n_bits >= 2, got {n_bits}")
    return 2 ** (n_bits - 1)


def _scales_per_zero_point(eq_n: int, n_zero_points: int) -> int:
    """S = eq_n / Z. The reference silently degenerates when S <= 1 (§10 item 10); we refuse."""
    if eq_n % n_zero_points != 0:
        raise ValueError(f"eq_n={eq_n} is not a multiple of the {n_zero_points} zero points")
    n_scales = eq_n // n_zero_points
    if n_scales < 2:
        raise ValueError(
            f"eq_n={eq_n} leaves {n_scales} scale(s) per zero point for {n_zero_points} zero "
            "points; need at least 2 (the coarse spacing would be undefined). Raise eq_n, or "
            "for an 8-bit patch-embed conv set conv_zp_cap=True"
        )
    return n_scales


def _layout(
    r_lo: Tensor, r_hi: Tensor, half: int, n_zero_points: int, divisor: int, eq_n: int
) -> UniformGrid:
    """Scale rows ``(R_lo + j/(S-1)(R_hi - R_lo)) / divisor`` crossed with the zp window (§5.2a)."""
    n_scales = _scales_per_zero_point(eq_n, n_zero_points)
    frac = torch.arange(n_scales, dtype=r_lo.dtype, device=r_lo.device) / (n_scales - 1)
    scale_rows = (r_lo + frac[:, None] * (r_hi - r_lo)) / divisor  # (S, G)
    window = torch.arange(
        half - n_zero_points // 2, half + n_zero_points // 2, dtype=r_lo.dtype, device=r_lo.device
    )
    scales = scale_rows.repeat(n_zero_points, 1)
    zero_points = window.repeat_interleave(n_scales)[:, None].expand_as(scales).contiguous()
    return UniformGrid(scales, zero_points)


def _quantile_ranges(x_groups: Tensor, max_elements: int) -> tuple[Tensor, Tensor]:
    """R_lo = q0.9 - q0.1 and R_hi = q1 - q0 per group, all via (chunk-averaged) quantiles.

    q0/q1 go through the quantile path rather than min/max so that the >2^24 fallback averages
    per-chunk extremes exactly as it averages the other quantiles (§5.2c).
    """
    q0, q10, q90, q100 = linear_quantile(x_groups, [0.0, 0.1, 0.9, 1.0], 1, max_elements)
    return q90 - q10, q100 - q0


def weight_grid(
    w_rows: Tensor, n_bits: int, eq_n: int = 128, zp_cap: int | None = ZERO_POINT_CAP
) -> UniformGrid:
    """Per-row weight grid (§5.2a); pass ``zp_cap=None`` for conv weights (Z = H, §5.2b).

    ``w_rows`` is ``(G, L)``: linear weights ``(O, I)``, conv weights viewed as ``(O, I*kh*kw)``.
    R_lo uses linear-interpolation quantiles along L, R_hi is max - min.
    """
    half = _levels(n_bits)
    n_zp = half if zp_cap is None else min(zp_cap, half)
    q10, q90 = linear_quantile(w_rows, [0.1, 0.9], dim=1)
    r_hi = w_rows.amax(dim=1) - w_rows.amin(dim=1)
    return _layout(q90 - q10, r_hi, half, n_zp, 2 * half - 1, eq_n)


def activation_grid(
    x_groups: Tensor,
    n_bits: int,
    eq_n: int = 128,
    max_elements: int = QUANTILE_MAX_ELEMENTS,
) -> UniformGrid:
    """Uniform activation grid, per tensor (G = 1) or per channel (§5.2c).

    Z = min(16, N) -- N, not H, so 3-bit activations try every zero point -- and every scale is
    clamped to >= 1e-4 (§10 item 12).
    """
    half = _levels(n_bits)
    r_lo, r_hi = _quantile_ranges(x_groups, max_elements)
    grid = _layout(r_lo, r_hi, half, min(ZERO_POINT_CAP, 2 * half), 2 * half - 1, eq_n)
    return UniformGrid(grid.scales.clamp_min(ACTIVATION_SCALE_FLOOR), grid.zero_points)


def matmul_grid(
    x_groups: Tensor,
    n_bits_b: int,
    eq_n: int = 128,
    max_elements: int = QUANTILE_MAX_ELEMENTS,
) -> UniformGrid:
    """Per-head matmul operand grid (§5.2d), for either operand.

    Z = min(16, H_B) and the divisor N - 1 both come from the **B** operand's bit-width, also for
    A (§12 item 6), hence the single ``n_bits_b`` argument. No 1e-4 clamp.
    """
    half = _levels(n_bits_b)
    r_lo, r_hi = _quantile_ranges(x_groups, max_elements)
    return _layout(r_lo, r_hi, half, min(ZERO_POINT_CAP, half), 2 * half - 1, eq_n)


def coarse_spacing(scales: Tensor) -> Tensor:
    """FPCS's initial Δ per group: candidate 1 minus candidate 0 (§5.4).

    Taken from the grid as built, i.e. after the activation clamp, so a fully clamped group gets
    Δ = 0 and stops refining (§12 item 3).
    """
    return scales[1] - scales[0]


def initial_candidate(scales: Tensor, zero_points: Tensor) -> tuple[Tensor, Tensor]:
    """Candidate eq_n - 2 (largest zero point, second-largest scale), the init of §5.3."""
    return scales[-2], zero_points[-2]


def dense_scale_grid(lo: float | Tensor, hi: float | Tensor, n_points: int) -> Tensor:
    """``lo + (hi - lo) * i / (n_points - 1)`` for i = 0..n_points-1 (§5.2e, §5.5 step 2)."""
    if n_points < 2:
        raise ValueError(f"a scale grid needs at least 2 points, got {n_points}")
    device = next((t.device for t in (lo, hi) if isinstance(t, Tensor)), torch.device("cpu"))
    lo_t = torch.as_tensor(lo, device=device)
    hi_t = torch.as_tensor(hi, dtype=lo_t.dtype, device=lo_t.device)
    frac = torch.arange(n_points, dtype=lo_t.dtype, device=lo_t.device) / (n_points - 1)
    return lo_t + (hi_t - lo_t) * frac


def adalog_scale_grid(
    x: Tensor, n_points: int = 128, shift: float = POST_GELU_SHIFT
) -> AdaLogScaleGrid:
    """Post-GELU AdaLog scale range and dense grid (§5.2e).

    ``lo`` is the nearest-rank p90 of the strictly positive entries of ``x`` plus ``shift``, ``hi``
    the largest positive entry plus ``shift``. ``scales[n_points - 2]`` is the initial scale (§5.3).
    """
    lo = positive_nearest_rank(x, 0.9) + shift
    hi = positive_nearest_rank(x, 1.0) + shift
    return AdaLogScaleGrid(lo, hi, dense_scale_grid(lo, hi, n_points))


def twin_neg_scale(n_bits: int, shift: float = POST_GELU_SHIFT) -> float:
    """Fixed twin-uniform negative scale ``shift / H`` (§5.2g)."""
    return shift / _levels(n_bits)


def twin_pos_candidates(
    n_bits: int, shift: float = POST_GELU_SHIFT, device: torch.device | str | None = None
) -> Tensor:
    """The 29 evaluated twin-uniform ``s_pos`` candidates ``s_neg * 2^m``, m = -5..23 (§5.2g)."""
    s_neg = twin_neg_scale(n_bits, shift)
    return torch.tensor([s_neg * 2.0**m for m in range(-5, 24)], device=device)
