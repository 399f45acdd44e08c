"""Logarithmic fake quantizers: Log2 (§1.4), Log-√2 (§1.5) and AdaLog (§1.6), with shift (§1.7).

All three share the quantize side: ``u = clamp(x/s, 1e-15, 1)``, a code ``k = round(-log2(u)·m)``
with ``m = 1, 2, r/q``, a flag ``valid = k < N`` taken before clamping, and ``k`` clamped to
``[0, N-1]``. The flag gives the implicit extra zero state (§10 item 4): invalid elements
dequantize to exactly 0, so the output set has N+1 values.

AdaLog uses base ``β = 2^(q/r)`` with ``r = 37`` and an integer ``q``. Its eval ("table") form
multiplies ``s`` by per-code levels ``2^(-T1[k])·T2[k]`` whose fractional part is rounded to a
multiple of 1/D; its training ("exact") form uses ``2^(-k·q/r)`` (§10 item 5). Searches should
precompute :func:`adalog_levels` once per set of candidate q values and gather with
:func:`adalog_dequant_table`.

Every function broadcasts, so parameters with a leading candidate dimension K evaluate K
candidates at once. Candidate-batched q values must vary along the leading dimension only; their
levels have shape ``(K, N)`` and are gathered against codes of shape ``(K, ...)``.
"""

from __future__ import annotations

import math
from functools import cache

import torch
from torch import Tensor

from adalog.quant.uniform import clamp_ste, round_ste

__all__ = [
    "ADALOG_R",
    "GELU_SHIFT",
    "LOG_KINDS",
    "Q_INIT",
    "Q_MIN",
    "adalog_denominator",
    "adalog_dequant_exact",
    "adalog_dequant_table",
    "adalog_levels",
    "adalog_lut_numerators",
    "adalog_q_candidates",
    "adalog_tables",
    "log2_dequant",
    "log_codes",
    "log_dequant",
    "log_fake_quant",
    "logsqrt2_dequant",
    "tables_to_levels",
]

ADALOG_R = 37
"""Fixed denominator r of the AdaLog base exponent, ``β = 2^(q/r)`` (§1.6)."""
Q_INIT = 37
"""Initial AdaLog q (β = 2, i.e. Log2) (§5.3)."""
Q_MIN = 10
"""Smallest searched AdaLog q; the search range is ``Q_MIN .. Q_MIN + eq_n - 1`` (§5.2f)."""
GELU_SHIFT = 0.16997124254703522
"""Hard-coded post-GELU shift, about ``-min GELU(x)`` (§1.7, §4)."""
LOG_KINDS = ("log2", "logsqrt2", "adalog")
_FORMS = ("table", "exact")
_U_MIN = 1e-15  # floor of x/s; zeros and negatives land here (§10 item 26)
_SQRT2 = math.sqrt(2.0)


def adalog_q_candidates(eq_n: int = 128, device: torch.device | str | None = None) -> Tensor:
    """The searched q values ``Q_MIN .. Q_MIN + eq_n - 1`` (10..137 for eq_n = 128, §5.2f)."""
    return torch.arange(Q_MIN, Q_MIN + eq_n, dtype=torch.int64, device=device)


def adalog_denominator(n_bits: int) -> int:
    """Fixed-point denominator ``D = 4H - 2 = 2^(b+1) - 2`` of the T2 table (§1.6)."""
    return 2 ** (n_bits + 1) - 2


@cache
def _fraction_numerators(n_bits: int, r: int) -> Tensor:
    """``round(2^(-j/r)·D)`` for j = 0..r-1, in float64 then exact integers (CPU, cached)."""
    d = adalog_denominator(n_bits)
    numerators = [round(2.0 ** (-j / r) * d) for j in range(r)]
    return torch.tensor(numerators, dtype=torch.int64, device="cpu")


def _code_times_q(q: int | Tensor, n_bits: int) -> Tensor:
    """``i·q`` for every code i = 0..N-1, shape ``q.shape + (N,)``, on q's device (a Python
    int: the CPU)."""
    q = torch.as_tensor(q, dtype=torch.int64, device=q.device if isinstance(q, Tensor) else "cpu")
    return q.unsqueeze(-1) * torch.arange(2**n_bits, dtype=torch.int64, device=q.device)


def adalog_lut_numerators(q: int | Tensor, n_bits: int, r: int = ADALOG_R) -> Tensor:
    """Integer numerators ``D·T2[i] = round(2^(-((i·q) mod r)/r)·D)`` (int64, §1.6)."""
    iq = _code_times_q(q, n_bits)
    return _fraction_numerators(n_bits, r).to(iq.device)[iq % r]


def adalog_tables(
    q: int | Tensor, n_bits: int, r: int = ADALOG_R, dtype: torch.dtype = torch.float32
) -> tuple[Tensor, Tensor]:
    """AdaLog dequantization tables (§1.6).

    Returns ``T1[i] = floor(i·q/r)`` (int64, the bit shift) and ``T2[i]`` (the fraction in
    [0.5, 1] rounded to a multiple of 1/D, then to ``dtype``: D = 2^(b+1) - 2 is not a power of
    two, so a float64 T2 is not the float32 one widened), each of shape ``q.shape + (N,)``.
    """
    iq = _code_times_q(q, n_bits)
    t1 = torch.div(iq, r, rounding_mode="floor")
    t2 = adalog_lut_numerators(q, n_bits, r).to(dtype) / adalog_denominator(n_bits)
    return t1, t2


def tables_to_levels(t1: Tensor, t2: Tensor) -> Tensor:
    """Per-code multipliers ``2^(-T1)·T2`` in T2's dtype (the table-form value is ``s`` times
    these)."""
    return t2 * torch.exp2(-t1.to(t2.dtype))


def adalog_levels(
    q: int | Tensor, n_bits: int, r: int = ADALOG_R, dtype: torch.dtype = torch.float32
) -> Tensor:
    """Per-code multipliers ``2^(-T1[i])·T2[i]`` of shape ``q.shape + (N,)`` in ``dtype``.

    This is what calibration searches gather from (§1.6, §5.5, §5.6).
    """
    return tables_to_levels(*adalog_tables(q, n_bits, r, dtype))


def _check_kind(kind: str) -> None:
    if kind not in LOG_KINDS:
        raise ValueError(f"log quantizer kind must be one of {LOG_KINDS}, got {kind!r}")


def _check_form(form: str) -> None:
    if form not in _FORMS:
        raise ValueError(f"dequantization form must be one of {_FORMS}, got {form!r}")


def _require_q(q: int | Tensor | None) -> int | Tensor:
    if q is None:
        raise ValueError("kind='adalog' needs the base parameter q")
    return q


def log_codes(
    x: Tensor,
    scale: Tensor | float,
    n_bits: int,
    kind: str,
    q: int | Tensor | None = None,
    ste: bool = False,
) -> tuple[Tensor, Tensor]:
    """Log-domain codes and the valid flag (§1.4-§1.6).

    Returns float codes with integer values in ``[0, N-1]`` and a bool ``valid = k < N`` taken
    before clamping. For AdaLog the exponent is ``-log2(u)·r/q`` evaluated in float32 in that
    order (multiply by r, then divide by q), as in the reference. With ``ste`` (training mode)
    the log-domain rounding is a straight-through round and both clamps pass the gradient on
    their closed ranges, so for non-saturated elements the scale gradient cancels and only
    elements with ``x > s`` push ``s`` (§10 item 20).
    """
    _check_kind(kind)
    n_levels = 2**n_bits
    clamp = clamp_ste if ste else torch.clamp
    e = -torch.log2(clamp(x / scale, _U_MIN, 1.0))
    if kind == "logsqrt2":
        e = e * 2
    elif kind == "adalog":
        e = e * ADALOG_R / _require_q(q)
    k = round_ste(e) if ste else torch.round(e)
    valid = k.detach() < n_levels
    return clamp(k, 0, n_levels - 1), valid


def _mask(valid: Tensor, value: Tensor) -> Tensor:
    return torch.where(valid, value, 0.0)


def log2_dequant(codes: Tensor, valid: Tensor, scale: Tensor | float) -> Tensor:
    """Log2 value ``valid·s·2^(-k)`` (§1.4)."""
    return _mask(valid, scale * torch.exp2(-codes))


def logsqrt2_dequant(
    codes: Tensor, valid: Tensor, scale: Tensor | float, form: str = "table"
) -> Tensor:
    """Log-√2 value ``valid·s·2^(-k/2)`` (§1.5).

    ``form="table"`` is the RepQ-ViT eval form ``2^(-ceil(k/2))·(√2 if k odd else 1)·s``;
    ``form="exact"`` is the training form ``s·2^(-k/2)``. They agree to float rounding.
    """
    _check_form(form)
    if form == "exact":
        return _mask(valid, scale * torch.exp2(-codes / 2))
    odd = torch.remainder(codes, 2) == 1
    mult = torch.ones_like(codes).masked_fill_(odd, _SQRT2)  # √2 rounded in the codes' dtype
    return _mask(valid, torch.exp2(-torch.ceil(codes / 2)) * mult * scale)


def adalog_dequant_exact(
    codes: Tensor, valid: Tensor, scale: Tensor | float, q: int | Tensor
) -> Tensor:
    """AdaLog training-mode value ``valid·s·2^(-k·q/r)`` (§1.6, §10 item 5)."""
    return _mask(valid, scale * torch.exp2(-(codes * q) / ADALOG_R))


def _gather_levels(levels: Tensor, codes: Tensor) -> Tensor:
    idx = codes.long()
    if levels.dim() == 1:
        return levels[idx]
    n_cand, n_levels = levels.shape
    offsets = torch.arange(n_cand, device=idx.device) * n_levels
    return levels.reshape(-1)[offsets.view(n_cand, *([1] * (idx.dim() - 1))) + idx]


def adalog_dequant_table(
    codes: Tensor, valid: Tensor, scale: Tensor | float, levels: Tensor
) -> Tensor:
    """AdaLog eval-mode value ``valid·s·2^(-T1[k])·T2[k]`` as a single gather (§1.6).

    ``levels`` comes from :func:`adalog_levels`: shape ``(N,)`` for one q, or ``(K, N)`` for K
    candidate q values, in which case ``codes`` has shape ``(K, ...)`` (or ``(1, ...)``).
    """
    return _mask(valid, scale * _gather_levels(levels, codes))


def _levels_for(q: int | Tensor, n_bits: int, like: Tensor) -> Tensor:
    """Levels (in ``like``'s dtype) for a scalar q or for candidates varying along the leading
    dimension."""
    q = torch.as_tensor(q, dtype=torch.int64, device=like.device)
    if q.numel() == 1:
        return adalog_levels(q.reshape(()), n_bits, dtype=like.dtype)
    if q.shape[0] != q.numel():
        raise ValueError(
            f"candidate q values must vary along the leading dimension only, got {tuple(q.shape)}"
        )
    return adalog_levels(q.reshape(-1), n_bits, dtype=like.dtype)


def log_dequant(
    codes: Tensor,
    valid: Tensor,
    scale: Tensor | float,
    n_bits: int,
    kind: str,
    q: int | Tensor | None = None,
    form: str = "table",
    levels: Tensor | None = None,
) -> Tensor:
    """Dequantize log codes of any kind; ``levels`` optionally supplies precomputed AdaLog levels.

    For Log2 both forms are identical. For AdaLog ``form="table"`` is the eval/search form and
    ``form="exact"`` the training form.
    """
    _check_kind(kind)
    _check_form(form)
    if kind == "log2":
        return log2_dequant(codes, valid, scale)
    if kind == "logsqrt2":
        return logsqrt2_dequant(codes, valid, scale, form)
    if form == "exact":
        return adalog_dequant_exact(codes, valid, scale, _require_q(q))
    if levels is None:
        levels = _levels_for(_require_q(q), n_bits, codes)
    return adalog_dequant_table(codes, valid, scale, levels)


def _is_zero(shift: Tensor | float) -> bool:
    return not isinstance(shift, Tensor) and shift == 0


def log_fake_quant(
    x: Tensor,
    scale: Tensor | float,
    n_bits: int,
    kind: str,
    q: int | Tensor | None = None,
    form: str = "table",
    shift: Tensor | float = 0.0,
    shift_folded: Tensor | bool = False,
    ste: bool = False,
    levels: Tensor | None = None,
) -> Tensor:
    """Log fake quantization with the post-GELU shift (§1.7).

    Computes ``y = Q(x + shift)`` and returns ``y - shift`` unless the shift has been folded into
    the next layer's bias (§4), in which case ``y`` is returned. ``ste=True`` (training mode)
    needs ``form="exact"``, because the table gather has no gradient with respect to the code.
    """
    if ste and form != "exact":
        raise ValueError("straight-through (training) mode needs form='exact'")
    if not _is_zero(shift):
        x = x + shift
    codes, valid = log_codes(x, scale, n_bits, kind, q, ste)
    y = log_dequant(codes, valid, scale, n_bits, kind, q, form, levels)
    if _is_zero(shift):
        return y
    if isinstance(shift_folded, Tensor):
        return y - shift * (~shift_folded).to(y.dtype)
    return y if shift_folded else y - shift
