"""Percentiles used by the candidate generators (docs/algorithm.md §5.2, §10 item 11).

Two different percentile definitions are in play, and they must not be mixed up:

* linear-interpolation quantiles (``torch.quantile``) for the uniform grids, with the reference's
  chunk-averaging fallback for reductions over more than 2^24 elements (§5.2c/d);
* a nearest-rank percentile over strictly positive entries for the AdaLog scale range (§5.2e).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

#: Element limit of ``torch.quantile`` in the torch version the reference ran on (1.10). Newer torch
#: has no such limit, so the fallback is emulated explicitly to reproduce the reference's numbers.
QUANTILE_MAX_ELEMENTS = 2**24


def _num_chunks(n: int, max_elements: int) -> int:
    """Smallest power of two 2^m such that every chunk holds at most ``max_elements`` elements."""
    chunks = 1
    while math.ceil(n / chunks) > max_elements:
        chunks *= 2
    return chunks


def _quantile_1d(row: Tensor, q: Tensor, max_elements: int) -> Tensor:
    """Quantiles of a 1-D tensor, averaging per-chunk quantiles when it is too long (§5.2c).

    The reference splits into 2^m equal chunks. When the length is not divisible by 2^m we use
    ``torch.tensor_split``: exactly 2^m chunks whose lengths differ by at most one (the first
    ``n mod 2^m`` are one longer), averaged without weights. For divisible lengths this is
    identical to the reference's equal split.
    """
    n = row.numel()
    if n <= max_elements:
        return torch.quantile(row, q)
    chunks = torch.tensor_split(row, _num_chunks(n, max_elements))
    return torch.stack([torch.quantile(chunk, q) for chunk in chunks]).mean(dim=0)


def linear_quantile(
    x: Tensor,
    qs: Sequence[float] | Tensor,
    dim: int | None = None,
    max_elements: int = QUANTILE_MAX_ELEMENTS,
) -> Tensor:
    """``torch.quantile`` (linear interpolation) with the reference's >2^24 fallback.

    Args:
        x: floating-point input.
        qs: quantile levels in [0, 1].
        dim: reduction dimension, or ``None`` to reduce over all elements.
        max_elements: longest 1-D reduction done in one piece; longer ones are chunk-averaged
            (§5.2c, §10 item 11). Lower it in tests to exercise the fallback.

    Returns:
        ``(len(qs),)`` for ``dim=None``, else ``(len(qs), *x.shape without dim)`` -- the layout of
        ``torch.quantile(..., keepdim=False)``.

    With ``dim`` given, each slice along ``dim`` is its own 1-D reduction (a head, a channel or a
    weight row), and the fallback applies per slice when that slice is longer than
    ``max_elements``. Slices below the limit are exact whatever the total size.
    """
    q = torch.as_tensor(qs, dtype=x.dtype, device=x.device).reshape(-1)
    if dim is None:
        return _quantile_1d(x.reshape(-1), q, max_elements)
    moved = x.movedim(dim, -1)
    rows = moved.reshape(-1, moved.shape[-1])
    if rows.shape[1] <= max_elements:
        out = torch.quantile(rows, q, dim=1)
    else:
        out = torch.stack([_quantile_1d(row, q, max_elements) for row in rows], dim=1)
    return out.reshape(q.numel(), *moved.shape[:-1])


def positive_nearest_rank(x: Tensor, p: float) -> Tensor:
    """Nearest-rank percentile over the strictly positive entries of ``x`` (§5.2e).

    Returns the ``ceil(p * count)``-th smallest positive value (0-d tensor), i.e. element
    ``ceil(p * count) - 1`` of the sorted positives; ``p = 1`` gives the largest positive value.
    ``p * count`` is evaluated in float64, like the reference's Python arithmetic.
    ``torch.kthvalue`` picks the same element as a full sort without materialising it.
    """
    if not 0.0 < p <= 1.0:
        raise ValueError(f"percentile level must be in (0, 1], got {p}")
    positives = x[x > 0]
    count = positives.numel()
    if count == 0:
        raise ValueError("positive_nearest_rank needs at least one strictly positive entry")
    rank = min(max(math.ceil(p * count), 1), count)
    return torch.kthvalue(positives, rank).values
