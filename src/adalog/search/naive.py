"""Straightforward scorers: recompute the layer output for every candidate, as the reference does.

These are the ``search_engine="naive"`` counterparts of the fast callbacks in
:mod:`adalog.search.objectives` and :mod:`adalog.search.procedures`. They use the same
fake-quantization functions as the model's forward pass, one candidate at a time, in the
inputs' float dtype, and return the plain squared output error (no dropped constants). They
exist to check the fast engine (it must select the same parameters) and to measure its speed-up;
they are far too slow for real calibrations.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from adalog.quant import asym_fake_quant, log_fake_quant


def _stack(n: int, fn: Callable[[int], Tensor]) -> Tensor:
    return torch.stack([fn(k) for k in range(n)])


def weight_output_error(
    x_hat: Tensor, target: Tensor, rows: Tensor, n_bits: int
) -> Callable[[Tensor, Tensor], Tensor]:
    """Per-output-row error of ``x_hat @ Ŵᵀ`` against ``target`` for candidates ``(K, O)``."""

    def one(scales: Tensor, zps: Tensor) -> Tensor:
        w_hat = asym_fake_quant(rows, scales[:, None], zps[:, None], n_bits)
        return (x_hat @ w_hat.T - target).square().sum(0)

    return lambda scales, zps: _stack(scales.shape[0], lambda k: one(scales[k], zps[k]))


def input_output_error(
    x: Tensor,
    target: Tensor,
    w_hat: Tensor,
    fake_quant: Callable[[Tensor, int], Tensor],
    n: int,
    token_weights: Tensor | None = None,
) -> Tensor:
    """Per-tensor error of ``fake_quant(x, k) @ Ŵᵀ`` for candidates ``k < n`` (each token's
    squared error times ``token_weights`` when given)."""
    weights = 1.0 if token_weights is None else token_weights[:, None]
    return _stack(n, lambda k: ((fake_quant(x, k) @ w_hat.T - target).square() * weights).sum())


def uniform_input_error(
    x: Tensor, target: Tensor, w_hat: Tensor, n_bits: int
) -> Callable[[Tensor, Tensor], Tensor]:
    """Per-tensor uniform input candidates ``(K, 1)`` scored on the layer output."""

    def score(scales: Tensor, zps: Tensor) -> Tensor:
        def fake_quant(inp: Tensor, k: int) -> Tensor:
            return asym_fake_quant(inp, scales[k], zps[k], n_bits)

        return input_output_error(x, target, w_hat, fake_quant, scales.shape[0])[:, None]

    return score


class LogInputScorer:
    """Post-GELU log-quantized fc2 input, scored on the layer output (same interface as the
    fast scorer in :mod:`adalog.search.procedures`)."""

    def __init__(
        self,
        x: Tensor,
        target: Tensor,
        w_hat: Tensor,
        n_bits: int,
        shift: float,
        token_weights: Tensor | None = None,
    ):
        self.x, self.target, self.w_hat = x, target, w_hat
        self.n_bits, self.shift = n_bits, shift
        self.token_weights = token_weights

    def _error(self, scales: Tensor, kind: str, qs: Tensor | None) -> Tensor:
        def fake_quant(inp: Tensor, k: int) -> Tensor:
            q = None if qs is None else int(qs[k])
            return log_fake_quant(inp, scales[k], self.n_bits, kind, q, shift=self.shift)

        n = scales.shape[0]
        weights = self.token_weights
        return input_output_error(self.x, self.target, self.w_hat, fake_quant, n, weights)

    def adalog(self, scales: Tensor, qs: Tensor) -> Tensor:
        return self._error(scales, "adalog", qs)

    def fixed(self, scales: Tensor, kind: str) -> Tensor:
        return self._error(scales, kind, None)


def _per_head(out: Tensor, target: Tensor) -> Tensor:
    return (out - target).square().sum((0, 2, 3))


def _head_params(scales: Tensor, zps: Tensor) -> tuple[Tensor, Tensor]:
    return scales.reshape(1, -1, 1, 1), zps.reshape(1, -1, 1, 1)


def operand_a_error(
    a: Tensor, b_hat: Tensor, target: Tensor, n_bits: int
) -> Callable[[Tensor, Tensor], Tensor]:
    """Per-head error of ``Q(a) @ b_hat`` for per-head candidates ``(K, H)``."""

    def one(k: int, scales: Tensor, zps: Tensor) -> Tensor:
        s, z = _head_params(scales[k], zps[k])
        return _per_head(asym_fake_quant(a, s, z, n_bits) @ b_hat, target)

    return lambda scales, zps: _stack(scales.shape[0], lambda k: one(k, scales, zps))


def operand_b_error(
    a_hat: Tensor, b: Tensor, target: Tensor, n_bits: int
) -> Callable[[Tensor, Tensor], Tensor]:
    """Per-head error of ``a_hat @ Q(b)`` for per-head candidates ``(K, H)``."""

    def one(k: int, scales: Tensor, zps: Tensor) -> Tensor:
        s, z = _head_params(scales[k], zps[k])
        return _per_head(a_hat @ asym_fake_quant(b, s, z, n_bits), target)

    return lambda scales, zps: _stack(scales.shape[0], lambda k: one(k, scales, zps))


def post_softmax_base_error(
    attn: Tensor, v_hat: Tensor, target: Tensor, n_bits: int
) -> Callable[[Tensor], Tensor]:
    """Error of ``AdaLog_q(attn; scale 1) @ v_hat`` for every candidate base exponent q."""

    def one(q: int) -> Tensor:
        return (log_fake_quant(attn, 1.0, n_bits, "adalog", q) @ v_hat - target).square().sum()

    return lambda qs: torch.stack([one(int(q)) for q in qs])
