"""Integer reference executor: run an exported artifact with integer products (issue 7).

The model keeps its timm structure (built by :func:`adalog.pipelines.export.fake_quant_model`),
and every quantized product is swapped for an integer one (by
:func:`adalog.runtime.builder.build_integer_model`) built from the artifact: the packed
weight codes, the per-row weight scales/zero points and the activation quantizers' parameters.
The FP32 weights are not used (the replacements hold none).

What runs in integers. Each quantized operand is turned into integer codes with exactly the
quantizer's own rounding (so codes equal the fake-quant model's codes for equal inputs), then

* **uniform x uniform** (every linear input, q·kᵀ, attn·v with a uniform post-Softmax
  quantizer): ``Σ (a - za)(b - zb) = Σ a·b - zb·Σa - za·(Σb - K·zb)``: one integer GEMM of the
  raw codes (centred to ``[-H, H-1]`` so that they fit int8), zero points applied through the row
  sums of ``a`` and column sums of ``b``, never by dequantizing first.
* **log x uniform** (attn·v with AdaLog/Log2/Log-√2 probabilities, the post-GELU fc2 input):
  the table form of §1.6, ``x̂ = s·2^(-T1[k])·(D·T2[k])/D``, in fixed point with ``F``
  fractional bits: code ``k`` becomes the integer ``a_k = (D·T2[k]) << (F - T1[k])`` (the LUT
  numerator shifted), the zero state becomes 0, and ``s/(D·2^F)`` is applied to the integer
  accumulator. ``F = min(max T1, 24)``, so the table form is reproduced *exactly* whenever
  ``T1[N-1] <= 24`` (every q <= 61 at 4 bits; the W4A4 ViT-Tiny artifact uses q <= 44); codes
  with ``T1 > 24`` (values below ``2^-24·s``) are rounded to the nearest multiple of
  ``2^-24·s/D``. Log2 is the same with ``D = 1, T1[k] = k``; Log-√2 splits codes by parity into
  two integer accumulators, the odd one multiplied by √2 in float at the end (the "float
  multiply at dequantization" the method attributes to Log-√2). An unfolded post-GELU shift
  (§4) is applied as ``-shift·Σ b̂`` from the column sums; a folded one is already in the bias.
* **twin uniform** (PTQ4ViT fc2 input): positive and negative codes accumulate separately,
  scaled by ``s_pos`` and ``s_neg``.

Accumulators are exact integers: int64 in the reference kernel (int32 from int8 GEMMs where the
fast engine reuses these modules; overflow bounds in :mod:`adalog.runtime.kernels`). Each
accumulator is then converted to float32 once and multiplied by its combined scale
(``s_a·s_w[o]``, per head for matmuls); biases are added in float. That dequantized float
output is what the method keeps between layers (§2.3: matmul and linear outputs are float), and
the next quantizer requantizes it.

What stays float, as in the method (§2.3): the patch-embedding conv's image input (float image x
integer weight codes, ``s_w[o]`` applied after the conv), LayerNorm, Softmax (and its scale),
GELU, residual adds, biases, cls/position embeddings, Swin's relative position bias.

Refused (:class:`ArtifactError`): per-channel activation scales on a linear input, a quantized
conv input, identity (32-bit) matmul operands, a non-uniform B operand, an AdaLog LUT or T1
table that does not match its q.

Agreement with the fake-quant model (``fake_quant_model``) of the same artifact. Given the
same inputs, every integer layer reproduces its fake-quant layer to float32 rounding (<= 3e-6
relative). End to end the float32 logits differ only by such rounding, but a 4-bit network
amplifies it: a value that lands within rounding of a code boundary flips one code. Tolerances
(tests/test_runtime.py):

* random test models (ViT, Swin; W4A4, W3A4, W6A6; every post-GELU/post-Softmax quantizer):
  float32 max |Δlogit| / max |logit| < 1e-5 (measured <= 3.0e-7), same argmax;
* float64 everywhere (both models, fake-quant T2 as the exact ``(D·T2)/D``): < 1e-12
  (measured <= 7.5e-16, also on the W4A4 ViT-Tiny artifact over all 468 dev-rest images: same
  argmax on every image). This is the exact check: a single differing code would show.
* the W4A4 ViT-Tiny in float32 is chaotic: scaling the input by 1 ± 1e-7 alone changes the
  fake-quant model's argmax on ~14 % of dev-rest images (top-1 0.592 -> 0.581 / 0.573); the
  integer engines agree with it on 75 % (top-1 0.562; float64 exact model: 0.564).

The ``fast`` engine (:mod:`adalog.runtime.fast`) runs the same artifact with int8 GEMMs and
float LUTs for the log-coded operands; its integer sums are exact too, but it is not
bit-identical: it agrees with this executor to float32 rounding per layer (see that module).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adalog.errors import ArtifactError
from adalog.models.qmodules import QuantConv2d, QuantLinear, QuantMatMul
from adalog.pipelines.export import Artifact
from adalog.quant import LogQuantizer, TwinUniformQuantizer, UniformQuantizer
from adalog.quant.log import _U_MIN, ADALOG_R
from adalog.runtime.artifact import log_tables, weight_codes
from adalog.runtime.kernels import IntKernel

__all__ = [
    "FRACTION_BITS_MAX",
    "Coded",
    "IntConv2d",
    "IntLinear",
    "IntMatMul",
    "int_bilinear",
]

FRACTION_BITS_MAX = 24
"""Cap on the fixed-point fraction bits F of log-coded operands (keeps int64 safe, see above)."""


@dataclass
class Coded:
    """An integer-coded operand: ``value = Σ_g mults[g]·(codes[g] - zeros[g]) + offset``.

    ``codes[g]`` is a list of planes (see :mod:`adalog.runtime.kernels`); ``zeros[g]`` is
    ``None`` for zero-free groups (log, twin).
    """

    codes: list[list[Tensor]]
    zeros: list[Tensor | None]
    mults: list[Tensor]
    offset: float = 0.0


def int_bilinear(a: Coded, b: Coded, kernel: IntKernel, b_colsum: Tensor | None = None) -> Tensor:
    """``â @ b̂`` from integer GEMMs; ``b`` is one single-plane uniform group (weights, kᵀ, v).

    Per group: ``Σ(a-za)(b-zb) = a@b - zb·rowsum(a) - za·(colsum(b) - K·zb)``, exact in
    integers, then one float conversion times ``mult_a·mult_b``.
    """
    b_codes, b_zero, b_mult = b.codes[0][0], b.zeros[0], b.mults[0]
    k = b_codes.shape[-2]
    if b_colsum is None:
        b_colsum = b_codes.sum(-2, keepdim=True, dtype=torch.int64)
    b_centred = b_colsum - k * b_zero  # Σ_k (b - zb), per output column
    out = None
    for planes, zero, mult in zip(a.codes, a.zeros, a.mults, strict=True):
        acc, rowsum = kernel.matmul(planes, b_codes)
        if acc.dtype == torch.int32 and not _int32_safe(zero, b_zero):
            acc, rowsum = acc.to(torch.int64), rowsum.to(torch.int64)
        acc = acc.addcmul_(rowsum, b_zero.to(acc.dtype), value=-1)
        if zero is not None:
            acc = acc.sub_(zero.to(acc.dtype) * b_centred.to(acc.dtype))
        term = acc.to(b_mult.dtype).mul_(mult * b_mult)
        out = term if out is None else out.add_(term)
    if a.offset:
        out = out + a.offset * (b_mult * b_centred.to(b_mult.dtype))
    return out


def _int32_safe(*zeros: Tensor | None) -> bool:
    """int32 zero-point corrections are overflow-free for centred zero points within ±128."""
    return all(z is None or int(z.abs().max()) <= 128 for z in zeros)


class UniformCoder(nn.Module):
    """Asymmetric uniform codes (§1.2), centred to ``[-H, H-1]``, zero point centred alike.

    Same float steps as the fake quantizer (``round(x/s) + round(z)``, clamped), so the codes
    are the fake-quant codes minus H.
    """

    def __init__(self, quant: UniformQuantizer, code_dtype: torch.dtype) -> None:
        super().__init__()
        self.half = 2 ** (quant.n_bits - 1)
        self.code_dtype = code_dtype
        zero_centred = torch.round(quant.zero_point.detach()) - self.half
        self.register_buffer("scale", quant.scale.detach().clone(), persistent=False)
        self.register_buffer("offset", zero_centred.clone(), persistent=False)
        self.register_buffer("zero", zero_centred.long(), persistent=False)

    def forward(self, x: Tensor) -> Coded:
        codes = (x / self.scale).round_().add_(self.offset).clamp_(-self.half, self.half - 1)
        return Coded([[codes.to(self.code_dtype)]], [self.zero], [self.scale])


class TwinCoder(nn.Module):
    """Twin-uniform codes (§1.3): the positive and negative branches as two zero-free groups."""

    def __init__(self, quant: TwinUniformQuantizer, code_dtype: torch.dtype) -> None:
        super().__init__()
        self.quant, self.code_dtype = quant, code_dtype

    def forward(self, x: Tensor) -> Coded:
        codes = self.quant.quantize(x)
        pos = codes.clamp(min=0).to(self.code_dtype)
        neg = codes.clamp(max=0).to(self.code_dtype)
        mults = [self.quant.s_pos, self.quant.s_neg]
        return Coded([[pos], [neg]], [None, None], mults)


def _fixed_point(numerators: Tensor, shifts: Tensor, frac_bits: int) -> Tensor:
    """``round(n·2^(F - t))`` exactly in integers: a left shift, or a rounding right shift."""
    out = []
    for n, t in zip(numerators.tolist(), shifts.tolist(), strict=True):
        if t <= frac_bits:
            out.append(n << (frac_bits - t))
        else:
            drop = t - frac_bits
            out.append((n + (1 << (drop - 1))) >> drop)
    return torch.tensor(out, dtype=torch.int64)


def log_index(x: Tensor, quant: LogQuantizer) -> Tensor:
    """Log code per element with the zero state as ``N`` (int32): ``quant.quantize`` computed
    with the same float steps, in place, without int64 intermediates."""
    e = (x + quant.shift).div_(quant.scale).clamp_(_U_MIN, 1.0).log2_().neg_()
    if quant.kind == "logsqrt2":
        e = e.mul_(2)
    elif quant.kind == "adalog":
        e = e.mul_(ADALOG_R).div_(quant.q)
    return e.round_().clamp_(max=quant.n_levels).to(torch.int32)


class LogCoder(nn.Module):
    """Log2 / Log-√2 / AdaLog codes as fixed-point integers (table form, §1.4-§1.6).

    Code ``k`` maps through a per-group table to ``a_k = n_k << (F - t_k)`` (``n`` the LUT
    numerator, ``t`` the shift); the zero state (code N) maps to 0 in every group. The tables
    are split into the kernel's planes once, so coding is one gather per plane.
    """

    def __init__(self, quant: LogQuantizer, tables: tuple[Tensor, Tensor, int], kernel):
        super().__init__()
        self.quant = quant
        numerators, shifts, denominator = tables
        self.frac_bits = min(int(shifts.max()), FRACTION_BITS_MAX)
        values = _fixed_point(numerators, shifts, self.frac_bits)
        odd = torch.arange(quant.n_levels) % 2 == 1
        if quant.kind == "logsqrt2":
            groups, factors = [~odd, odd], [1.0, math.sqrt(2.0)]
        else:
            groups, factors = [torch.ones_like(odd)], [1.0]
        self.plane_counts = []
        for g, member in enumerate(groups):
            table = torch.cat([torch.where(member, values, 0), values.new_zeros(1)])
            planes = kernel.plane_tables(table)
            for p, plane in enumerate(planes):
                self.register_buffer(f"table{g}_{p}", plane, persistent=False)
            self.plane_counts.append(len(planes))
        unit = 1.0 / (denominator * 2.0**self.frac_bits)
        self.factors = [f * unit for f in factors]
        folded = bool(quant.shift_folded) or float(quant.shift) == 0.0
        self.offset = 0.0 if folded else -float(quant.shift)

    def forward(self, x: Tensor) -> Coded:
        k = log_index(x, self.quant)
        flat = k.reshape(-1)
        codes = [
            [getattr(self, f"table{g}_{p}").index_select(0, flat).view(k.shape) for p in range(n)]
            for g, n in enumerate(self.plane_counts)
        ]
        mults = [self.quant.scale * f for f in self.factors]
        return Coded(codes, [None] * len(codes), mults, self.offset)


def _coder(artifact: Artifact, prefix: str, quant: nn.Module | None, kernel: IntKernel):
    """The integer coder of an activation quantizer, or ``None`` for a float input."""
    if quant is None or getattr(quant, "is_identity", False):
        return None
    if isinstance(quant, UniformQuantizer):
        return UniformCoder(quant, kernel.code_dtype)
    if isinstance(quant, TwinUniformQuantizer):
        return TwinCoder(quant, kernel.code_dtype)
    if isinstance(quant, LogQuantizer):
        return LogCoder(quant, log_tables(artifact, prefix, quant), kernel)
    raise ArtifactError(f"{prefix}: no integer execution for {type(quant).__name__}")


class _IntWeight(nn.Module):
    """Weight codes of one layer as a uniform operand ``[K, O]`` (centred), plus its sums."""

    def __init__(self, artifact: Artifact, name: str, kernel: IntKernel) -> None:
        super().__init__()
        weight = weight_codes(artifact, name)
        half = 2 ** (weight.bits - 1)
        self.shape = weight.shape
        codes = (weight.rows - half).t().contiguous().to(kernel.code_dtype)
        self.register_buffer("codes", codes, persistent=False)
        self.register_buffer("zero", weight.zero - half, persistent=False)
        self.register_buffer("scale", weight.scale, persistent=False)
        colsum = self.codes.sum(0, keepdim=True, dtype=torch.int64)
        self.register_buffer("colsum", colsum, persistent=False)

    def operand(self) -> Coded:
        return Coded([[self.codes]], [self.zero], [self.scale])

    def integer_rows(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """``codes - zero`` per output row as floats (exact small integers), shape ``[O, K]``."""
        return (self.codes.to(torch.int64) - self.zero[None, :]).t().to(dtype)


class IntLinear(nn.Module):
    """Linear from weight codes; integer GEMM for quantized inputs, float x codes otherwise."""

    def __init__(self, artifact: Artifact, name: str, module: QuantLinear, kernel: IntKernel):
        super().__init__()
        self.weight_int = _IntWeight(artifact, name, kernel)
        self.coder = _coder(artifact, f"{name}.input_quant", module.input_quant, kernel)
        if isinstance(self.coder, UniformCoder) and self.coder.scale.numel() != 1:
            raise ArtifactError(f"{name}: per-channel input scales cannot be factored out")
        bias = None if module.bias is None else module.bias.detach().clone()
        self.register_buffer("bias", bias, persistent=False)
        self.kernel = kernel
        self.in_features, self.out_features = module.in_features, module.out_features

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        x = x.reshape(-1, self.in_features)
        w = self.weight_int
        if self.coder is None:
            out = F.linear(x, w.integer_rows(x.dtype)) * w.scale
        else:
            out = int_bilinear(self.coder(x), w.operand(), self.kernel, w.colsum)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*lead, self.out_features)


class IntConv2d(nn.Module):
    """Patch-embedding conv: float image x integer weight codes, ``s_w[o]`` applied after."""

    def __init__(self, artifact: Artifact, name: str, module: QuantConv2d, kernel: IntKernel):
        super().__init__()
        if module.input_quant is not None and not module.input_quant.is_identity:
            raise ArtifactError(f"{name}: quantized conv inputs are not supported (image is FP)")
        weight = _IntWeight(artifact, name, kernel)
        self.register_buffer("weight_rows", weight.integer_rows().reshape(weight.shape), False)
        self.register_buffer("scale", weight.scale.reshape(1, -1, 1, 1), persistent=False)
        bias = None if module.bias is None else module.bias.detach().reshape(1, -1, 1, 1)
        self.register_buffer("bias", bias, persistent=False)
        self.stride, self.padding = module.stride, module.padding
        self.dilation, self.groups = module.dilation, module.groups

    def forward(self, x: Tensor) -> Tensor:
        out = F.conv2d(
            x, self.weight_rows, None, self.stride, self.padding, self.dilation, self.groups
        )
        out = out * self.scale
        return out if self.bias is None else out + self.bias


class IntMatMul(nn.Module):
    """``a @ b`` of two coded activations (q·kᵀ or attn·v); b must be uniform."""

    def __init__(self, artifact: Artifact, name: str, module: QuantMatMul, kernel: IntKernel):
        super().__init__()
        coders = [
            _coder(artifact, f"{name}.{side}_quant", getattr(module, f"{side}_quant"), kernel)
            for side in ("a", "b")
        ]
        if coders[0] is None or not isinstance(coders[1], UniformCoder):
            raise ArtifactError(f"{name}: integer matmul needs a quantized A and a uniform B")
        self.a_coder, self.b_coder = coders
        self.kernel = kernel

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        return int_bilinear(self.a_coder(a), self.b_coder(b), self.kernel)
