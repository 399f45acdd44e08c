"""Quantized stand-ins for the layers of timm ViT/DeiT/Swin (docs/algorithm.md §2.2-§2.3).

Each module runs in one of two modes: raw (exactly the FP layer; used while capturing
calibration data) or quant (fake-quantized inputs and weights). Parameters keep the names of the
layers they replace, so the state dict of a wrapped model is the FP state dict plus quantizer
buffers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.models.swin_transformer import WindowAttention
from timm.models.vision_transformer import Attention
from torch import Tensor, nn

from adalog.quant import UniformQuantizer


class QuantModule(nn.Module):
    """Common raw/quant switch."""

    quant_enabled: bool = False

    def set_quant(self, enabled: bool) -> None:
        self.quant_enabled = enabled


class _WeightQuantModule(QuantModule):
    """What the linear and conv stand-ins share: a weight, its quantizer, an optional bias."""

    weight: nn.Parameter
    bias: nn.Parameter | None
    weight_quant: UniformQuantizer
    input_quant: nn.Module | None

    def quantized_weight(self) -> Tensor:
        return self.weight_quant(self.weight)

    def operands(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The input and weight the layer multiplies: FP in raw mode, fake-quantized (the
        input only where it has a quantizer) in quant mode."""
        if not self.quant_enabled:
            return x, self.weight
        if self.input_quant is not None:
            x = self.input_quant(x)
        return x, self.quantized_weight()

    def ensure_bias(self) -> Tensor:
        """Give a bias-free layer (e.g. Swin ``reduction``) a zero bias so folds have a target."""
        if self.bias is None:
            self.bias = nn.Parameter(self.weight.new_zeros(self.weight.shape[0]))
        return self.bias


class QuantLinear(_WeightQuantModule):
    """Linear with a per-output-row uniform weight quantizer and an optional input quantizer."""

    def __init__(self, linear: nn.Linear, w_bits: int, input_quant: nn.Module | None) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.weight_quant = UniformQuantizer(
            w_bits, (self.out_features, 1), device=self.weight.device, dtype=self.weight.dtype
        )
        self.input_quant = input_quant

    def forward(self, x: Tensor) -> Tensor:
        x, weight = self.operands(x)
        return F.linear(x, weight, self.bias)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}"


class QuantConv2d(_WeightQuantModule):
    """Patch-embedding conv: per-output-channel weight quantizer; the image input stays FP
    unless ``input_quant`` is given (§10.1)."""

    def __init__(self, conv: nn.Conv2d, w_bits: int, input_quant: nn.Module | None) -> None:
        super().__init__()
        if conv.padding_mode != "zeros":
            raise NotImplementedError("only zero-padded convolutions can be quantized")
        self.weight = conv.weight
        self.bias = conv.bias
        self.stride, self.padding = conv.stride, conv.padding
        self.dilation, self.groups = conv.dilation, conv.groups
        self.weight_quant = UniformQuantizer(
            w_bits, (conv.out_channels, 1, 1, 1), device=conv.weight.device, dtype=conv.weight.dtype
        )
        self.input_quant = input_quant

    def input_patches(self, x: Tensor) -> Tensor:
        """The receptive fields the weight rows multiply, ``(B·L, C·kh·kw)`` (ungrouped conv):
        the conv as a linear layer, for searches and Gram matrices."""
        kernel = self.weight.shape[-2:]
        patches = F.unfold(x, kernel, self.dilation, self.padding, self.stride)
        return patches.transpose(1, 2).reshape(-1, patches.shape[1])

    def forward(self, x: Tensor) -> Tensor:
        x, weight = self.operands(x)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class QuantConvTranspose2d(_WeightQuantModule):
    """A transposed conv whose kernel equals its stride (Mask R-CNN's 2x mask upsampling): each
    input pixel feeds its own ``kh x kw`` output cell, so the layer is a linear map from
    ``C_in`` to ``C_out·kh·kw`` per pixel, calibrated as one; one weight scale per output
    channel and kernel position, a per-tensor input quantizer."""

    def __init__(
        self, conv: nn.ConvTranspose2d, w_bits: int, input_quant: nn.Module | None
    ) -> None:
        super().__init__()
        if (
            tuple(conv.kernel_size) != tuple(conv.stride)
            or any(conv.padding)
            or any(conv.output_padding)
            or conv.groups != 1
            or any(d != 1 for d in conv.dilation)
        ):
            raise NotImplementedError("only transposed convs with kernel == stride are supported")
        self.weight = conv.weight  # (C_in, C_out, kh, kw)
        self.bias = conv.bias
        self.stride = conv.stride
        c_out, kh, kw = conv.weight.shape[1:]
        self.weight_quant = UniformQuantizer(
            w_bits, (c_out * kh * kw, 1), device=conv.weight.device, dtype=conv.weight.dtype
        )
        self.input_quant = input_quant

    def quantized_weight(self) -> Tensor:
        c_in, c_out, kh, kw = self.weight.shape
        rows = self.weight_quant(self.linear_rows())
        return rows.reshape(c_out, kh, kw, c_in).permute(3, 0, 1, 2)

    def linear_rows(self) -> Tensor:
        """The weight as the rows of the per-pixel linear map, ``(C_out·kh·kw, C_in)``."""
        return self.weight.permute(1, 2, 3, 0).reshape(-1, self.weight.shape[0])

    def linear_outputs(self, y: Tensor) -> Tensor:
        """Outputs ``(B, C_out, H·kh, W·kw)`` as ``(B·H·W, C_out·kh·kw)`` rows, bias removed."""
        batch, channels, height, width = y.shape
        kh, kw = self.weight.shape[2:]
        if self.bias is not None:
            y = y - self.bias[:, None, None]
        y = y.reshape(batch, channels, height // kh, kh, width // kw, kw)
        return y.permute(0, 2, 4, 1, 3, 5).reshape(-1, channels * kh * kw)

    def forward(self, x: Tensor) -> Tensor:
        x, weight = self.operands(x)
        return F.conv_transpose2d(x, weight, self.bias, self.stride)


class QuantMatMul(QuantModule):
    """``a @ b`` with a quantizer per operand (per head for q, kᵀ, v; log for attention)."""

    def __init__(self, a_quant: nn.Module, b_quant: nn.Module) -> None:
        super().__init__()
        self.a_quant = a_quant
        self.b_quant = b_quant

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        if self.quant_enabled:
            a, b = self.a_quant(a), self.b_quant(b)
        return a @ b


class QuantViTAttention(Attention):
    """timm ``Attention`` whose two products go through ``matmul1``/``matmul2`` (§2.2).

    The softmax scale is applied after ``matmul1``, so the quantized A operand is the unscaled q.
    Instances are converted in place (``__class__`` swap) so parameter names are unchanged.
    """

    matmul1: QuantMatMul
    matmul2: QuantMatMul

    def forward(
        self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False
    ) -> Tensor:
        if attn_mask is not None or is_causal:
            raise NotImplementedError("quantized attention does not support attention masks")
        B, N, _ = x.shape
        gate = self.gate(x).sigmoid() if getattr(self, "gate", None) is not None else None
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        attn = self.matmul1(q, k.transpose(-2, -1)) * self.scale
        attn = self.attn_drop(attn.softmax(dim=-1))
        x = self.matmul2(attn, v)
        x = x.transpose(1, 2).reshape(B, N, self.attn_dim)
        x = self.norm(x)
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x))


class QuantWindowAttention(WindowAttention):
    """timm Swin ``WindowAttention`` with ``matmul1``/``matmul2``; q is scaled before matmul1."""

    matmul1: QuantMatMul
    matmul2: QuantMatMul

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        B_, N, _ = x.shape
        qkv = self.qkv(x).reshape(B_, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = self.matmul1(q * self.scale, k.transpose(-2, -1)) + self._get_rel_pos_bias()
        if mask is not None:
            num_win = mask.shape[0]
            attn = attn.view(-1, num_win, self.num_heads, N, N) + mask.unsqueeze(1).unsqueeze(0)
            attn = attn.view(-1, self.num_heads, N, N)
        attn = self.attn_drop(self.softmax(attn))
        x = self.matmul2(attn, v)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(B_, N, -1)))


def set_quant_mode(model: nn.Module, enabled: bool) -> None:
    """Switch every quantized module of ``model`` between raw (FP) and quant mode."""
    for module in model.modules():
        if isinstance(module, QuantModule):
            module.set_quant(enabled)


def snap_weights_to_grid(model: nn.Module) -> nn.Module:
    """Store every quantized weight as its fake-quantized value, computed in its current dtype.

    A quantized model's weights are its integer codes. Re-quantizing the float32 FP weights in
    float64 can round a weight lying within float32 error of a code boundary to the other code:
    another model than the one calibrated and exported. On-grid weights keep their codes in any
    float type. The model's raw mode is no longer the FP model afterwards.
    """
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, _WeightQuantModule):
                if not module.weight_quant.is_identity:
                    module.weight.copy_(module.quantized_weight())
    return model


__all__ = [
    "QuantConv2d",
    "QuantConvTranspose2d",
    "QuantLinear",
    "QuantMatMul",
    "QuantModule",
    "QuantViTAttention",
    "QuantWindowAttention",
    "set_quant_mode",
    "snap_weights_to_grid",
]
