"""GEMM kernels behind the integer executor (:mod:`adalog.runtime.integer`) and the fast engine
(:mod:`adalog.runtime.fast`).

* :class:`ReferenceKernel` (engine ``reference``): exact int64 ``torch.matmul`` of integer
  operands. An operand reaches it as a list of *planes* whose weighted sum
  ``Σ_p plane_p · 2^(plane_bits·p)`` is the operand; the reference keeps one int64 plane.
  Nothing can overflow for the operand ranges the executor produces (|a| < 2^34: at most
  ``D·2^24`` with ``D <= 510``; |b| <= 128) below ``K = 2^22``.
* :class:`FastKernel` (engine ``fast``): PyTorch's int8 GEMMs with int32 accumulation, exact
  integer sums. Linear layers go through oneDNN's quantized linear
  (``torch.ops.onednn.qlinear_pointwise``: uint8 activation codes with their zero point x int8
  weight codes, prepacked once; the dequantization ``s_a·s_w[o]``, the bias, an optional GELU
  and an optional added tensor are applied inside the GEMM); batched matmuls (q·kᵀ) run one
  ``torch._int_mm`` per 2-D slice (image, head) on strided views, no copies. Log-coded operands
  never reach an integer GEMM in this engine: they are dequantized through a float LUT and
  multiplied in float32 (oneDNN's prepacked fp32 linear for linear layers, see
  :mod:`adalog.runtime.fast`). Single-plane uniform operands of the generic path (twin-uniform
  inputs) use ``_int_mm`` as well. Where an op is missing (a torch build without oneDNN, a CPU
  without an int8 GEMM) the kernel falls back, once and for good, to ``_int_mm`` and then to an
  exact int32 ``torch.matmul``, and records why (``fallback_reason``; ``stats`` counts calls
  per path). An op that raises also gets one :class:`KernelFallbackWarning` per op and kernel
  naming the error: the fallback is exact but slower, and the errors caught include
  ``TypeError``/``AttributeError``, which may be a bug rather than a missing op (a torch build
  without oneDNN is detected up front and does not warn). int32 accumulation is exact for
  ``K <= MAX_FAST_K``: ``|Σ a·b| <= K·2^15`` (uint8 x int8) and the generic path's zero-point
  corrections ``<= K·2^16`` (centred codes, zero points within ±128); larger K takes the int64
  path.

Threads: one model may be called from several threads at once. Scratch buffers are per thread
(:meth:`FastKernel.buffer`), the call counters and the fallback switches are updated under a
lock; nothing else in a kernel or in the fast engine's modules changes during a forward.
"""

from __future__ import annotations

import threading
import warnings
from dataclasses import dataclass
from itertools import product
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "ENGINES",
    "MAX_FAST_K",
    "FastKernel",
    "IntKernel",
    "KernelFallbackWarning",
    "ReferenceKernel",
    "make_kernel",
]

ENGINES = ("reference", "fast")
MAX_FAST_K = 2**14
_FALLBACK_ERRORS = (RuntimeError, AttributeError, NotImplementedError, TypeError)


class KernelFallbackWarning(RuntimeWarning):
    """An op of the fast kernel failed and an exact but slower fallback replaces it."""


class IntKernel:
    """Exact integer matmul over plane-split operands (see the module docstring)."""

    name = "abstract"
    code_dtype = torch.int64  # dtype of single-plane codes (uniform, twin)
    plane_bits = 0

    def __init__(self) -> None:
        self.stats: dict[str, int] = {}
        self._init_thread_state()

    def _init_thread_state(self) -> None:
        """The lock that guards ``stats`` (and a FastKernel's fallback state) across threads."""
        self._lock = threading.Lock()

    def plane_tables(self, values: Tensor) -> list[Tensor]:
        """Split a table of non-negative integers into per-plane tables."""
        return [values.to(torch.int64)]

    def combine(self, parts: list[Tensor]) -> Tensor:
        """``Σ_p parts[p] << (plane_bits·p)``, in int64 when there are several planes."""
        if len(parts) == 1:
            return parts[0]
        out = parts[0].to(torch.int64)
        for p, part in enumerate(parts[1:], start=1):
            out = out + (part.to(torch.int64) << (self.plane_bits * p))
        return out

    def matmul(self, planes: list[Tensor], b: Tensor) -> tuple[Tensor, Tensor]:
        """Exact ``a @ b`` of a plane-split ``a`` and an integer ``b``, and the row sums
        ``Σ_k a[..., k]`` (keepdim) that the zero-point correction needs."""
        raise NotImplementedError

    def _int64_matmul(self, planes: list[Tensor], b: Tensor) -> tuple[Tensor, Tensor]:
        a = self.combine([p.to(torch.int64) for p in planes]).to(torch.int64)
        return torch.matmul(a, b.to(torch.int64)), a.sum(-1, keepdim=True)

    def _count(self, key: str, n: int = 1) -> None:
        with self._lock:  # a read-modify-write: unlocked, concurrent forwards lose counts
            self.stats[key] = self.stats.get(key, 0) + n

    def __getstate__(self) -> dict[str, Any]:
        """Picklable / deep-copyable: locks and per-thread state are left out, rebuilt empty."""
        return {k: v for k, v in self.__dict__.items() if k not in ("_lock", "_local")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._init_thread_state()


class ReferenceKernel(IntKernel):
    """int64 ``torch.matmul``: slow, obviously exact, no range reasoning needed."""

    name = "reference"

    def matmul(self, planes: list[Tensor], b: Tensor) -> tuple[Tensor, Tensor]:
        self._count("int64_matmul")
        return self._int64_matmul(planes, b)


@dataclass
class PackedInt8:
    """int8 weight codes ``[O, K]`` of a linear layer in the layouts the kernel may use."""

    w8t: Tensor  # [K, O] contiguous, for torch._int_mm
    colsum: Tensor  # Σ_k w8[o, k] as float32 [O]
    onednn: Tensor | None  # oneDNN-prepacked weight, None if oneDNN is unavailable


@dataclass
class PackedFloat:
    """float32 weight ``[O, K]`` of a linear layer, oneDNN-prepacked where possible."""

    weight: Tensor
    onednn: Tensor | None


class FastKernel(IntKernel):
    """int8 GEMMs with int32 accumulation (oneDNN, ``torch._int_mm``); see the module docstring."""

    name = "fast"
    code_dtype = torch.int8

    def __init__(self) -> None:
        super().__init__()
        self.fallback_reason: str | None = None
        self.use_onednn = _onednn_available()
        self.use_int_mm = True
        self._warned: set[str] = set()  # ops whose fallback has been announced

    def _init_thread_state(self) -> None:
        super()._init_thread_state()
        self._local = threading.local()  # .buffers: this thread's scratch tensors by tag

    def buffer(self, tag: str, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
        """A reused scratch tensor (uninitialised) of the calling thread for intermediate ``tag``.

        Large temporaries are reused across calls and layers instead of being allocated anew:
        fresh multi-MB allocations cost page faults, about a fifth of the runtime at batch 32.
        Only for values that die inside one layer's forward (a forward must not nest in
        another on the same thread). Per thread, so that concurrent forwards of one model do not
        overwrite each other's intermediates; each calling thread holds its own set (about
        110 MB for ViT-Tiny at batch 32: four [B, H, N, N] attention buffers and both of fc2's
        inputs), freed when the thread ends.
        """
        try:
            buffers = self._local.buffers
        except AttributeError:
            buffers = self._local.buffers = {}
        buf = buffers.get(tag)
        if buf is None or buf.shape != shape or buf.dtype != dtype:
            buf = buffers[tag] = torch.empty(shape, dtype=dtype)
        return buf

    def _fall_back(self, op: str, exc: BaseException, instead: str) -> None:
        """Record why ``op`` is no longer used and warn, once per op and kernel."""
        with self._lock:
            if self.fallback_reason is None:
                self.fallback_reason = f"{op} unavailable: {exc}".splitlines()[0]
            if op in self._warned:
                return
            self._warned.add(op)
        warnings.warn(
            f"fast kernel: {op} failed ({type(exc).__name__}: {exc}); using {instead} instead "
            "(exact, slower)",
            KernelFallbackWarning,
            stacklevel=3,
        )

    # --- generic single-plane path (int_bilinear) ----------------------------------------------

    def plane_tables(self, values: Tensor) -> list[Tensor]:
        raise NotImplementedError("the fast engine dequantizes log operands through a float LUT")

    def matmul(self, planes: list[Tensor], b: Tensor) -> tuple[Tensor, Tensor]:
        """Single-plane int8 ``a @ b`` and row sums of ``a`` (``b`` gains a column of ones)."""
        if len(planes) != 1:
            raise ValueError("the fast kernel takes single-plane (int8) operands")
        if planes[0].shape[-1] > MAX_FAST_K:
            self._count("int64_matmul_large_k")
            return self._int64_matmul(planes, b)
        n = b.shape[-1]
        ones = torch.ones(*b.shape[:-1], 1, dtype=torch.int8)
        out = self.bmm(planes[0].to(torch.int8), torch.cat([b.to(torch.int8), ones], dim=-1))
        return out[..., :n], out[..., n:]

    # --- int8 GEMMs ---------------------------------------------------------------------------

    def mm(self, a8: Tensor, b8: Tensor, out: Tensor | None = None) -> Tensor:
        """int32 ``a8 @ b8`` of 2-D int8 matrices (strided views are fine; ``out`` contiguous)."""
        if out is None:
            out = torch.empty(a8.shape[0], b8.shape[1], dtype=torch.int32)
        if self.use_int_mm:
            try:
                torch._int_mm(a8, b8, out=out)
                self._count("int_mm")
                return out
            except _FALLBACK_ERRORS as exc:
                self._fall_back("torch._int_mm", exc, "an int32 torch.matmul")
                self.use_int_mm = False
        self._count("int32_matmul_fallback")
        return torch.matmul(a8.to(torch.int32), b8.to(torch.int32), out=out)

    def bmm(self, a8: Tensor, b8: Tensor) -> Tensor:
        """int32 ``a8 @ b8`` batched like ``torch.matmul``: one 2-D GEMM per slice, on views."""
        if b8.dim() == 2:
            k = a8.shape[-1]
            flat = a8.reshape(-1, k)
            return self.mm(flat, b8).reshape(*a8.shape[:-1], b8.shape[-1])
        batch = torch.broadcast_shapes(a8.shape[:-2], b8.shape[:-2])
        m, n = a8.shape[-2], b8.shape[-1]
        a8 = a8.expand(*batch, *a8.shape[-2:])
        b8 = b8.expand(*batch, *b8.shape[-2:])
        out = torch.empty(*batch, m, n, dtype=torch.int32)
        for index in product(*map(range, batch)):
            self.mm(a8[index], b8[index], out[index])
        return out

    # --- linear layers ------------------------------------------------------------------------

    def pack_int8(self, w8: Tensor) -> PackedInt8:
        """Prepack int8 weight codes ``[O, K]`` once (oneDNN layout if available)."""
        w8 = w8.to(torch.int8).contiguous()
        packed = None
        if self.use_onednn:
            try:
                packed = torch.ops.onednn.qlinear_prepack(w8, None)
            except _FALLBACK_ERRORS as exc:
                self._fall_back("oneDNN qlinear", exc, "torch._int_mm + a float epilogue")
                self.use_onednn = False
        colsum = w8.sum(1, dtype=torch.float32)
        return PackedInt8(w8.t().contiguous(), colsum, packed)

    def qlinear(
        self,
        codes: Tensor,
        x_scale: float,
        x_zero: int,
        weight: PackedInt8,
        w_scale: Tensor,
        bias: Tensor | None,
        add: Tensor | None = None,
        gelu: bool = False,
    ) -> Tensor:
        """``[gelu](s_a·s_w[o]·Σ_k (codes - x_zero)·w8[o, k] + bias + add)`` in float32.

        ``codes``: uint8 ``[M, K]``; the integer sum is exact (int32); ``add`` (``[M, O]``)
        is consumed (written into) when given.
        """
        if weight.onednn is not None and self.use_onednn:
            try:
                return self._qlinear_onednn(
                    codes, x_scale, x_zero, weight, w_scale, bias, add, gelu
                )
            except _FALLBACK_ERRORS as exc:
                self._fall_back("oneDNN qlinear", exc, "torch._int_mm + a float epilogue")
                self.use_onednn = False
        centred = codes.bitwise_xor(128).view(torch.int8)  # codes - 128, exactly
        acc = self.mm(centred, weight.w8t).to(torch.float32)
        acc.add_(weight.colsum * (128 - x_zero)).mul_(x_scale * w_scale)
        if bias is not None:
            acc.add_(bias)
        if add is not None:
            acc.add_(add)
        return torch.ops.aten.gelu_(acc) if gelu else acc

    def _qlinear_onednn(self, codes, x_scale, x_zero, weight, w_scale, bias, add, gelu) -> Tensor:
        zeros = torch.zeros(w_scale.shape, dtype=torch.int64)
        ops = torch.ops.onednn.qlinear_pointwise
        if add is None:
            post = "gelu" if gelu else "none"
            out = ops(
                codes, x_scale, x_zero, weight.onednn, w_scale, zeros, bias,
                1.0, 0, torch.float32, post, [], "none",
            )  # fmt: skip
            self._count("onednn_qlinear")
            return out
        # oneDNN takes no unary post-op after a binary one: GELU runs in place afterwards
        out = ops.binary(
            codes, x_scale, x_zero, weight.onednn, w_scale, zeros, add, bias,
            1.0, 0, torch.float32, 1.0, 0, "sum", 1.0, "none", [], "",
        )  # fmt: skip
        self._count("onednn_qlinear")
        return torch.ops.aten.gelu_(out) if gelu else out

    def pack_float(self, weight: Tensor) -> PackedFloat:
        """Prepack a float32 weight ``[O, K]`` for oneDNN's fp32 linear (MKL's sgemm, the
        default ``F.linear`` path, is ~2.3x slower on AMD Zen 5 at these shapes)."""
        weight = weight.to(torch.float32).contiguous()
        packed = None
        if self.use_onednn:
            try:
                packed = torch.ops.mkldnn._reorder_linear_weight(weight, None)
            except _FALLBACK_ERRORS as exc:
                self._fall_back("oneDNN fp32 linear", exc, "F.linear")
        return PackedFloat(weight, packed)

    def linear_float(self, x: Tensor, weight: PackedFloat, bias: Tensor | None) -> Tensor:
        """float32 ``x @ weightᵀ + bias``."""
        if weight.onednn is not None:
            try:
                out = torch.ops.mkldnn._linear_pointwise(x, weight.onednn, bias, "none", [], "")
                self._count("onednn_linear_fp32")
                return out
            except _FALLBACK_ERRORS as exc:
                self._fall_back("oneDNN fp32 linear", exc, "F.linear")
                weight.onednn = None
        self._count("linear_fp32")
        return F.linear(x, weight.weight, bias)


def _onednn_available() -> bool:
    return bool(torch.backends.mkldnn.is_available()) and hasattr(torch.ops, "onednn")


def make_kernel(engine: str) -> IntKernel:
    """The kernel of engine ``reference`` or ``fast``."""
    if engine == "reference":
        return ReferenceKernel()
    if engine == "fast":
        return FastKernel()
    raise ValueError(f"integer engine must be one of {ENGINES}, got {engine!r}")
