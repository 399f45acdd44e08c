"""Exact integer GEMM kernels behind the integer executor (:mod:`adalog.runtime.integer`).

An operand reaches a kernel as a list of *planes*: integer tensors whose weighted sum
``Σ_p plane_p · 2^(plane_bits·p)`` is the operand (uniform codes are a single plane). Both
kernels compute ``Σ_p (plane_p @ b) << (plane_bits·p)`` (batched like ``torch.matmul``)
*exactly*; they differ only in how:

* :class:`ReferenceKernel` keeps one int64 plane and multiplies with int64 ``torch.matmul``.
  Nothing can overflow for the operand ranges the executor produces (|a| < 2^34: at most
  ``D·2^24`` with ``D <= 510``; |b| <= 128) below ``K = 2^22``.
* :class:`FastKernel` feeds int8 planes to PyTorch's int8 GEMM ``torch._int_mm`` (int32
  accumulation). ``b`` must fit int8 (the executor centres uniform codes to ``[-H, H-1]``);
  wider ``a`` values (AdaLog fixed-point numerators, always non-negative) are split into 7-bit
  planes, one GEMM each, recombined in int64. Single-plane accumulators and their zero-point
  corrections stay int32: ``|Σ(a-za)(b-zb)| <= K·2^16`` for centred codes and zero points of
  magnitude <= 128, so ``K <= MAX_FAST_K = 2^14`` is overflow-free; larger K uses the int64
  path, and the executor widens to int64 itself for zero points beyond 128. Where
  ``torch._int_mm`` raises (older torch, a device or shape it does not take) the kernel falls
  back to an exact int32 ``torch.matmul`` and records why (``fallback_reason``, ``stats``).
  Batched products run one ``_int_mm`` per 2-D slice (per head and image).

Both are exact, so the executor's results do not depend on the kernel: the two engines give
bit-identical logits.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["ENGINES", "MAX_FAST_K", "FastKernel", "IntKernel", "ReferenceKernel", "make_kernel"]

ENGINES = ("reference", "fast")
MAX_FAST_K = 2**14
_INT8_MAX = 127


class IntKernel:
    """Exact integer matmul over plane-split operands (see the module docstring)."""

    name = "abstract"
    code_dtype = torch.int64  # dtype of single-plane codes (uniform, twin)
    plane_bits = 0

    def __init__(self) -> None:
        self.stats: dict[str, int] = {}

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
        self.stats[key] = self.stats.get(key, 0) + n


class ReferenceKernel(IntKernel):
    """int64 ``torch.matmul``: slow, obviously exact, no range reasoning needed."""

    name = "reference"

    def matmul(self, planes: list[Tensor], b: Tensor) -> tuple[Tensor, Tensor]:
        self._count("int64_matmul")
        return self._int64_matmul(planes, b)


class FastKernel(IntKernel):
    """int8 x int8 -> int32 GEMMs through ``torch._int_mm`` (see the module docstring)."""

    name = "fast"
    code_dtype = torch.int8
    plane_bits = 7

    def __init__(self) -> None:
        super().__init__()
        self.fallback_reason: str | None = None

    def plane_tables(self, values: Tensor) -> list[Tensor]:
        values = values.to(torch.int64)
        if int(values.min()) < 0:
            raise ValueError("plane splitting needs non-negative values")
        n_planes = max(1, -(-int(values.max()).bit_length() // self.plane_bits))
        masks = [(values >> (self.plane_bits * p)) & _INT8_MAX for p in range(n_planes)]
        return [m.to(torch.int8) for m in masks]

    def matmul(self, planes: list[Tensor], b: Tensor) -> tuple[Tensor, Tensor]:
        """Row sums come out of the same GEMMs: ``b`` gains a column of ones."""
        n = b.shape[-1]
        if planes[0].shape[-1] > MAX_FAST_K:
            self._count("int64_matmul_large_k")
            return self._int64_matmul(planes, b)
        ones = torch.ones(*b.shape[:-1], 1, dtype=torch.int8)
        b8 = torch.cat([b.to(torch.int8), ones], dim=-1)
        out = self.combine([self._gemm(p.to(torch.int8), b8) for p in planes])
        return out[..., :n], out[..., n:]

    def _gemm(self, a8: Tensor, b8: Tensor) -> Tensor:
        """int32 ``a8 @ b8``, batched over leading dims by one ``_int_mm`` per 2-D slice."""
        m, k, n = a8.shape[-2], a8.shape[-1], b8.shape[-1]
        if b8.dim() == 2:
            out = torch.empty(a8.numel() // k, n, dtype=torch.int32)
            self._mm2d(a8.reshape(-1, k), b8, out)
            return out.reshape(*a8.shape[:-1], n)
        batch = torch.broadcast_shapes(a8.shape[:-2], b8.shape[:-2])
        a3 = a8.expand(*batch, m, k).reshape(-1, m, k)
        b3 = b8.expand(*batch, k, n).reshape(-1, k, n)
        out = torch.empty(a3.shape[0], m, n, dtype=torch.int32)
        for i in range(a3.shape[0]):
            self._mm2d(a3[i], b3[i], out[i])
        return out.reshape(*batch, m, n)

    def _mm2d(self, a8: Tensor, b8: Tensor, out: Tensor) -> None:
        if self.fallback_reason is None:
            try:
                torch._int_mm(a8, b8, out=out)
                self._count("int_mm")
                return
            except (RuntimeError, AttributeError, NotImplementedError, TypeError) as exc:
                self.fallback_reason = f"torch._int_mm unavailable: {exc}".splitlines()[0]
        self._count("int32_matmul_fallback")
        torch.matmul(a8.to(torch.int32), b8.to(torch.int32), out=out)


def make_kernel(engine: str) -> IntKernel:
    """The kernel of engine ``reference`` or ``fast``."""
    if engine == "reference":
        return ReferenceKernel()
    if engine == "fast":
        return FastKernel()
    raise ValueError(f"integer engine must be one of {ENGINES}, got {engine!r}")
