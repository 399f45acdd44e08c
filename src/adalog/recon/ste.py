"""Fused training-mode (straight-through) activation quantizers for reconstruction.

Composing the STE quantizers of :mod:`adalog.quant` op by op records a dozen autograd nodes per
activation tensor, several of them ``torch.where`` (an order of magnitude slower than a multiply
on CPU). Here each quantizer's forward runs without autograd and its closed-form gradients are
saved directly. The values and gradients are those of the composed STE (§0.2, §10.20):

* uniform (§1.2, LSQ without gradient scaling): ``dy/dx = 1[inside]``,
  ``dy/ds = (c − z) − 1[inside]·x/s``;
* log kinds (§1.4-§1.6, exact power): ``dy/dx = 1[inside]·y/x``, ``dy/ds = 1[x > s]·y/s``
  (the scale gradient cancels for unsaturated elements), ``x`` after the shift.

QDrop (``keep_fp`` mask ``m``) is fused too: ``out = lerp(y, x, m)``, exactly ``x`` or ``y``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from adalog.quant import ADALOG_R, LogQuantizer, UniformQuantizer

_U_MIN = 1e-15  # the log quantizers' floor of x/s (§1.4)
Kernel = Callable[[Tensor, Tensor, bool], tuple[Tensor, Tensor, Tensor | None]]


class _FusedSTE(torch.autograd.Function):
    """Runs ``kernel(x, scale, need_scale_grad) -> (y, dy/dx, dy/ds)`` and replays its saved
    elementwise derivatives in backward."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: Tensor, kernel: Kernel, keep_fp: Tensor | None):
        y, dx, ds = kernel(x, scale, ctx.needs_input_grad[1])
        if keep_fp is not None:
            y.lerp_(x, keep_fp)  # exact at both ends: x where kept, y elsewhere
            quantized = 1 - keep_fp
            dx.mul_(quantized).add_(keep_fp)
            if ds is not None:
                ds.mul_(quantized)
        ctx.save_for_backward(dx, ds)
        ctx.scale_shape = scale.shape
        return y

    @staticmethod
    def backward(ctx, grad: Tensor):
        dx, ds = ctx.saved_tensors
        grad_scale = None
        if ds is not None:
            grad_scale = _sum_to(grad * ds, ctx.scale_shape)
        return grad * dx, grad_scale, None, None


def _sum_to(t: Tensor, shape: torch.Size) -> Tensor:
    if t.dim() == 0 or len(shape) == 0 or shape.numel() == 1:
        return t.sum().reshape(shape)
    return t.sum_to_size(shape)


def uniform_kernel(zero_point: Tensor, n_bits: int) -> Kernel:
    """Asymmetric uniform fake quantization and its STE derivatives."""
    top = 2**n_bits - 1

    def kernel(x: Tensor, scale: Tensor, scale_grad: bool):
        zp = torch.round(zero_point)
        ratio = x / scale
        codes = torch.round(ratio) + zp
        inside = ((codes >= 0) & (codes <= top)).to(x.dtype)
        level = codes.clamp_(0, top).sub_(zp)
        y = level * scale
        ds = level.sub_(inside * ratio) if scale_grad else None
        return y, inside, ds

    return kernel


def log_kernel(quant: LogQuantizer) -> Kernel:
    """Log2 / log-√2 / AdaLog fake quantization (exact power, shift) and its STE derivatives."""
    n_levels = 2**quant.n_bits
    shift, folded = float(quant.shift), bool(quant.shift_folded)
    q = quant.q if quant.kind == "adalog" else None

    def kernel(x: Tensor, scale: Tensor, scale_grad: bool):
        # In place wherever possible: every temporary is as large as the activation.
        ratio = (x + shift).div_(scale) if shift != 0.0 else x / scale
        inside = ((ratio >= _U_MIN) & (ratio <= 1.0)).to(x.dtype)
        e = ratio.clamp(_U_MIN, 1.0).log2_().neg_()
        if quant.kind == "logsqrt2":
            e.mul_(2)
        elif quant.kind == "adalog":
            e.mul_(ADALOG_R).div_(q)
        codes = e.round_()
        valid = codes < n_levels
        level = _exact_power_(codes.clamp_(0, n_levels - 1), quant.kind, q).mul_(valid)
        y = scale * level
        if shift != 0.0 and not folded:
            y.sub_(shift)
        ds = (1 - inside).mul_(level) if scale_grad else None
        dx = inside.mul_(level).div_(ratio.clamp_(min=1e-30))
        return y, dx, ds

    return kernel


def _exact_power_(codes: Tensor, kind: str, q: Tensor | None) -> Tensor:
    """The training-form level of each code (§1.4-§1.6, §10.5), computed in place with the
    operation order of :func:`adalog.quant.log.log_dequant` (``form="exact"``)."""
    if kind == "log2":
        return codes.neg_().exp2_()
    if kind == "logsqrt2":
        return codes.neg_().div_(2).exp2_()
    return codes.mul_(q).neg_().div_(ADALOG_R).exp2_()


class TrainingQuantizer(nn.Module):
    """Stand-in for an activation quantizer while its block is reconstructed: fused STE
    forward/backward for uniform and log quantizers (other kinds run their own training mode)
    and QDrop, which keeps each element unquantized with probability ``drop_prob``.

    ``share`` = (rank, world_size, batch) when the block sees only one rank's share of each
    batch (every world_size-th image of ``batch``): the QDrop mask is drawn for the whole batch
    and this rank's images kept, so the ranks together use one process's masks."""

    def __init__(
        self,
        quant: nn.Module,
        drop_prob: float = 0.0,
        generator: torch.Generator | None = None,
        share: tuple[int, int, int] | None = None,
    ) -> None:
        super().__init__()
        self.quant = quant
        self.drop_prob = drop_prob
        self.generator = generator
        self.share = share
        self.kernel: Kernel | None = None
        if isinstance(quant, UniformQuantizer):
            self.kernel = uniform_kernel(quant.zero_point, quant.n_bits)
        elif isinstance(quant, LogQuantizer):
            self.kernel = log_kernel(quant)
        else:
            quant.train()

    def _keep_fp(self, x: Tensor) -> Tensor | None:
        if self.drop_prob <= 0:
            return None
        if self.share is None:
            rand = torch.rand(x.shape, generator=self.generator, device=x.device, dtype=x.dtype)
        else:  # dim 0 is image-major (images, or windows of each image in turn)
            rank, world, batch = self.share
            per_image = x.shape[0] // len(range(rank, batch, world))
            whole = (batch, per_image, *x.shape[1:])
            rand = torch.rand(whole, generator=self.generator, device=x.device, dtype=x.dtype)
            rand = rand[rank::world].reshape(x.shape)
        return (rand < self.drop_prob).to(x.dtype)

    def forward(self, x: Tensor) -> Tensor:
        keep_fp = self._keep_fp(x)
        if self.kernel is not None:
            return _FusedSTE.apply(x, self.quant.scale, self.kernel, keep_fp)
        y = self.quant(x)
        return y if keep_fp is None else torch.lerp(y, x, keep_fp)
