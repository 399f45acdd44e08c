"""Reconstruction units (§7.1) and the per-block training state: AdaRound stand-ins for the
weight quantizers, training-mode stand-ins for the activation quantizers, trainable scales."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from adalog.errors import ConfigError
from adalog.models.parts import model_parts
from adalog.models.qmodules import QuantConv2d, QuantLinear, QuantMatMul, QuantModule
from adalog.quant import LogQuantizer, TwinUniformQuantizer, UniformQuantizer
from adalog.recon.adaround import AdaRoundQuantizer
from adalog.recon.ste import TrainingQuantizer


def reconstruction_blocks(model: nn.Module) -> list[str]:
    """Names of the units reconstructed one at a time, in ``named_modules`` order: the
    family's units (patch embedding, every ViT/Swin block, every Swin patch merging) and its
    heads; units without a quantized module are skipped."""
    parts = model_parts(model)
    names = []
    for name, module in model.named_modules():
        is_unit = parts.is_unit(name, module)
        if is_unit and any(isinstance(m, QuantModule) for m in module.modules()):
            names.append(name)
    return names


def ends_in_logits(model: nn.Module, name: str) -> bool:
    """Whether unit ``name`` outputs logits (a head, or a tail unit): trained on their KL."""
    return is_tail(name) or model_parts(model).is_head(name)


TAIL_SUFFIX = "..head"


class TailUnit(nn.Module):
    """The last blocks of a timm ``VisionTransformer`` from ``blocks[start]`` on, its final
    norm and its head as one reconstruction unit mapping that block's input to the logits.

    It holds the model's own modules (training it trains them); the model itself is kept
    unregistered, so ``modules()`` yields only the unit's parts."""

    def __init__(self, model: VisionTransformer, start: int) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*list(model.blocks)[start:])
        self.norm = model.norm
        self.fc_norm = model.fc_norm
        self.head = model.head
        object.__setattr__(self, "vit", model)

    def forward(self, x: Tensor) -> Tensor:
        return self.vit.forward_head(self.norm(self.blocks(x)))


def with_kl_tail(model: nn.Module, names: list[str], blocks: int) -> list[str]:
    """``names`` with the last ``blocks`` transformer blocks and the head merged into one
    unit named ``blocks.<start>..head`` (trained on the logits' KL divergence)."""
    if blocks == 0:
        return names
    if not isinstance(model, VisionTransformer):
        raise ConfigError(
            f"kl_tail needs a timm VisionTransformer (ViT, DeiT), not {type(model).__name__}"
        )
    depth = len(model.blocks)
    if blocks > depth:
        raise ConfigError(f"kl_tail={blocks} exceeds the model's {depth} blocks")
    start = depth - blocks
    merged = {f"blocks.{i}" for i in range(start, depth)} | {"head"}
    return [n for n in names if n not in merged] + [f"blocks.{start}{TAIL_SUFFIX}"]


def is_tail(name: str) -> bool:
    return name.endswith(TAIL_SUFFIX)


def unit_entry(name: str) -> str:
    """The module whose input is the unit's input (the first block of a tail unit)."""
    return name[: -len(TAIL_SUFFIX)] if is_tail(name) else name


def unit_module(model: nn.Module, name: str) -> nn.Module:
    """The module a unit name stands for: a submodule, or a :class:`TailUnit`."""
    if is_tail(name):
        return TailUnit(model, int(unit_entry(name).rsplit(".", 1)[-1]))
    return model.get_submodule(name)


_QUANT_SLOTS = {
    QuantLinear: ("input_quant",),
    QuantConv2d: ("input_quant",),
    QuantMatMul: ("a_quant", "b_quant"),
}


def activation_slots(block: nn.Module) -> list[tuple[nn.Module, str]]:
    """``(module, attribute)`` of every input/operand quantizer of the block's quantized
    modules (not the weights'), skipping absent and identity quantizers."""
    slots = []
    for module in block.modules():
        for attr in _QUANT_SLOTS.get(type(module), ()):
            quant = getattr(module, attr)
            if quant is not None and not getattr(quant, "is_identity", False):
                slots.append((module, attr))
    return slots


def trainable_scales(quant: nn.Module) -> list[Tensor]:
    """The scale buffers §7.4 trains: uniform and log scales (AdaLog, post-Softmax included)
    and the twin quantizer's positive scale; zero points, q, the shift and the twin negative
    scale (tied to the GELU minimum) stay fixed."""
    if isinstance(quant, (UniformQuantizer, LogQuantizer)):
        return [quant.scale]
    if isinstance(quant, TwinUniformQuantizer):
        return [quant.s_pos]
    return []


@dataclass
class BlockTraining:
    """Everything attached to one block while it is reconstructed; :meth:`finish` undoes it
    and leaves the block in plain quant mode with on-grid weights."""

    adarounds: list[tuple[QuantModule, UniformQuantizer, AdaRoundQuantizer]]
    slots: list[tuple[nn.Module, str, nn.Module]]
    scales: list[Tensor]
    floats: list[nn.Parameter]

    @property
    def alphas(self) -> list[Tensor]:
        return [ada.alpha for _, _, ada in self.adarounds]

    def regularizer(self, beta: float) -> Tensor:
        return sum(ada.regularizer(beta) for _, _, ada in self.adarounds)

    def clamp_scales(self, eps: float = 1e-8) -> None:
        with torch.no_grad():
            for scale in self.scales:
                scale.clamp_(min=eps)

    def finish(self) -> None:
        """Hard rounding, weights written on the grid, original quantizers back, eval mode."""
        with torch.no_grad():
            for module, original, ada in self.adarounds:
                ada.soft = False
                module.weight.copy_(ada(module.weight))
                module.weight_quant = original
        for module, attr, quant in self.slots:
            setattr(module, attr, quant)
            quant.eval()
        for tensor in self.scales + self.floats:
            tensor.requires_grad_(False)
            tensor.grad = None


def prepare_block(
    block: nn.Module,
    train_weights: bool,
    train_act: bool,
    drop_prob: float,
    generator: torch.Generator | None,
    train_bias_norm: bool = False,
    share: tuple[int, int, int] | None = None,
) -> BlockTraining:
    """Attach AdaRound (soft) to every weight quantizer and a training-mode stand-in (fused
    STE, AdaLog exact power, optional QDrop; ``share`` as :class:`TrainingQuantizer` takes it)
    to every activation quantizer; mark the scales trainable when ``train_act``, the float
    biases and LayerNorm affines when ``train_bias_norm``."""
    adarounds = []
    if train_weights:
        for module in block.modules():
            if isinstance(module, (QuantLinear, QuantConv2d)):
                original = module.weight_quant
                if original.is_identity:
                    continue
                module.weight_quant = AdaRoundQuantizer(original, module.weight)
                adarounds.append((module, original, module.weight_quant))
    slots, scales = [], []
    for module, attr in activation_slots(block):
        quant = getattr(module, attr)
        setattr(module, attr, TrainingQuantizer(quant, drop_prob, generator, share))
        slots.append((module, attr, quant))
        if train_act:
            scales += trainable_scales(quant)
    floats = bias_and_norm_parameters(block) if train_bias_norm else []
    for tensor in scales + floats:
        tensor.requires_grad_(True)
    return BlockTraining(adarounds, slots, scales, floats)


def bias_and_norm_parameters(block: nn.Module) -> list[nn.Parameter]:
    """The block's quantized-layer biases and LayerNorm weights and biases: parameters that
    stay float in the quantized model (and in the integer export)."""
    params = []
    for module in block.modules():
        if isinstance(module, (QuantLinear, QuantConv2d)) and module.bias is not None:
            params.append(module.bias)
        elif isinstance(module, nn.LayerNorm) and module.elementwise_affine:
            params += [p for p in (module.weight, module.bias) if p is not None]
    return params
