"""Turn a timm ViT/DeiT/Swin into a fake-quantized model (docs/algorithm.md §2.2), per instance.

No timm class is patched: attention modules get their class swapped to a subclass defined in
``qmodules`` and every Linear/Conv2d is replaced by its quantized stand-in. ``wrap_model`` returns
the calibration plan: the quantized modules in execution order, each with its role.
"""

from __future__ import annotations

from dataclasses import dataclass

from timm.models.swin_transformer import WindowAttention
from timm.models.vision_transformer import Attention
from torch import nn

from adalog.config import AdaLogConfig
from adalog.models.parts import (
    FC2,
    MATMUL_AV,
    MATMUL_QK,
    PATCH_EMBED,
    FamilyParts,
    model_parts,
)
from adalog.models.qmodules import (
    QuantConv2d,
    QuantConvTranspose2d,
    QuantLinear,
    QuantMatMul,
    QuantModule,
    QuantViTAttention,
    QuantWindowAttention,
)
from adalog.quant import GELU_SHIFT, LogQuantizer, TwinUniformQuantizer, UniformQuantizer


@dataclass
class Target:
    """One module to calibrate: its dotted name, the module, its role (the calibration
    procedure: conv, conv_act, linear, linear_ln, linear_gelu, matmul_qk or matmul_av), for
    post-LayerNorm linears that fold (§3) the name of the LayerNorm that receives the scales,
    and its block (the unit progress is saved in)."""

    name: str
    module: QuantModule
    role: str
    norm: str | None = None
    #: the enclosing block (``blocks.3``, ``layers.1.blocks.0``) or the module name
    block: str = ""


def wrap_model(model: nn.Module, config: AdaLogConfig, calibrating: bool = True) -> list[Target]:
    """Insert quantized modules into ``model`` (in place); return the calibration plan.

    ``calibrating=False`` builds the post-calibration structure for loading a checkpoint:
    post-LayerNorm inputs are then already folded and per tensor (§3 step 7).
    """
    parts = model_parts(model)  # refuses unsupported families
    if any(isinstance(m, QuantModule) for m in model.modules()):
        raise ValueError("model is already wrapped")
    quantizers = _QuantizerFactory(config, model)
    for module in model.modules():
        if isinstance(module, (Attention, WindowAttention)):
            _convert_attention(module, quantizers)
    targets: list[Target] = []
    for name, module in list(model.named_modules()):
        if isinstance(module, QuantMatMul):
            role = MATMUL_AV if parts.part_of(name) == MATMUL_AV else MATMUL_QK
            targets.append(Target(name, module, role))
        elif isinstance(module, nn.Linear):
            targets.append(_replace_linear(model, parts, name, module, quantizers, calibrating))
        elif isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
            targets.append(_replace_conv(model, parts, name, module, quantizers))
    for target in targets:
        target.block = parts.block_of(target.name)
    return _execution_order(targets, parts)


class _QuantizerFactory:
    """The activation quantizers of one model, built on its parameters' device and in their
    float dtype (a float64 model calibrates and runs in float64 throughout)."""

    def __init__(self, config: AdaLogConfig, model: nn.Module) -> None:
        self.config = config
        parameter = next(model.parameters(), None)
        self.factory: dict = {}
        if parameter is not None:
            self.factory = {"device": parameter.device, "dtype": parameter.dtype}

    def uniform(self, n_bits: int, shape: tuple[int, ...] = (1,)) -> UniformQuantizer:
        return UniformQuantizer(n_bits, shape, **self.factory)

    def post_softmax(self) -> nn.Module:
        config = self.config
        if config.post_softmax == "uniform":
            return self.uniform(config.s_bits)
        return LogQuantizer(config.s_bits, config.post_softmax, **self.factory)  # s = 1 (§5.3)

    def post_gelu(self) -> nn.Module:
        config = self.config
        if config.post_gelu == "twin":
            return TwinUniformQuantizer(config.a_bits, **self.factory)
        if config.post_gelu == "uniform":
            return self.uniform(config.a_bits)
        shift = GELU_SHIFT if config.bias_reparam else 0.0
        return LogQuantizer(config.a_bits, config.post_gelu, shift=shift, **self.factory)


def _convert_attention(module: nn.Module, quantizers: _QuantizerFactory) -> None:
    heads, a_bits = module.num_heads, quantizers.config.a_bits
    module.matmul1 = QuantMatMul(
        quantizers.uniform(a_bits, (1, heads, 1, 1)), quantizers.uniform(a_bits, (1, heads, 1, 1))
    )
    module.matmul2 = QuantMatMul(
        quantizers.post_softmax(), quantizers.uniform(a_bits, (1, heads, 1, 1))
    )
    module.fused_attn = False
    module.__class__ = (
        QuantWindowAttention if isinstance(module, WindowAttention) else QuantViTAttention
    )


def _replace_linear(
    model: nn.Module,
    parts: FamilyParts,
    name: str,
    linear: nn.Linear,
    quantizers: _QuantizerFactory,
    calibrating: bool,
) -> Target:
    config = quantizers.config
    norm = parts.folding_norm(name)
    if parts.is_head(name):
        quantized = QuantLinear(linear, config.w_bits, quantizers.uniform(config.head_bits))
        target = Target(name, quantized, "linear")
    elif parts.part_of(name) == FC2 and config.post_gelu != "uniform":
        quantized = QuantLinear(linear, config.w_bits, quantizers.post_gelu())
        target = Target(name, quantized, "linear_gelu")
    elif norm is not None and config.folds_layernorm and calibrating:
        per_channel = quantizers.uniform(config.a_bits, (linear.in_features,))
        quantized = QuantLinear(linear, config.w_bits, per_channel)
        target = Target(name, quantized, "linear_ln", norm=norm)
    else:
        quantized = QuantLinear(linear, config.w_bits, quantizers.uniform(config.a_bits))
        target = Target(name, quantized, "linear")
    _set_submodule(model, name, quantized)
    return target


def _replace_conv(
    model: nn.Module,
    parts: FamilyParts,
    name: str,
    conv: nn.Conv2d | nn.ConvTranspose2d,
    quantizers: _QuantizerFactory,
) -> Target:
    """A conv with an FP input (role ``conv``), or, where the family quantizes conv inputs,
    with a per-tensor uniform input quantizer (role ``conv_act``; the image at its own bits)."""
    config = quantizers.config
    input_quant, role = None, "conv"
    if parts.quantized_conv_inputs:
        bits = parts.image_bits if parts.part_of(name) == PATCH_EMBED else config.a_bits
        input_quant, role = quantizers.uniform(bits), "conv_act"
    if isinstance(conv, nn.ConvTranspose2d):
        quantized = QuantConvTranspose2d(conv, config.w_bits, input_quant)
    else:
        quantized = QuantConv2d(conv, config.w_bits, input_quant)
    _set_submodule(model, name, quantized)
    return Target(name, quantized, role)


def _execution_order(targets: list[Target], parts: FamilyParts) -> list[Target]:
    """Sort a block's modules in the order its forward pass runs them (qkv, q·kᵀ, attn·v,
    proj, fc1, fc2); blocks keep ``named_modules`` order."""
    blocks = list(dict.fromkeys(t.block for t in targets))
    rank = {b: i for i, b in enumerate(blocks)}
    return sorted(targets, key=lambda t: (rank[t.block], parts.rank(t.name)))


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, leaf, module)
