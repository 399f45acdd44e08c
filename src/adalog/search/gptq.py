"""GPTQ-style weight rounding on a fixed per-row grid (an option beyond the reference).

The reference rounds every weight to the nearest level of the per-row grid its search picked.
GPTQ (Frantar et al., 2023) rounds the columns one at a time and spreads each column's rounding
error over the columns not yet rounded, weighted by the inverse of the input Gram matrix
``H = XᵀX``, so that the layer output ``Ŵ X`` rather than each weight stays close. The grid
(scale, zero point per row) is kept: only the choice of level changes, so the result is an
ordinary on-grid weight that every quantizer, export and runtime path already handles.

Pure tensor math: no model or quantizer module knowledge.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["gptq_round", "input_gram"]


def input_gram(x: Tensor, normalize_tokens: bool = True) -> Tensor:
    """``XᵀX`` in float64 of inputs ``(..., I)``, every leading index one token.

    With ``normalize_tokens`` each token is scaled to unit norm first, so that every token's
    relative output error counts alike. ViTs carry a few tokens with activations orders of
    magnitude above the rest; in the plain Gram they dominate, and GPTQ then trades the error
    of all other tokens for theirs (measured on ViT-Tiny fc2: KL to FP 0.99 -> 1.29 plain,
    0.78 normalized; benchmarks/RESULTS.md).
    """
    flat = x.reshape(-1, x.shape[-1]).to(torch.float64)
    if normalize_tokens:
        flat = flat / flat.norm(dim=1, keepdim=True).clamp_min(torch.finfo(flat.dtype).tiny)
    return flat.T @ flat


def gptq_round(
    rows: Tensor,
    gram: Tensor,
    fake_quant: Callable[[Tensor], Tensor],
    damp: float = 0.01,
    act_order: bool = True,
) -> Tensor:
    """Round ``rows`` ``(O, I)`` column by column with GPTQ's error feedback.

    ``gram``: ``XᵀX`` ``(I, I)`` of the layer's inputs. ``fake_quant(column)`` maps one
    column ``(O,)`` onto the fixed per-row grid.
    ``damp`` adds ``damp·mean(diag H)`` to the diagonal (numerical stability); ``act_order``
    rounds the columns with the largest input energy first. Columns whose input is always
    zero contribute nothing to the output and are rounded to nearest.
    Returns the on-grid rows in the dtype of ``rows``.
    """
    n_in = rows.shape[1]
    if gram.shape != (n_in, n_in):
        raise ValueError(f"gram must be ({n_in}, {n_in}), got {tuple(gram.shape)}")
    h = gram.to(torch.float64).clone()
    w = rows.to(torch.float64).clone()
    diag = torch.diagonal(h)
    dead = diag == 0
    diag[dead] = 1.0
    if act_order:
        order = torch.argsort(diag, descending=True, stable=True)
    else:
        order = torch.arange(n_in, device=h.device)
    h = h[order][:, order]
    w = w[:, order]
    torch.diagonal(h).add_(damp * float(torch.diagonal(h).mean()))
    # upper Cholesky factor U of H⁻¹ (H⁻¹ = UᵀU): row j holds the feedback of column j
    upper = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    out = torch.empty_like(w)
    for j in range(n_in):
        column = w[:, j]
        rounded = fake_quant(column.to(rows.dtype)).to(torch.float64)
        out[:, j] = rounded
        error = (column - rounded) / upper[j, j]
        w[:, j + 1 :] -= error[:, None] * upper[j, j + 1 :][None, :]
    result = torch.empty_like(out)
    result[:, order] = out
    return result.to(rows.dtype)
