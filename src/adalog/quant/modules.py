"""nn.Module quantizers: thin state holders over the functional core.

State lives in buffers so that ``state_dict`` saves and restores it. Mode follows
``nn.Module.training``: in eval mode ``forward`` is the hard fake quantizer used for calibration
and evaluation (AdaLog with its tables); in training mode (block reconstruction only, §7) rounding
is straight-through and AdaLog uses the exact power (§10 item 5). Modules start in training mode
like every ``nn.Module``, so call ``.eval()`` before calibrating or evaluating. To train a scale,
call ``quantizer.scale.requires_grad_(True)`` and hand the buffer to the optimizer.

A quantizer built with ``n_bits = 32`` is the identity (§1) and has no integer codes.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from adalog.quant.log import (
    LOG_KINDS,
    Q_INIT,
    adalog_tables,
    log_codes,
    log_dequant,
    log_fake_quant,
    tables_to_levels,
)
from adalog.quant.uniform import (
    asym_codes,
    asym_dequant,
    asym_fake_quant,
    twin_codes,
    twin_fake_quant,
)

__all__ = [
    "IDENTITY_BITS",
    "LogQuantizer",
    "TwinUniformQuantizer",
    "UniformQuantizer",
    "check_n_bits",
]

IDENTITY_BITS = 32


def check_n_bits(n_bits: int) -> int:
    """Validate a bit-width: 2..8 quantize, 32 means identity (no quantization)."""
    try:
        bits = operator.index(n_bits)
    except TypeError:
        bits = None
    if isinstance(n_bits, bool) or bits is None or not (2 <= bits <= 8 or bits == IDENTITY_BITS):
        raise ValueError(
            f"n_bits must be an integer in 2..8, or {IDENTITY_BITS} for an identity "
            f"(unquantized) quantizer; got {n_bits!r}"
        )
    return int(bits)


def _assigned(buffer: Tensor, value: Tensor | float) -> Tensor:
    """Copy ``value`` into ``buffer`` in place, or return a new tensor if the shape changes."""
    value = torch.as_tensor(value, dtype=buffer.dtype, device=buffer.device).detach()
    if value.shape != buffer.shape:
        return value.clone()
    with torch.no_grad():
        buffer.copy_(value)
    return buffer


class _Quantizer(nn.Module):
    """Common base: bit-width bookkeeping and the identity case."""

    def __init__(self, n_bits: int) -> None:
        super().__init__()
        self.n_bits = check_n_bits(n_bits)

    @property
    def is_identity(self) -> bool:
        return self.n_bits == IDENTITY_BITS

    def _require_codes(self) -> None:
        if self.is_identity:
            raise RuntimeError("a 32-bit (identity) quantizer has no integer codes")


class UniformQuantizer(_Quantizer):
    """Asymmetric uniform quantizer (§1.2) with ``scale``/``zero_point`` of a broadcast shape.

    The caller picks ``shape`` to broadcast against its tensor: ``(O, 1)`` per weight row,
    ``(1, Hh, 1, 1)`` per head, ``(C,)`` per channel, ``(1,)`` per tensor. Loading a state dict
    whose buffers have another shape resizes them (e.g. a per-channel calibration followed by a
    per-tensor fold).
    """

    def __init__(
        self,
        n_bits: int,
        shape: Sequence[int] = (1,),
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(n_bits)
        self.register_buffer("scale", torch.ones(tuple(shape), device=device, dtype=dtype))
        self.register_buffer("zero_point", torch.zeros(tuple(shape), device=device, dtype=dtype))

    def set_params(self, scale: Tensor | float, zero_point: Tensor | float) -> None:
        """Set scale and zero point; a new shape replaces the buffer (and its grad flag)."""
        self.scale = _assigned(self.scale, scale)
        self.zero_point = _assigned(self.zero_point, zero_point)

    def forward(self, x: Tensor) -> Tensor:
        if self.is_identity:
            return x
        return asym_fake_quant(x, self.scale, self.zero_point, self.n_bits, ste=self.training)

    def quantize(self, x: Tensor) -> Tensor:
        """Integer codes in ``[0, N-1]`` (int64)."""
        self._require_codes()
        return asym_codes(x, self.scale, self.zero_point, self.n_bits).long()

    def dequantize(self, codes: Tensor) -> Tensor:
        self._require_codes()
        return asym_dequant(codes.to(self.scale.dtype), self.scale, self.zero_point)

    def representable_values(self) -> Tensor:
        """Sorted distinct values the quantizer can output (over all groups)."""
        self._require_codes()
        codes = torch.arange(2**self.n_bits, dtype=self.scale.dtype, device=self.scale.device)
        grid = (codes[:, None] - torch.round(self.zero_point.reshape(1, -1))) * self.scale.reshape(
            1, -1
        )
        return torch.unique(grid)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        for name in ("scale", "zero_point"):
            incoming = state_dict.get(prefix + name)
            current = getattr(self, name)
            if incoming is not None and incoming.shape != current.shape:
                setattr(self, name, current.new_empty(incoming.shape))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"n_bits={self.n_bits}, shape={tuple(self.scale.shape)}"


class TwinUniformQuantizer(_Quantizer):
    """PTQ4ViT twin-uniform quantizer (§1.3) with scalar buffers ``s_pos`` and ``s_neg``.

    ``quantize`` returns one signed code per element in ``[-H, H-1]``: non-negative codes use
    ``s_pos``, negative codes use ``s_neg`` (at most one branch is non-zero per element).
    """

    def __init__(
        self,
        n_bits: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(n_bits)
        self.register_buffer("s_pos", torch.ones((), device=device, dtype=dtype))
        self.register_buffer("s_neg", torch.ones((), device=device, dtype=dtype))

    def set_params(
        self, s_pos: Tensor | float | None = None, s_neg: Tensor | float | None = None
    ) -> None:
        if s_pos is not None:
            self.s_pos = _assigned(self.s_pos, s_pos)
        if s_neg is not None:
            self.s_neg = _assigned(self.s_neg, s_neg)

    def forward(self, x: Tensor) -> Tensor:
        if self.is_identity:
            return x
        return twin_fake_quant(x, self.s_pos, self.s_neg, self.n_bits, ste=self.training)

    def quantize(self, x: Tensor) -> Tensor:
        self._require_codes()
        c_pos, c_neg = twin_codes(x, self.s_pos, self.s_neg, self.n_bits)
        return (c_pos + c_neg).long()

    def dequantize(self, codes: Tensor) -> Tensor:
        self._require_codes()
        c = codes.to(self.s_pos.dtype)
        return torch.where(codes >= 0, c * self.s_pos, c * self.s_neg)

    def representable_values(self) -> Tensor:
        """Sorted distinct outputs: ``H`` positive-branch and ``H+1`` non-positive levels."""
        half = 2 ** (self.n_bits - 1)
        return torch.unique(self.dequantize(torch.arange(-half, half, device=self.s_pos.device)))

    def extra_repr(self) -> str:
        return f"n_bits={self.n_bits}"


class LogQuantizer(_Quantizer):
    """Log2 / Log-√2 / AdaLog quantizer (§1.4-§1.6) with an optional shift (§1.7).

    Buffers: ``scale`` (largest representable value), ``shift``, ``shift_folded`` and, for
    AdaLog only, ``q`` with its tables ``t1``/``t2``, rebuilt whenever q changes or is loaded.
    ``quantize`` returns codes in ``[0, N-1]`` and the value ``N`` for the implicit zero state
    (``valid = false``, §10 item 4); ``dequantize`` maps ``N`` back to 0 (minus the shift).
    """

    def __init__(
        self,
        n_bits: int,
        kind: str = "adalog",
        shift: float = 0.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(n_bits)
        if kind not in LOG_KINDS:
            raise ValueError(f"log quantizer kind must be one of {LOG_KINDS}, got {kind!r}")
        self.kind = kind
        floats = {"device": device, "dtype": dtype}
        self.register_buffer("scale", torch.ones((), **floats))
        # the shift is a float32 constant (as in the reference), widened to the model's dtype
        shift_t = torch.full((), float(shift), dtype=torch.float32, device=device)
        self.register_buffer("shift", shift_t.to(dtype) if dtype is not None else shift_t)
        self.register_buffer("shift_folded", torch.zeros((), dtype=torch.bool, device=device))
        if kind == "adalog":
            self.register_buffer("q", torch.full((), Q_INIT, dtype=torch.int64, device=device))
            self.register_buffer("t1", torch.empty(0, dtype=torch.int64, device=device))
            self.register_buffer("t2", torch.empty(0, **floats))
            self.update_tables()

    @property
    def n_levels(self) -> int:
        """Number of codes N = 2^b; also the code used for the zero state."""
        return 2**self.n_bits

    def update_tables(self) -> None:
        """Rebuild T1/T2 from q (§1.6); identity quantizers keep empty tables."""
        if self.kind != "adalog":
            return
        if self.is_identity:
            self.t1, self.t2 = self.t1[:0], self.t2[:0]
            return
        self.t1, self.t2 = adalog_tables(self.q, self.n_bits, dtype=self.scale.dtype)

    def _apply(self, fn, recurse: bool = True):
        """After ``.to()``/``.double()``/…: T2 = (D·T2)/D rounded once in its new dtype (a cast
        of the float32 T2 to float64 would carry float32's rounding into a float64 model)."""
        super()._apply(fn, recurse)
        self.update_tables()
        return self

    def set_q(self, q: int | Tensor) -> None:
        """Set the AdaLog base exponent q (β = 2^(q/37)) and rebuild the tables."""
        if self.kind != "adalog":
            raise ValueError(f"q exists only for kind='adalog', not {self.kind!r}")
        q_int = int(q)
        if q_int < 1 or q_int != float(q):
            raise ValueError(f"q must be a positive integer, got {q!r}")
        self.q.fill_(q_int)
        self.update_tables()

    def set_params(
        self, scale: Tensor | float | None = None, q: int | Tensor | None = None
    ) -> None:
        if scale is not None:
            self.scale = _assigned(self.scale, scale)
        if q is not None:
            self.set_q(q)

    def set_shift_folded(self, folded: bool = True) -> None:
        """Mark the ``-shift`` as folded into the next bias (§4): forward returns ``Q(x+shift)``."""
        self.shift_folded.fill_(folded)

    def levels(self) -> Tensor:
        """Per-code table-form multipliers ``2^(-T1)·T2`` of this AdaLog quantizer."""
        return tables_to_levels(self.t1, self.t2)

    def _table_kwargs(self, form: str) -> dict:
        if self.kind != "adalog":
            return {}
        return {"q": self.q, "levels": self.levels() if form == "table" else None}

    def forward(self, x: Tensor) -> Tensor:
        if self.is_identity:
            return x
        form = "exact" if self.training else "table"
        return log_fake_quant(
            x,
            self.scale,
            self.n_bits,
            self.kind,
            form=form,
            shift=self.shift,
            shift_folded=self.shift_folded,
            ste=self.training,
            **self._table_kwargs(form),
        )

    def quantize(self, x: Tensor) -> Tensor:
        self._require_codes()
        q = self.q if self.kind == "adalog" else None
        codes, valid = log_codes(x + self.shift, self.scale, self.n_bits, self.kind, q)
        return torch.where(valid, codes.long(), self.n_levels)

    def dequantize(self, codes: Tensor) -> Tensor:
        """Table-form values of int codes (``N`` = zero state), minus the shift if not folded."""
        self._require_codes()
        valid = codes < self.n_levels
        k = torch.clamp(codes, max=self.n_levels - 1).to(self.scale.dtype)
        kwargs = self._table_kwargs("table")
        y = log_dequant(k, valid, self.scale, self.n_bits, self.kind, form="table", **kwargs)
        return y - self.shift * (~self.shift_folded).to(y.dtype)

    def representable_values(self) -> Tensor:
        """Sorted distinct outputs in the input's domain (the shift subtracted even when it is
        folded into the next layer), the zero state included."""
        values = self.dequantize(torch.arange(self.n_levels + 1, device=self.scale.device))
        return torch.unique(values - self.shift * self.shift_folded.to(values.dtype))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.update_tables()  # q is authoritative; keep T1/T2 consistent with it

    def extra_repr(self) -> str:
        text = f"n_bits={self.n_bits}, kind={self.kind}"
        if self.kind == "adalog":
            text += f", q={int(self.q)}"
        if float(self.shift) != 0.0:
            text += f", shift={float(self.shift):.8g}, shift_folded={bool(self.shift_folded)}"
        return text
