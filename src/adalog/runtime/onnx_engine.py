"""ONNX engine: a fast-engine ViT written out as an ONNX graph and run by ONNX Runtime.

The graph is built node by node from the fused model of the ``fast`` engine
(:func:`adalog.runtime.fast.fuse_model`), one ONNX pattern per fast module, so it computes what
that engine computes with the same folded constants:

* int8 linears (qkv, proj, fc1, head): ``MatMulIntegerToFloat`` (ONNX Runtime's contrib op:
  uint8 activation codes with their zero point x int8 weight codes ``[K, O]``, int32
  accumulation, ``s_a·s_w[o]`` and the bias applied to the result); 8-bit weights keep their
  per-row zero point as the op's per-column ``b_zero_point``. A float input is coded by
  ``QuantizeLinear`` (round half to even, ``+z``, saturate; then clipped to the code range
  below 8 bits); a LayerNorm that feeds such a linear emits its codes directly, with ``1/s``
  and ``z`` folded into its affine parameters (:class:`~adalog.runtime.fast.LayerNormToCodes`).
* attention (:class:`~adalog.runtime.fast.FastViTAttention`): qkv's output, already in units
  of the q/k/v scales, is rounded and clamped to centred codes; ``q·kᵀ`` runs as a float
  ``MatMul`` of those integer-valued tensors, which is exact in float32 (``|Σ| <= d·2^14 <
  2^24`` for a head dimension below 1024); the post-Softmax log code comes from
  ``LogSoftmax``; ``GatherElements`` reads the levels' LUT (ONNX Runtime's ``Gather`` copies
  element by element, ~13x slower) and a float ``MatMul`` with ``v̂`` gives proj's codes after
  ``+z``, round and clamp. With a uniform post-Softmax quantizer (not fused by the fast
  engine) both matmuls run on centred codes as integer-valued float ``MatMul``s, exact while
  ``K·2^(bits_a + bits_b) < 2^24`` (checked).
* log-coded fc2 input: ``Log`` (natural, scaled to log2), round, clamp, ``GatherElements`` of
  the float32 LUT levels, a float ``MatMul`` with ``s·ŵ`` (the post-GELU shift in the bias).
* float, as in the method: patch-embedding conv of the image with integer-valued weights and
  ``s_w[o]`` after it, LayerNorm, GELU, Softmax, residual adds.

Every weight is stored as integer codes: int8 operands of ``MatMulIntegerToFloat``, and for the
fc2 LUT product and the patch conv, int8 (int16) codes cast to float by constant ops that ONNX
Runtime folds once when the session starts. Not ``DequantizeLinear``: ONNX Runtime rewrites
``DequantizeLinear`` + ``MatMul`` into ``MatMulNBits``, which computes another product.

An FP32 timm ViT/DeiT becomes the same graph with float ``MatMul`` linears and the plain
attention, which is the FP32 baseline *in the same engine* (issue 7).

Agreement: every integer sum is exact, as in the fast engine; the float steps differ by
rounding (``ln`` scaled instead of ``log2``, ONNX Runtime's own kernels and fusions), so logits
agree with the fast engine to float32 rounding (tested < 1e-5 relative, same argmax on random
models), with the chaotic amplification of a 4-bit model described in
:mod:`adalog.runtime.integer`.

Scope: timm ``VisionTransformer`` with a class token, no register tokens, ``global_pool="token"``
and plain ``Block``s (ViT, DeiT). Everything else (Swin, a twin-uniform fc2 input, a log
post-Softmax quantizer the fast engine does not fuse) is refused with
:class:`~adalog.errors.ArtifactError`. Needs the ``onnx`` and ``onnxruntime`` packages.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from timm.layers import LayerNorm as TimmLayerNorm
from timm.layers import Mlp
from timm.models.vision_transformer import Attention, Block, VisionTransformer
from torch import Tensor, nn

from adalog.errors import AdalogError, ArtifactError
from adalog.models.qmodules import QuantViTAttention
from adalog.quant.log import _U_MIN
from adalog.runtime.builder import load_integer_model
from adalog.runtime.fast import (
    _LOG2_U_MIN,
    FastLinear,
    FastMatMul,
    FastViTAttention,
    LayerNormToCodes,
    _code_per_log2,
)
from adalog.runtime.integer import IntConv2d

__all__ = ["OrtModel", "build_onnx_graph", "load_onnx_model", "onnx_model"]

OPSET = 17
_MS = "com.microsoft"
#: LayerNorm classes whose forward is plain ``F.layer_norm`` (torch's, timm's)
_LAYER_NORM_FORWARDS = (nn.LayerNorm.forward, TimmLayerNorm.forward)


def _onnx():
    try:
        import onnx
    except ImportError as exc:  # pragma: no cover - onnx is a declared dependency
        raise AdalogError("the onnx engine needs the 'onnx' package (pip install onnx)") from exc
    return onnx


def _float() -> int:
    return _onnx().TensorProto.FLOAT


class GraphBuilder:
    """Collects ONNX nodes and initializers, naming each output after a hint."""

    def __init__(self) -> None:
        self.onnx = _onnx()
        self.nodes: list[Any] = []
        self.initializers: list[Any] = []
        self._count = 0

    def _name(self, hint: str) -> str:
        self._count += 1
        return f"{hint}_{self._count}"

    def const(self, value: Tensor | np.ndarray | float | int, hint: str) -> str:
        """An initializer holding ``value`` in its own dtype (float64 becomes float32)."""
        if isinstance(value, Tensor):
            value = value.detach().cpu().numpy()
        array = np.asarray(value)
        if array.dtype == np.float64:
            array = array.astype(np.float32)
        name = self._name(hint)
        self.initializers.append(self.onnx.numpy_helper.from_array(array, name))
        return name

    def op(self, op_type: str, *inputs: str, hint: str | None = None, domain: str = "", **attrs):
        """Append a node; ``""`` inputs are omitted optional inputs. Returns its output name."""
        out = self._name(hint or op_type.lower())
        node = self.onnx.helper.make_node(op_type, list(inputs), [out], domain=domain, **attrs)
        self.nodes.append(node)
        return out

    def split3(self, x: str, size: int) -> tuple[str, str, str]:
        """Three equal slices of the last axis (q, k, v)."""
        sizes = self.const(np.array([size] * 3, np.int64), "split")
        names = [self._name("split") for _ in range(3)]
        self.nodes.append(self.onnx.helper.make_node("Split", [x, sizes], names, axis=-1))
        return names[0], names[1], names[2]

    def model(self, image: str, logits: str, image_size: tuple[int, int], classes: int):
        helper, tp = self.onnx.helper, self.onnx.TensorProto
        graph = helper.make_graph(
            self.nodes,
            "adalog",
            [helper.make_tensor_value_info(image, tp.FLOAT, ["batch", 3, *image_size])],
            [helper.make_tensor_value_info(logits, tp.FLOAT, ["batch", classes])],
            self.initializers,
        )
        opsets = [helper.make_opsetid("", OPSET), helper.make_opsetid(_MS, 1)]
        return helper.make_model(graph, opset_imports=opsets, producer_name="adalog")


# --- emitters, one per module kind ---------------------------------------------------------------


def _codes_from_float(g: GraphBuilder, x: str, scale: float, zero: int, top: int) -> str:
    """uint8 codes ``clamp(round(x/s) + z, 0, top)``."""
    codes = g.op(
        "QuantizeLinear", x, g.const(np.float32(scale), "x_scale"),
        g.const(np.uint8(zero), "x_zero"), hint="codes",
    )  # fmt: skip
    return _clip_codes(g, codes, top)


def _clip_codes(g: GraphBuilder, codes: str, top: int) -> str:
    if top >= 255:
        return codes
    return g.op("Clip", codes, g.const(np.uint8(0), "low"), g.const(np.uint8(top), "top"))


def _int8_linear(g: GraphBuilder, layer: FastLinear, x: str, codes: bool) -> str:
    """An int8 :class:`FastLinear`: ``x`` is a float tensor or (``codes``) its uint8 codes."""
    if not codes:
        x = _codes_from_float(g, x, layer.x_scale, layer.x_zero, layer.x_top)
    zero = layer.weight_zero
    out = g.op(
        "MatMulIntegerToFloat", x, g.const(layer.weight.w8t, "w8"),
        g.const(np.float32(layer.x_scale), "a_scale"), g.const(layer.w_scale, "w_scale"),
        g.const(np.uint8(layer.x_zero), "a_zero"),
        "" if zero is None else g.const(zero.to(torch.int8), "w_zero"),
        "" if layer.bias is None else g.const(layer.bias, "bias"),
        domain=_MS, hint="qlinear",
    )  # fmt: skip
    return g.op("Gelu", out, domain=_MS) if layer.fuse_gelu else out


def _log_codes(g: GraphBuilder, x: str, slope: float, offset: float, top: float) -> str:
    """int32 codes ``round(clamp(slope·x + offset, 0, top))`` (``x`` a natural log)."""
    e = g.op("Add", g.op("Mul", x, g.const(np.float32(slope), "slope")), g.const(offset, "off"))
    e = g.op("Clip", e, g.const(np.float32(0.0), "zero"), g.const(np.float32(top), "top"))
    return g.op("Cast", g.op("Round", e), to=_onnx().TensorProto.INT32, hint="log_codes")


def _lookup(g: GraphBuilder, table: Tensor, codes: str) -> str:
    """``table[codes]``: ``GatherElements`` on the flattened codes (ONNX Runtime's ``Gather``
    copies element by element, about 13x slower on a 1-D table)."""
    flat = g.op("Reshape", codes, g.const(np.array([-1], np.int64), "flat"))
    values = g.op("GatherElements", g.const(table, "levels"), flat, axis=0)
    return g.op("Reshape", values, g.op("Shape", codes), hint="lut")


def _lut_linear(g: GraphBuilder, layer: FastLinear, x: str) -> str:
    """A log-coded :class:`FastLinear` (see :func:`adalog.runtime.fast.fast_log_codes`)."""
    quant = layer.quant
    shift, scale = float(quant.shift), float(quant.scale)
    kappa = _code_per_log2(quant)
    e = g.op("Add", x, g.const(np.float32(shift), "shift"))
    low, high = g.const(np.float32(scale * _U_MIN), "low"), g.const(np.float32(scale), "high")
    e = g.op("Log", g.op("Clip", e, low, high))
    top = min(kappa * _LOG2_U_MIN, float(quant.n_levels))
    codes = _log_codes(g, e, -kappa / math.log(2.0), kappa * math.log2(scale), top)
    values = _lookup(g, layer.levels, codes)
    # s·ŵ = (w8 - z)·s_w·s from the int8 codes, so the file stores 8-bit weights; ONNX Runtime
    # folds these constant ops into a float weight when the session starts. Not
    # DequantizeLinear: ONNX Runtime rewrites DequantizeLinear + MatMul into MatMulNBits,
    # which does not compute this product (13 % relative logit error measured).
    weight = g.op("Cast", g.const(layer.codes8.t().contiguous(), "w8"), to=_float())
    if layer.weight_zero is not None:
        weight = g.op("Sub", weight, g.const(layer.weight_zero.to(torch.float32), "w_zero"))
    scale = layer.w_scale * layer.quant.scale.to(torch.float32)
    weight = g.op("Mul", weight, g.const(scale, "w_scale"))
    out = g.op("MatMul", values, weight)
    return out if layer.bias is None else g.op("Add", out, g.const(layer.bias, "bias"))


def _linear(g: GraphBuilder, layer: nn.Module, x: str, codes: bool = False) -> str:
    if isinstance(layer, FastLinear):
        if layer.mode == "int8":
            return _int8_linear(g, layer, x, codes)
        return _lut_linear(g, layer, x)
    if type(layer) is nn.Linear:
        out = g.op("MatMul", x, g.const(layer.weight.t().contiguous(), "w"))
        return out if layer.bias is None else g.op("Add", out, g.const(layer.bias, "bias"))
    raise ArtifactError(f"the onnx engine cannot run a {type(layer).__name__} layer")


def _layer_norm(g: GraphBuilder, norm: nn.Module, x: str) -> tuple[str, bool]:
    """LayerNorm (float) or :class:`LayerNormToCodes` (uint8 codes); returns (output, codes?)."""
    if isinstance(norm, LayerNormToCodes):
        y = g.op(
            "LayerNormalization", x, g.const(norm.weight, "ln_w"), g.const(norm.bias, "ln_b"),
            axis=-1, epsilon=float(norm.eps),
        )  # fmt: skip
        return _codes_from_float(g, y, 1.0, 0, norm.top), True
    if isinstance(norm, nn.LayerNorm) and type(norm).forward in _LAYER_NORM_FORWARDS:
        ones = torch.ones(norm.normalized_shape)
        weight = norm.weight if norm.weight is not None else ones
        bias = norm.bias if norm.bias is not None else torch.zeros_like(ones)
        y = g.op(
            "LayerNormalization", x, g.const(weight, "ln_w"), g.const(bias, "ln_b"),
            axis=-1, epsilon=float(norm.eps),
        )  # fmt: skip
        return y, False
    raise ArtifactError(f"the onnx engine cannot run a {type(norm).__name__} norm")


def _heads(g: GraphBuilder, x: str, heads: int, dim: int, perm: list[int]) -> str:
    """``[B, N, H·d]`` -> ``[B, N, H, d]`` transposed by ``perm``."""
    split = g.op("Reshape", x, g.const(np.array([0, 0, heads, dim], np.int64), "shape"))
    return g.op("Transpose", split, perm=perm)


def _merge_heads(g: GraphBuilder, x: str, channels: int) -> str:
    """``[B, H, N, d]`` -> ``[B, N, H·d]``."""
    x = g.op("Transpose", x, perm=[0, 2, 1, 3])
    return g.op("Reshape", x, g.const(np.array([0, 0, channels], np.int64), "shape"))


def _fast_attention(g: GraphBuilder, attn: FastViTAttention, x: str, codes: bool) -> str:
    heads, dim, c = attn.heads, attn.head_dim, attn.dim
    if dim * 2**14 >= 2**24:  # centred int8 codes: |q·k| <= 2^14 per term
        raise ArtifactError(f"the onnx engine's q·kᵀ is not exact for head dimension {dim}")
    qkv = _linear(g, attn.qkv, x, codes)
    qkv = g.op("Add", g.op("Round", qkv), g.const(attn.code_offset_qkv, "code_offset"))
    qkv = g.op("Max", qkv, g.const(attn.code_low, "low"))
    qkv = g.op("Min", qkv, g.const(attn.code_high, "high"))
    q, k, v = g.split3(qkv, c)
    q = _heads(g, q, heads, dim, [0, 2, 1, 3])
    k_t = _heads(g, k, heads, dim, [0, 2, 3, 1])
    v = _heads(g, g.op("Mul", v, g.const(attn.v_factor, "v_factor")), heads, dim, [0, 2, 1, 3])
    acc = g.op("MatMul", q, k_t, hint="q_kt")  # integer-valued, exact in float32
    k_sums = g.op("ReduceSum", k_t, g.const(np.array([2], np.int64), "axis"), keepdims=1)
    k_term = g.op("Mul", k_sums, g.const(attn.q_zero_head, "q_zero"))
    scores = g.op("Mul", g.op("Sub", acc, k_term), g.const(attn.score_scale, "score_scale"))
    log_p = g.op("LogSoftmax", scores, axis=-1)
    codes_p = _log_codes(g, log_p, attn.code_slope, attn.code_shift, attn.code_max)
    probs = _lookup(g, attn.levels, codes_p)
    out = _merge_heads(g, g.op("MatMul", probs, v, hint="attn_v"), c)
    proj = attn.proj
    merged = _codes_from_float(g, out, 1.0, proj.x_zero, proj.x_top)
    return _linear(g, proj, merged, codes=True)


def _int8_matmul(g: GraphBuilder, mm: FastMatMul, a: str, b: str, k: int) -> str:
    """A uniform x uniform :class:`FastMatMul`: ``s_a s_b·Σ (a_code - z_a)(b_code - z_b)`` as a
    float ``MatMul`` of integer-valued tensors, exact in float32 while ``K·2^(bits_a+bits_b) <
    2^24`` (8-bit attn·v: up to 256 tokens), which is checked."""
    if k * 2 ** (mm.a_bits + mm.b_bits) >= 2**24:
        raise ArtifactError(f"the onnx engine's integer matmul is not exact for K = {k}")
    centred = []
    operands = ((a, mm.a_scale, mm.a_zero, mm.a_bits), (b, mm.b_scale, mm.b_zero, mm.b_bits))
    for t, scale, zero, bits in operands:
        half = 2 ** (bits - 1)
        codes = g.op("Round", g.op("Div", t, g.const(scale, "scale")))
        zero_c = g.const(zero - half, "zero")
        codes = g.op("Add", codes, zero_c)
        low, high = g.const(np.float32(-half), "low"), g.const(np.float32(half - 1), "high")
        centred.append(g.op("Sub", g.op("Clip", codes, low, high), zero_c))
    out = g.op("MatMul", centred[0], centred[1], hint="int_matmul")
    return g.op("Mul", out, g.const(mm.a_scale * mm.b_scale, "scales"))


def _attention(g: GraphBuilder, attn: nn.Module, x: str, tokens: int) -> str:
    """timm attention in FP32, or :class:`QuantViTAttention` with int8 matmuls (a uniform
    post-Softmax quantizer, which the fast engine does not fuse)."""
    heads, dim = attn.num_heads, attn.head_dim
    c = heads * dim
    qkv = _linear(g, attn.qkv, x)
    q, k, v = g.split3(qkv, c)
    q = _heads(g, q, heads, dim, [0, 2, 1, 3])
    k_t, v = _heads(g, k, heads, dim, [0, 2, 3, 1]), _heads(g, v, heads, dim, [0, 2, 1, 3])
    scale = g.const(np.float32(attn.scale), "softmax_scale")
    if isinstance(attn, QuantViTAttention):
        scores = g.op("Mul", _int8_matmul(g, attn.matmul1, q, k_t, dim), scale)
    else:
        scores = g.op("MatMul", g.op("Mul", q, scale), k_t)
    probs = g.op("Softmax", scores, axis=-1)
    if isinstance(attn, QuantViTAttention):
        out = _int8_matmul(g, attn.matmul2, probs, v, tokens)
    else:
        out = g.op("MatMul", probs, v)
    return _linear(g, attn.proj, _merge_heads(g, out, c))


def _block(g: GraphBuilder, block: nn.Module, x: str, tokens: int) -> str:
    if type(block) is not Block or type(block.mlp) is not Mlp:
        raise ArtifactError(f"the onnx engine runs timm ViT Blocks, not {type(block).__name__}")
    for extra in (block.ls1, block.ls2, block.drop_path1, block.drop_path2):
        if not isinstance(extra, nn.Identity):
            raise ArtifactError("the onnx engine runs blocks without layer scale or drop path")
    y, codes = _layer_norm(g, block.norm1, x)
    if isinstance(block.attn, FastViTAttention):
        y = _fast_attention(g, block.attn, y, codes)
    elif _unfused_attention(block.attn) and not codes:
        y = _attention(g, block.attn, y, tokens)
    else:
        raise ArtifactError(
            "the onnx engine runs the fast engine's fused attention (a log post-Softmax "
            "quantizer), int8 attention (a uniform post-Softmax quantizer) or FP32 attention"
        )
    x = g.op("Add", x, y, hint="residual")
    mlp = block.mlp
    y, codes = _layer_norm(g, block.norm2, x)
    y = _linear(g, mlp.fc1, y, codes)
    if type(mlp.act) is nn.GELU and mlp.act.approximate == "none":
        y = g.op("Gelu", y, domain=_MS)
    elif not isinstance(mlp.act, nn.Identity):
        raise ArtifactError(f"the onnx engine runs exact GELU MLPs, not {type(mlp.act).__name__}")
    if not isinstance(mlp.norm, nn.Identity):
        raise ArtifactError("the onnx engine runs MLPs without a hidden norm")
    return g.op("Add", x, _linear(g, mlp.fc2, y), hint="residual")


def _unfused_attention(attn: nn.Module) -> bool:
    """FP32 timm attention, or quantized attention whose matmuls are both uniform (int8)."""
    if type(attn) is QuantViTAttention:
        matmuls = (attn.matmul1, attn.matmul2)
        if not all(isinstance(m, FastMatMul) and m.mode == "int8" for m in matmuls):
            return False
    elif type(attn) is not Attention:
        return False
    plain = all(isinstance(getattr(attn, n), nn.Identity) for n in ("q_norm", "k_norm", "norm"))
    return plain and getattr(attn, "gate", None) is None


def _patch_embed(g: GraphBuilder, embed: nn.Module, image: str) -> str:
    conv = embed.proj
    if not (isinstance(embed.norm, nn.Identity) and embed.flatten):
        raise ArtifactError("the onnx engine runs a flattening patch embedding without a norm")
    if isinstance(conv, IntConv2d):
        weight, scale, bias = conv.weight_rows, conv.scale, conv.bias
    elif type(conv) is nn.Conv2d:
        weight, scale, bias = conv.weight, None, conv.bias
        bias = None if bias is None else bias.reshape(1, -1, 1, 1)
    else:
        raise ArtifactError(f"the onnx engine cannot run a {type(conv).__name__} patch embedding")
    if conv.dilation != (1, 1) or conv.groups != 1 or isinstance(conv.padding, str):
        raise ArtifactError("the onnx engine runs an undilated, ungrouped patch convolution")
    pads, channels = list(conv.padding) * 2, int(weight.shape[0])
    if scale is None:
        weight = g.const(weight, "patch_w")
    else:  # integer codes - zero point, stored in 8 (16) bits, folded to float at session start
        small = bool(weight.abs().max() <= 127)
        codes = g.const(weight.to(torch.int8 if small else torch.int16), "patch_codes")
        weight = g.op("Cast", codes, to=_float())
    y = g.op("Conv", image, weight, strides=list(conv.stride), pads=pads)
    if scale is not None:
        y = g.op("Mul", y, g.const(scale, "patch_scale"))
    if bias is not None:
        y = g.op("Add", y, g.const(bias, "patch_bias"))
    y = g.op("Reshape", y, g.const(np.array([0, channels, -1], np.int64), "shape"))
    return g.op("Transpose", y, perm=[0, 2, 1], hint="patches")


def build_onnx_graph(model: nn.Module):
    """The ONNX model (``onnx.ModelProto``) of a fast-engine or FP32 timm ViT/DeiT."""
    if not isinstance(model, VisionTransformer):
        raise ArtifactError(f"the onnx engine runs timm VisionTransformers, not {type(model)}")
    unsupported = (
        model.cls_token is None or model.reg_token is not None or model.no_embed_class
        or model.dynamic_img_size or model.global_pool != "token" or model.attn_pool is not None
        or not all(isinstance(m, nn.Identity) for m in (model.norm_pre, model.fc_norm))
    )  # fmt: skip
    if unsupported:
        raise ArtifactError("the onnx engine runs ViT/DeiT with a class token and token pooling")
    g = GraphBuilder()
    image = "image"
    x = _patch_embed(g, model.patch_embed, image)
    channels = model.cls_token.shape[-1]
    start, end = (g.const(np.array([i], np.int64), "index") for i in (0, 1))
    batch = g.op("Slice", g.op("Shape", image), start, end)
    cls_shape = g.op("Concat", batch, g.const(np.array([1, channels], np.int64), "cls"), axis=0)
    cls = g.op("Expand", g.const(model.cls_token, "cls_token"), cls_shape)
    x = g.op("Concat", cls, x, axis=1)
    x = g.op("Add", x, g.const(model.pos_embed, "pos_embed"))
    tokens = model.patch_embed.num_patches + model.num_prefix_tokens
    for block in model.blocks:
        x = _block(g, block, x, tokens)
    x, _ = _layer_norm(g, model.norm, x)
    x = g.op("Gather", x, g.const(np.int64(0), "cls_index"), axis=1)
    logits = _linear(g, model.head, x)
    size = tuple(int(s) for s in model.patch_embed.img_size)
    return g.model(image, logits, size, model.num_classes)


class OrtModel(nn.Module):
    """An ONNX Runtime session behind an ``nn.Module`` forward (float32 images -> logits), so
    the evaluation and timing code runs it like any model. CPU only."""

    def __init__(self, graph, threads: int | None = None, source: nn.Module | None = None):
        super().__init__()
        try:
            import onnxruntime as ort
        except ImportError as exc:  # pragma: no cover - onnxruntime is a declared dependency
            message = "the onnx engine needs 'onnxruntime' (pip install onnxruntime)"
            raise AdalogError(message) from exc
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.log_severity_level = 3
        self.session = ort.InferenceSession(
            graph.SerializeToString(), options, providers=["CPUExecutionProvider"]
        )
        self.graph = graph
        for attr in ("pretrained_cfg", "default_cfg", "adalog_meta", "num_classes"):
            if source is not None and hasattr(source, attr):
                setattr(self, attr, getattr(source, attr))

    def forward(self, x: Tensor) -> Tensor:
        image = x.detach().to("cpu", torch.float32).contiguous().numpy()
        return torch.from_numpy(self.session.run(None, {"image": image})[0])

    def save(self, path: str | Path) -> None:
        """Write the ONNX model file (atomically)."""
        from adalog.io import atomic_write

        data = self.graph.SerializeToString()
        atomic_write(path, lambda tmp: tmp.write_bytes(data))


def load_onnx_model(
    art_dir: str | Path, expected_model: str | None = None, threads: int | None = None
) -> OrtModel:
    """Read and validate an artifact, build its fast-engine model and run it with ONNX Runtime."""
    return onnx_model(load_integer_model(art_dir, "fast", expected_model), threads)


def onnx_model(model: nn.Module, threads: int | None = None) -> OrtModel:
    """A fast-engine model, or an FP32 timm ViT/DeiT (the onnx engine's same-engine baseline),
    through ONNX Runtime."""
    return OrtModel(build_onnx_graph(model.eval()), threads, source=model)
