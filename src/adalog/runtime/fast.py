"""Fast engine: the integer executor's layers rewritten for CPU speed.

Same artifact and quantizer semantics as the reference executor (:mod:`adalog.runtime.integer`),
but the arithmetic is chosen for speed where the reference chooses exactness:

* **uniform x uniform** (every linear input, q·kᵀ, attn·v with a uniform post-Softmax
  quantizer) is an int8 GEMM with exact int32 accumulation. Linear layers use oneDNN's quantized
  linear (:meth:`FastKernel.qlinear`): uint8 activation codes with their zero point x int8
  weight codes, prepacked once, with ``s_a·s_w[o]``, the bias and (fc1) the exact-erf GELU that
  follows applied in the GEMM's epilogue. Weight zero points are folded into the weight codes
  (``w - z_w``) when that fits int8 (widths <= 7 bits); otherwise (8-bit weights) the codes
  are centred (``w - 128``) and the residual ``-(z_w - 128)[o]·Σ_k (a_k - z_a)`` is added to the
  GEMM's output as a rank-1 tensor. Batched matmuls run one ``torch._int_mm`` per (image, head)
  slice on strided views; zero points are applied from the codes' row and column sums.
* **log x uniform** (attn·v with AdaLog/Log2/Log-√2 probabilities, the post-GELU fc2 input): the
  codes are dequantized through a float32 LUT of the table-form levels ``2^(-T1[k])·T2[k]``
  (``T2`` exactly ``(D·T2)/D``; the zero state 0) and multiplied in float32: ``torch.matmul``
  for attn·v, oneDNN's prepacked fp32 linear for fc2 (``s·ŵ`` folded into its weight).
* twin-uniform and float linear inputs use the reference modules with the fast kernel.

Model-level fusions (:func:`fuse_model`, timm ViT/DeiT blocks and ``Mlp``): the LayerNorm that
feeds qkv / fc1 outputs that layer's uint8 codes directly (``1/s`` and ``z`` folded into its
affine parameters); the attention computes the post-Softmax log code from ``log_softmax`` of the
scores (no Softmax, no per-element log2; the q·kᵀ zero-point terms that are constant along a row
drop out of it), folds the softmax scale and the per-head scales into one multiply, and folds
``s_v·s_p/s_proj`` into v̂ so that attn·v yields proj's input codes after ``+z``, round, clamp.

Agreement with the reference engine. Every integer sum is exact; the engines differ by float32
rounding only: the order of scale multiplications, folded constants, oneDNN's GELU, log codes
computed as ``log2(x + shift) - log2 s`` (or from ``log_softmax``) instead of
``log2((x + shift)/s)``, and float32 sums of LUT levels instead of an exact fixed-point sum. Per
layer that is ~1e-7 relative, but an activation within rounding of a code boundary can land on
the next code (measured: ~2e-6 of the post-Softmax codes), and the network amplifies that like
any float32 difference (see :mod:`adalog.runtime.integer` on the chaotic W4A4 ViT-Tiny).
Measured: random test models (ViT, Swin; W3A4 to W8A8; every post-GELU/post-Softmax kind)
max |Δlogit| / max |logit| <= 1.0e-7, same argmax (tested: < 1e-5). ViT-Tiny on the 468
dev-rest images: W4A4 artifact, same argmax as the reference on 82.7 % (the fake-quant model:
75.0 %), top-1 0.560 vs 0.562; a W8A8 artifact (reduced search), 96.6 % (fake-quant: 96.8 %),
top-1 0.821 vs 0.818.

Workspaces: large intermediates live in scratch buffers of the model's :class:`FastKernel`,
reused across layers and calls and kept per thread, so several threads may call one model at
once (each gets the logits of a single-threaded call). The modules hold no other state that a
forward changes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from timm.layers import Mlp
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from adalog.errors import ArtifactError
from adalog.models.parts import FC1, QKV, TIMM_VIT
from adalog.models.qmodules import QuantLinear, QuantMatMul, QuantViTAttention
from adalog.pipelines.export import Artifact
from adalog.quant import LogQuantizer, UniformQuantizer
from adalog.quant.log import _U_MIN, ADALOG_R
from adalog.runtime.artifact import log_tables, weight_codes
from adalog.runtime.integer import IntLinear
from adalog.runtime.kernels import MAX_FAST_K, FastKernel

__all__ = [
    "FastLinear",
    "FastMatMul",
    "FastViTAttention",
    "LayerNormToCodes",
    "fast_linear",
    "fast_log_codes",
    "fuse_model",
    "log_levels",
    "uniform_codes",
]

_LOG2_U_MIN = -math.log2(_U_MIN)  # the largest -log2(x/s) a log quantizer distinguishes


def uniform_codes(
    x: Tensor, scale: Tensor, offset: Tensor | float, low: int, high: int, dtype: torch.dtype
) -> Tensor:
    """Codes ``clamp(round(x/s) + offset, low, high)`` in ``dtype``: the fake quantizer's float
    steps (so equal inputs give the reference's codes, shifted by ``offset - z``)."""
    return (x / scale).round_().add_(offset).clamp_(low, high).to(dtype)


def log_levels(artifact: Artifact | None, prefix: str, quant: LogQuantizer) -> Tensor:
    """float32 level of every log code in units of the scale (zero state, code N, last):
    ``(D·T2[k])/D · 2^(-T1[k])``, times √2 for odd Log-√2 codes; exact in float64, then rounded."""
    numerators, shifts, denominator = log_tables(artifact, prefix, quant)
    levels = numerators.double() / denominator * torch.exp2(-shifts.double())
    if quant.kind == "logsqrt2":
        odd = torch.arange(quant.n_levels) % 2 == 1
        levels = torch.where(odd, levels * math.sqrt(2.0), levels)
    return torch.cat([levels, levels.new_zeros(1)]).to(torch.float32)


_ROUND_MAGIC = 2.0**23
_ROUND_MAGIC_BITS = 0x4B000000  # float32 bits of 2^23


def _round_to_index(e: Tensor) -> Tensor:
    """``round(e)`` (half to even) as int32, in place, for ``0 <= e < 2^22``: adding 2^23
    rounds to an integer, whose float32 bit pattern is ``0x4B000000 + round(e)``."""
    return e.add_(_ROUND_MAGIC).view(torch.int32).sub_(_ROUND_MAGIC_BITS)


def _code_per_log2(quant: LogQuantizer) -> float:
    """Codes per unit of ``-log2(x/s)``: 1 (Log2), 2 (Log-√2), r/q (AdaLog)."""
    return {"log2": 1.0, "logsqrt2": 2.0}.get(quant.kind) or ADALOG_R / float(quant.q)


def fast_log_codes(x: Tensor, quant: LogQuantizer, out: Tensor | None = None) -> Tensor:
    """Log codes (int32, zero state ``N``) as ``round(κ·(log2 s - log2 clamp(x + shift, s·u, s)))``
    with ``κ`` codes per octave: one log2 pass, no division (equal to ``quant.quantize`` up to
    float rounding at code boundaries). ``out``: a float32 scratch tensor shaped like ``x``."""
    shift, scale = float(quant.shift), float(quant.scale)
    kappa = _code_per_log2(quant)
    e = torch.add(x, shift, out=out) if out is not None else x.add(shift)
    e = e.clamp_(scale * _U_MIN, scale).log2_().mul_(-kappa)
    if scale != 1.0:
        e = e.add_(kappa * math.log2(scale))
    e = e.clamp_(0.0, min(kappa * _LOG2_U_MIN, float(quant.n_levels)))
    return _round_to_index(e)


def _int8_rows(raw: Tensor, zero: Tensor, bits: int) -> tuple[Tensor, Tensor | None]:
    """Weight codes as int8-range rows: ``raw - z`` when that fits (widths <= 7 bits), else the
    centred ``raw - 2^(b-1)`` with the centred zero point ``z - 2^(b-1)`` (8-bit weights)."""
    shifted = raw - zero[:, None]
    if int(shifted.min()) >= -128 and int(shifted.max()) <= 127:
        return shifted, None
    half = 2 ** (bits - 1)
    return raw - half, zero - half


class FastLinear(nn.Module):
    """Linear layer of the fast engine: int8 oneDNN GEMM for a per-tensor uniform input (which
    may also arrive as uint8 codes, see :class:`LayerNormToCodes`), float LUT + fp32 GEMM for a
    log-coded input (see the module docstring)."""

    def __init__(self, artifact: Artifact, name: str, module: QuantLinear, kernel: FastKernel):
        super().__init__()
        self.kernel = kernel
        self.in_features, self.out_features = module.in_features, module.out_features
        self.fuse_gelu = False
        weight = weight_codes(artifact, name)
        raw, w_zero, w_scale, w_bits = weight.rows, weight.zero, weight.scale, weight.bits
        bias = None if module.bias is None else module.bias.detach().to(torch.float32).clone()
        quant = module.input_quant
        # int8 weight codes [O, K] and, when they do not fit with the zero point folded in
        # (8-bit weights), the per-row zero point of the centred codes
        w8, self.weight_zero = _int8_rows(raw, w_zero, w_bits)
        self.register_buffer("w_scale", w_scale, persistent=False)
        if isinstance(quant, LogQuantizer):
            self.mode = "lut"
            self.quant = quant
            levels = log_levels(artifact, f"{name}.input_quant", quant)
            self.register_buffer("levels", levels, persistent=False)
            w_hat = (raw - w_zero[:, None]).to(torch.float32) * w_scale[:, None]
            if not (bool(quant.shift_folded) or float(quant.shift) == 0.0):
                # x̂ = s·level - shift: the -shift·Σ_k ŵ[o, k] joins the bias
                shift_term = -float(quant.shift) * w_hat.double().sum(1).to(torch.float32)
                bias = shift_term if bias is None else bias + shift_term
            self.weight = kernel.pack_float(w_hat * quant.scale.to(torch.float32))
            self.register_buffer("codes8", w8.to(torch.int8), persistent=False)  # for export
        elif isinstance(quant, UniformQuantizer) and quant.scale.numel() == 1:
            self.mode = "int8"
            self.register_buffer("x_scale_t", quant.scale.detach().clone(), persistent=False)
            self.x_scale = float(quant.scale)
            self.x_zero = int(torch.round(quant.zero_point))
            self.x_top = 2**quant.n_bits - 1
            rank1 = None  # 8-bit weights: the zero-point residual as a rank-1 term
            if self.weight_zero is not None:
                rank1 = -(self.weight_zero.to(torch.float32) * self.x_scale * w_scale)[None, :]
            self.register_buffer("rank1", rank1, persistent=False)
            self.weight = kernel.pack_int8(w8)
        else:
            raise ArtifactError(f"{name}: the fast linear needs a per-tensor uniform or log input")
        self.register_buffer("bias", bias, persistent=False)

    def scale_output(self, factor: Tensor) -> None:
        """Multiply output column ``o`` by ``factor[o]`` (folded into the int8 epilogue's
        scales, bias and rank-1 term), e.g. to emit the next quantizer's ``x/s`` directly."""
        if self.mode != "int8":
            raise ValueError("only int8 fast linears fold an output scale")
        self.w_scale = self.w_scale * factor
        if self.bias is not None:
            self.bias = self.bias * factor
        if self.rank1 is not None:
            self.rank1 = self.rank1 * factor

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        x = x.reshape(-1, self.in_features)
        kernel = self.kernel
        if self.mode == "lut":
            scratch = kernel.buffer("lut_in", x.shape, torch.float32)
            codes = fast_log_codes(x, self.quant, out=scratch)
            values = kernel.buffer("lut_values", (codes.numel(),), torch.float32)
            torch.index_select(self.levels, 0, codes.view(-1), out=values)
            out = kernel.linear_float(values.view(x.shape), self.weight, self.bias)
        else:
            if x.dtype == torch.uint8:  # codes already (LayerNormToCodes)
                codes = x
            else:
                scratch = kernel.buffer("int8_in", x.shape, torch.float32)
                torch.div(x, self.x_scale_t, out=scratch).round_().add_(self.x_zero)
                codes = scratch.clamp_(0, self.x_top).to(torch.uint8)
            add, bias = None, self.bias
            if self.rank1 is not None:
                rows = codes.sum(1, keepdim=True, dtype=torch.float32)
                rows = rows.sub_(self.in_features * self.x_zero)  # Σ_k (a_k - z_a), exact
                add = rows * self.rank1 if bias is None else torch.addmm(bias, rows, self.rank1)
                bias = None
            out = self.kernel.qlinear(
                codes, self.x_scale, self.x_zero, self.weight, self.w_scale, bias, add,
                self.fuse_gelu,
            )  # fmt: skip
        return out.reshape(*lead, self.out_features)


def fast_linear(
    artifact: Artifact, name: str, module: QuantLinear, kernel: FastKernel
) -> nn.Module:
    """A :class:`FastLinear` for a per-tensor uniform or a log-coded input; otherwise the
    reference :class:`IntLinear` on the fast kernel (twin-uniform and float inputs)."""
    quant = module.input_quant
    usable = quant is not None and not getattr(quant, "is_identity", False)
    uniform = isinstance(quant, UniformQuantizer) and quant.scale.numel() == 1
    if usable and module.in_features <= MAX_FAST_K and (uniform or isinstance(quant, LogQuantizer)):
        return FastLinear(artifact, name, module, kernel)
    return IntLinear(artifact, name, module, kernel)


class FastMatMul(nn.Module):
    """``a @ b`` of two activations (q·kᵀ, attn·v); ``b`` uniform (per head or tensor).

    Uniform ``a``: centred int8 codes, one ``_int_mm`` per slice, zero points in float:
    ``s_a s_b·(acc - z_b·Σa - z_a·Σb + K·z_a·z_b)``. Log ``a``: float LUT levels @ ``b̂``.
    """

    def __init__(self, artifact: Artifact, name: str, module: QuantMatMul, kernel: FastKernel):
        super().__init__()
        self.kernel = kernel
        a_quant, b_quant = module.a_quant, module.b_quant
        if not isinstance(b_quant, UniformQuantizer) or b_quant.is_identity:
            raise ArtifactError(f"{name}: integer matmul needs a quantized A and a uniform B")
        self.register_buffer("b_scale", b_quant.scale.detach().clone(), persistent=False)
        self.register_buffer("b_zero", torch.round(b_quant.zero_point.detach()), False)
        self.b_bits = b_quant.n_bits
        if isinstance(a_quant, LogQuantizer) and not a_quant.is_identity:
            self.mode = "lut"
            self.a_quant = a_quant
            levels = log_levels(artifact, f"{name}.a_quant", a_quant)
            self.register_buffer("levels", levels, persistent=False)
            folded = bool(a_quant.shift_folded) or float(a_quant.shift) == 0.0
            self.a_offset = 0.0 if folded else -float(a_quant.shift)
        elif isinstance(a_quant, UniformQuantizer) and not a_quant.is_identity:
            self.mode = "int8"
            self.register_buffer("a_scale", a_quant.scale.detach().clone(), persistent=False)
            self.register_buffer("a_zero", torch.round(a_quant.zero_point.detach()), False)
            self.a_bits = a_quant.n_bits
        else:
            raise ArtifactError(f"{name}: integer matmul needs a quantized A and a uniform B")

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        if self.mode == "lut":
            return self._log_uniform(a, b)
        return self._uniform_uniform(a, b)

    def b_hat(self, b: Tensor, factor: Tensor | float = 1.0) -> Tensor:
        """``b̂·factor`` with ``b̂ = clamp(round(b/s), -z, top - z)·s`` (= ``(code - z)·s``)."""
        top = 2**self.b_bits - 1
        b_hat = (b / self.b_scale).round_().clamp_(-self.b_zero, top - self.b_zero)
        return b_hat.mul_(self.b_scale * factor)

    def _log_uniform(self, a: Tensor, b: Tensor) -> Tensor:
        codes = fast_log_codes(a, self.a_quant)
        values = self.levels.index_select(0, codes.view(-1)).view(codes.shape)
        scale = float(self.a_quant.scale)
        b_hat = self.b_hat(b, scale)
        out = torch.matmul(values, b_hat)
        self.kernel._count("float_lut_matmul")
        if self.a_offset:  # x̂ = s·level + offset
            out = out + (self.a_offset / scale) * b_hat.sum(-2, keepdim=True)
        return out

    def _uniform_uniform(self, a: Tensor, b: Tensor) -> Tensor:
        half_a, half_b = 2 ** (self.a_bits - 1), 2 ** (self.b_bits - 1)
        za, zb = self.a_zero - half_a, self.b_zero - half_b  # centred zero points (float)
        a8 = uniform_codes(a, self.a_scale, za, -half_a, half_a - 1, torch.int8)
        b8 = uniform_codes(b, self.b_scale, zb, -half_b, half_b - 1, torch.int8)
        acc = self.kernel.bmm(a8, b8)
        k = a.shape[-1]
        scale = self.a_scale * self.b_scale
        rows = a8.sum(-1, keepdim=True, dtype=torch.float32)
        cols = b8.sum(-2, keepdim=True, dtype=torch.float32)
        rows = (k * za * zb - zb * rows).mul_(scale)
        cols = (za * cols).mul_(-scale)
        out = acc.to(torch.float32).mul_(scale)
        return out.add_(rows).add_(cols)


class LayerNormToCodes(nn.Module):
    """A LayerNorm whose only reader is an int8 :class:`FastLinear`: it outputs that layer's
    uint8 input codes, ``clamp(round(LN(x)/s + z))``, with ``1/s`` and ``z`` folded into its
    affine parameters (one float pass less than normalising, then quantizing)."""

    def __init__(self, norm: nn.LayerNorm, linear: FastLinear) -> None:
        super().__init__()
        self.shape, self.eps, self.top = norm.normalized_shape, norm.eps, linear.x_top
        weight = norm.weight.detach() if norm.weight is not None else torch.ones(self.shape)
        bias = norm.bias.detach() if norm.bias is not None else torch.zeros(self.shape)
        scale = linear.x_scale_t.double()
        self.register_buffer("weight", (weight.double() / scale).float(), persistent=False)
        self.register_buffer("bias", (bias.double() / scale + linear.x_zero).float(), False)

    def forward(self, x: Tensor) -> Tensor:
        y = F.layer_norm(x, self.shape, self.weight, self.bias, self.eps)
        return y.round_().clamp_(0, self.top).to(torch.uint8)


class FastViTAttention(nn.Module):
    """timm ViT attention of the fast engine (log-coded post-Softmax probabilities).

    qkv's epilogue divides by the q/k/v scales (folded into its per-row scales and bias), so
    its output only needs rounding, ``+z`` and clamping to give the codes. Per head ``h``:
    ``S = c_h·(q8·k8ᵀ - z_q·Σ_d k8)`` with ``c_h = s_q s_k·scale`` (the row terms of the
    zero-point expansion are constant along a row and cancel in the Softmax);
    ``code = round(κ·(log2 s_p - log2e·log_softmax(S)))`` (clamped as the quantizer does);
    ``out = levels[code] @ (v̂·s_p/s_proj)``, then ``+z``, round and clamp give proj's codes.
    """

    def __init__(self, attn: QuantViTAttention) -> None:
        super().__init__()
        self.qkv, self.proj = attn.qkv, attn.proj
        mm1, mm2 = attn.matmul1, attn.matmul2
        self.kernel = mm1.kernel
        self.heads, self.head_dim = attn.num_heads, attn.head_dim
        heads, dim = self.heads, self.head_dim
        self.dim = heads * dim

        def channels(values: Tensor) -> Tensor:  # per-head (or per-tensor) -> per channel
            return values.reshape(-1).expand(heads).repeat_interleave(dim).to(torch.float32)

        # qkv output in units of s_q | s_k | s_v; then q, k: centred int8 codes, v: code - z
        q_half, k_half, v_top = 2 ** (mm1.a_bits - 1), 2 ** (mm1.b_bits - 1), 2**mm2.b_bits - 1
        v_zero = channels(mm2.b_zero)
        self.qkv.scale_output(
            1.0 / torch.cat([channels(mm1.a_scale), channels(mm1.b_scale), channels(mm2.b_scale)])
        )
        offset = [channels(mm1.a_zero) - q_half, channels(mm1.b_zero) - k_half, 0 * v_zero]
        low = [torch.full_like(v_zero, -q_half), torch.full_like(v_zero, -k_half), -v_zero]
        high = [torch.full_like(v_zero, q_half - 1), torch.full_like(v_zero, k_half - 1)]
        self.register_buffer("code_offset_qkv", torch.cat(offset), persistent=False)
        self.register_buffer("code_low", torch.cat(low), persistent=False)
        self.register_buffer("code_high", torch.cat([*high, v_top - v_zero]), persistent=False)
        q_zero_head = mm1.a_zero.reshape(-1).expand(heads) - q_half
        self.register_buffer("q_zero_head", q_zero_head.reshape(1, heads, 1, 1).float(), False)
        scores = (mm1.a_scale * mm1.b_scale).reshape(-1).expand(heads) * attn.scale
        self.register_buffer("score_scale", scores.reshape(1, heads, 1, 1).float(), False)
        # post-Softmax log code from log_softmax: κ·(log2 s_p - log2(e)·log_softmax)
        quant = mm2.a_quant
        kappa = _code_per_log2(quant)
        self.code_slope = -kappa * math.log2(math.e)
        self.code_shift = kappa * math.log2(float(quant.scale))
        self.code_max = min(kappa * _LOG2_U_MIN, float(quant.n_levels))
        self.register_buffer("levels", mm2.levels, persistent=False)
        # (code - z)·s_v·s_p/s_proj: attn·v comes out in units of proj's input scale
        factor = float(quant.scale) / self.proj.x_scale_t.to(torch.float32)
        self.register_buffer("v_factor", channels(mm2.b_scale) * factor, persistent=False)

    def forward(
        self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False
    ) -> Tensor:
        if attn_mask is not None or is_causal:
            raise NotImplementedError("quantized attention does not support attention masks")
        batch, tokens = x.shape[0], x.shape[1]
        heads, dim, c, kernel = self.heads, self.head_dim, self.dim, self.kernel
        split, shape = (batch, tokens, heads, dim), (batch, heads, tokens, tokens)
        qkv = self.qkv(x).round_().add_(self.code_offset_qkv)
        qkv = qkv.clamp_(self.code_low, self.code_high)
        q8 = qkv[..., :c].to(torch.int8).view(split)
        k8 = qkv[..., c : 2 * c].to(torch.int8).view(split)
        v = qkv[..., 2 * c :].mul_(self.v_factor).view(split).transpose(1, 2)
        acc = kernel.buffer("attn_acc", shape, torch.int32)
        for b in range(batch):
            for h in range(heads):
                kernel.mm(q8[b, :, h], k8[b, :, h].t(), acc[b, h])
        # z_q·Σ_d k8 per key (exact in float32), subtracted in float: int broadcasts are slow
        k_sums = k8.sum(-1, dtype=torch.float32).transpose(1, 2).unsqueeze(2)  # [B, H, 1, N]
        scores = kernel.buffer("attn_scores", shape, torch.float32).copy_(acc)
        scores = scores.sub_(k_sums.mul_(self.q_zero_head)).mul_(self.score_scale)
        e = torch._log_softmax(scores, -1, False, out=kernel.buffer("attn_e", shape, scores.dtype))
        e = e.mul_(self.code_slope)
        if self.code_shift:
            e = e.add_(self.code_shift)
        codes = _round_to_index(e.clamp_(0.0, self.code_max))
        probs = kernel.buffer("attn_probs", shape, torch.float32)
        torch.index_select(self.levels, 0, codes.view(-1), out=probs.view(-1))
        out = kernel.buffer("attn_out", (batch, heads, tokens, dim), torch.float32)
        torch.matmul(probs, v, out=out)
        kernel._count("float_lut_matmul")
        merged = kernel.buffer("attn_merged", (batch, tokens, c), torch.float32)
        torch.add(out.transpose(1, 2), self.proj.x_zero, out=merged.view(split))
        merged = merged.round_().clamp_(0, self.proj.x_top)
        return self.proj(merged.to(torch.uint8))


def _fusable_attention(attn: nn.Module) -> bool:
    if type(attn) is not QuantViTAttention or getattr(attn, "gate", None) is not None:
        return False
    if not all(isinstance(getattr(attn, n), nn.Identity) for n in ("q_norm", "k_norm", "norm")):
        return False
    qkv, proj, mm1, mm2 = attn.qkv, attn.proj, attn.matmul1, attn.matmul2
    return (
        all(isinstance(m, FastLinear) and m.mode == "int8" for m in (qkv, proj))
        and isinstance(mm1, FastMatMul)
        and mm1.mode == "int8"
        and isinstance(mm2, FastMatMul)
        and mm2.mode == "lut"
        and mm2.a_offset == 0.0
    )


def fuse_model(model: nn.Module) -> dict[str, int]:
    """Apply the fast engine's model-level fusions in place (see the module docstring): timm
    ``Mlp`` GELU into fc1, ViT ``Block`` LayerNorms into the codes of qkv / fc1, ViT attention.
    Returns how many of each were applied."""
    counts = {"gelu": 0, "layernorm": 0, "attention": 0}
    for module in list(model.modules()):
        if type(module) is Mlp:  # fc1 -> act -> drop1 (eval: identity) -> norm -> fc2
            fc1, act = module.fc1, module.act
            if isinstance(fc1, FastLinear) and fc1.mode == "int8" and type(act) is nn.GELU:
                if act.approximate == "none" and isinstance(module.norm, nn.Identity):
                    fc1.fuse_gelu, module.act = True, nn.Identity()
                    counts["gelu"] += 1
        if type(module) is not Block:
            continue
        if _fusable_attention(module.attn):
            module.attn = FastViTAttention(module.attn)
            counts["attention"] += 1
            counts["layernorm"] += _norm_to_codes(module, QKV)
        if type(module.mlp) is Mlp:
            counts["layernorm"] += _norm_to_codes(module, FC1)
    return counts


def _norm_to_codes(block: Block, part: str) -> int:
    """Let the LayerNorm that folds into ``part`` (§3) output that int8 linear's input codes;
    1 if it did, 0 if the linear is not an int8 :class:`FastLinear` or the norm no LayerNorm."""
    norm_name = TIMM_VIT.folds[part]
    norm, linear = getattr(block, norm_name), block.get_submodule(TIMM_VIT.paths[part])
    if not isinstance(norm, nn.LayerNorm) or not isinstance(linear, FastLinear):
        return 0
    if linear.mode != "int8":
        return 0
    setattr(block, norm_name, LayerNormToCodes(norm, linear))
    return 1


class OneDNNLinear(nn.Module):
    """``nn.Linear`` on oneDNN's fp32 GEMM with the weight prepacked once (the kernel the fast
    engine's LUT linears use): the FP32 baseline "in the same engine" as the fast path's oneDNN
    int8 linears (on this project's AMD CPUs it is about 2.3x faster than torch's default MKL
    sgemm at ViT-Tiny shapes)."""

    def __init__(self, linear: nn.Linear, kernel: FastKernel) -> None:
        super().__init__()
        self.kernel = kernel
        self.packed = kernel.pack_float(linear.weight.detach())
        self.bias = None if linear.bias is None else linear.bias.detach()

    def forward(self, x: Tensor) -> Tensor:
        return self.kernel.linear_float(x, self.packed, self.bias)


def onednn_linears(model: nn.Module) -> nn.Module:
    """Put every plain ``nn.Linear`` of an FP32 model on :class:`OneDNNLinear` (in place)."""
    kernel = FastKernel()
    for name, module in list(model.named_modules()):
        if type(module) is nn.Linear:
            parent, _, leaf = name.rpartition(".")
            replacement = OneDNNLinear(module, kernel)
            setattr(model.get_submodule(parent) if parent else model, leaf, replacement)
    return model
