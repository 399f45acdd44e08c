"""Error callbacks for the searches (ALGORITHM.md §5.1), written for speed on CPU.

Every callback maps a batch of candidates to squared errors, lower is better. Constant factors
of the reference's reductions (per-image means over equal token counts) are dropped: they do
not change which candidate wins. Candidates are scored in chunks sized to ``MEMORY_BUDGET``.

Two algebraic shortcuts keep the reference objectives while avoiding a full layer recompute per
candidate (issue: fast calibration):

* weight searches use the Gram form: with ``R = Y - b - X̂ Wᵀ`` fixed and ``Δ = W - Ŵ``, the
  error of output row o is ``ΣR² + 2 Δ_o·(X̂ᵀR)_o + Δ_o ᵀ (X̂ᵀX̂) Δ_o``; the constant is dropped;
* per-tensor input searches of layers that widen (O > I) use ``‖X̂Ŵᵀ‖² - 2⟨X̂, (Y-b)Ŵ⟩`` with
  the I×I matrix ``ŴᵀŴ``;
* per-tensor *uniform* input searches score exactly in integers: with ``X̂ = s·K`` and
  ``Ŵ = diag(s_w)·K_w`` both integer-coded, ``‖X̂Ŵᵀ‖² = s²·⟨KᵀK, K_wᵀ diag(s_w²) K_w⟩``, where
  ``KᵀK`` is one int8 GEMM with exact int32 accumulation, and the linear term ``⟨X̂, (Y-b)Ŵ⟩``
  is read off float64 prefix sums over the sorted inputs (K is a step function of x).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from adalog.quant import asym_fake_quant

#: Floats one candidate chunk may allocate (about 8 MB). Small on purpose: a chunk that stays in
#: the CPU's cache is scored several times faster than one that streams through DRAM.
MEMORY_BUDGET = 2**21
#: −log2 of the 1e-15 floor of the log quantizers (§1.4).
LOG_FLOOR_EXPONENT = 49.82892142331043


def chunk_size(per_candidate: int, budget: int | None = None) -> int:
    return max(1, (budget or MEMORY_BUDGET) // max(1, per_candidate))


def in_chunks(n: int, per_candidate: int, fn: Callable[[slice], Tensor]) -> Tensor:
    """Concatenate ``fn(slice)`` over candidate chunks."""
    step = chunk_size(per_candidate)
    return torch.cat([fn(slice(i, min(n, i + step))) for i in range(0, n, step)])


# -- weights ------------------------------------------------------------------------------------


def weight_self_error(weight: Tensor, n_bits: int) -> Callable[[Tensor, Tensor], Tensor]:
    """Per-row ``Σ (W - Ŵ)²`` for candidates ``(K, O)`` (§5.1, weight initialisation)."""
    rows = weight.reshape(weight.shape[0], -1)

    def score(scales: Tensor, zps: Tensor) -> Tensor:
        def part(sl: slice) -> Tensor:
            w_hat = asym_fake_quant(rows, scales[sl, :, None], zps[sl, :, None], n_bits)
            return (w_hat - rows).square_().sum(-1)

        return in_chunks(scales.shape[0], rows.numel(), part)

    return score


def weight_output_error(
    x_hat: Tensor, target: Tensor, weight: Tensor, n_bits: int
) -> Callable[[Tensor, Tensor], Tensor]:
    """Per-output-row error of ``target ≈ x_hat @ Ŵᵀ`` for weight candidates ``(K, O)``.

    ``x_hat`` is the quantized input ``(T, I)``, ``target`` is ``Y - bias`` ``(T, O)``. Uses
    the Gram form when there are more tokens than input features, else recomputes.
    """
    rows = weight.reshape(weight.shape[0], -1)
    if x_hat.shape[0] <= x_hat.shape[1]:
        return _weight_output_direct(x_hat, target, rows, n_bits)
    gram = x_hat.T @ x_hat
    cross = (x_hat.T @ (target - x_hat @ rows.T)).T  # (O, I)

    def score(scales: Tensor, zps: Tensor) -> Tensor:
        def part(sl: slice) -> Tensor:
            delta = rows - asym_fake_quant(rows, scales[sl, :, None], zps[sl, :, None], n_bits)
            quad = ((delta @ gram) * delta).sum(-1)
            return quad + 2 * (delta * cross).sum(-1)

        return in_chunks(scales.shape[0], 2 * rows.numel(), part)

    return score


def _weight_output_direct(
    x_hat: Tensor, target: Tensor, rows: Tensor, n_bits: int
) -> Callable[[Tensor, Tensor], Tensor]:
    def score(scales: Tensor, zps: Tensor) -> Tensor:
        def part(sl: slice) -> Tensor:
            w_hat = asym_fake_quant(rows, scales[sl, :, None], zps[sl, :, None], n_bits)
            return (x_hat @ w_hat.transpose(1, 2) - target).square_().sum(1)

        return in_chunks(scales.shape[0], target.numel() + rows.numel(), part)

    return score


# -- per-tensor / per-channel inputs --------------------------------------------------------------


def input_self_error(x: Tensor, n_bits: int) -> Callable[[Tensor, Tensor], Tensor]:
    """``Σ (x - x̂)²`` per group for candidates ``(K, G)``; G = 1 (per tensor) or G = channels
    of the last dim (post-LN channel-wise stage, §3)."""
    flat = x.reshape(-1, x.shape[-1])

    def score(scales: Tensor, zps: Tensor) -> Tensor:
        per_channel = scales.shape[1] > 1

        def part(sl: slice) -> Tensor:
            s, z = scales[sl, None, :], zps[sl, None, :]
            err = (asym_fake_quant(flat, s, z, n_bits) - flat).square_()
            return err.sum(1) if per_channel else err.sum((1, 2))[:, None]

        return in_chunks(scales.shape[0], flat.numel(), part)

    return score


def linear_input_error(
    x: Tensor, target: Tensor, w_hat: Tensor, quantize: Callable[[Tensor, slice], Tensor], n: int
) -> Tensor:
    """Per-tensor output error of ``target ≈ quantize(x) @ Ŵᵀ`` for ``n`` input candidates.

    ``quantize(x, sl)`` returns the fake-quantized input for candidates ``sl`` as
    ``(k, T, I)``. Chooses the cheaper of the direct and the ``ŴᵀŴ`` form.
    """
    tokens, in_f = x.shape
    out_f = w_hat.shape[0]
    if out_f > in_f:
        gram = w_hat.T @ w_hat
        proj = target @ w_hat  # (T, I)

        def part(sl: slice) -> Tensor:
            xq = quantize(x, sl)
            return ((xq @ gram) * xq).sum((1, 2)) - 2 * (xq * proj).sum((1, 2))

        return in_chunks(n, 3 * tokens * in_f, part)

    def direct(sl: slice) -> Tensor:
        xq = quantize(x, sl)
        return (xq @ w_hat.T - target).square_().sum((1, 2))

    return in_chunks(n, tokens * (in_f + out_f), direct)


def uniform_input_error(
    x: Tensor, target: Tensor, w_codes: Tensor, w_scale: Tensor, n_bits: int
) -> Callable[[Tensor, Tensor], Tensor] | None:
    """Exact per-tensor output error of ``target ≈ Q(x) @ Ŵᵀ`` for uniform input candidates.

    ``w_codes`` are the centred integer weight codes ``(O, I)`` and ``w_scale`` the per-row
    scales ``(O,)``, so ``Ŵ = w_scale[:, None] * w_codes``. Returns ``score(scales, zps)`` giving
    ``(K, 1)`` float64 errors (up to the dropped constant ``‖target‖²``), or ``None`` above 8 bits
    (the shifted codes would not fit int8).
    """
    n_levels = 2**n_bits
    if n_bits > 8:
        return None
    w_hat = w_scale[:, None] * w_codes
    w64 = w_codes.double()
    h_w = w64.T @ (w_scale.double()[:, None] ** 2 * w64)  # K_wᵀ diag(s_w²) K_w
    proj = (target @ w_hat).reshape(-1)  # (Y - b) Ŵ, flattened like x
    flat = x.reshape(-1)
    order = torch.argsort(flat)
    sorted_x = flat[order].contiguous()
    prefix = torch.zeros(flat.numel() + 1, dtype=torch.float64)
    prefix[1:] = torch.cumsum(proj[order].double(), 0)
    x_t = x.T.contiguous()
    offset = n_levels // 2  # codes k - offset fit int8 for up to 8 bits
    rows_per_gemm = max(1, (2**31 - 1) // offset**2)
    steps = torch.arange(n_levels - 1, dtype=torch.float64) + 0.5

    def linear_terms(scales: Tensor, zps: Tensor) -> Tensor:
        """``⟨K, (Y-b)Ŵ⟩`` per candidate: codes are constant between thresholds (c + ½)·s."""
        zr = torch.round(zps.double())
        thresholds = (steps - zr[:, None]) * scales.double()[:, None]
        pos = torch.searchsorted(sorted_x, thresholds.to(sorted_x.dtype).contiguous())
        first, last = torch.zeros_like(pos[:, :1]), torch.full_like(pos[:, :1], flat.numel())
        ends = torch.cat([first, pos, last], 1)
        segments = prefix[ends[:, 1:]] - prefix[ends[:, :-1]]
        values = torch.arange(n_levels, dtype=torch.float64) - zr[:, None]
        return (segments * values).sum(1)

    def code_gram(scale: float, zr: float) -> Tensor:
        """``KᵀK`` of the centred codes ``K = K' + c`` from an int8 GEMM of ``K' = k - offset``:
        ``KᵀK = K'ᵀK' + c(u1ᵀ + 1uᵀ) + c²T`` with ``u`` the column sums of ``K'``."""
        shifted = (x_t / scale).round_().clamp_(-zr, n_levels - 1 - zr).add_(zr - offset)
        codes_t = shifted.to(torch.int8)
        gram = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64)
        for start in range(0, codes_t.shape[1], rows_per_gemm):
            part = codes_t[:, start : start + rows_per_gemm].contiguous()
            gram += torch._int_mm(part, part.T).double()
        c = offset - zr
        sums = codes_t.sum(1, dtype=torch.int64).double()
        return gram + c * (sums[:, None] + sums[None, :]) + c * c * codes_t.shape[1]

    def score(scales: Tensor, zps: Tensor) -> Tensor:
        s, z = scales[:, 0], zps[:, 0]
        quad = torch.stack(
            [
                (code_gram(float(si), float(torch.round(zi))) * h_w).sum()
                for si, zi in zip(s, z, strict=True)
            ]
        )
        s64 = s.double()
        return (s64**2 * quad - 2 * s64 * linear_terms(s, z))[:, None]

    return score


# -- log quantizers ------------------------------------------------------------------------------


def log_exponent(x: Tensor, shift: float) -> Tensor:
    """``log2(x + shift)`` with non-positive values sent far below the 1e-15 floor."""
    return torch.log2((x + shift).clamp_min(torch.finfo(x.dtype).tiny))


def log_lut(levels: Tensor, scale: Tensor, shift: float, max_code: int) -> Tensor:
    """Dequantized value of every code ``0..max_code`` (codes ≥ N are the zero state)."""
    n = levels.shape[-1]
    lut = torch.zeros(*levels.shape[:-1], max(n, max_code + 1), dtype=levels.dtype)
    lut[..., :n] = levels * scale[..., None]
    return lut - shift


def log_codes_from_exponent(log_x: Tensor, log_scale: Tensor, ratio: Tensor) -> Tensor:
    """Integer codes ``round(clamp(log2 s - log2 x, 0, 49.83) · ratio)`` as int32.

    Equal to ``round(-log2(clamp(x/s, 1e-15, 1)) · ratio)`` up to float rounding (§1.4-§1.6);
    ``ratio`` is 1 (log2), 2 (log√2) or 37/q (AdaLog). int32 because converting to it and
    indexing with it are several times cheaper than int64 on CPU.
    """
    e = (log_scale - log_x).clamp_(0.0, LOG_FLOOR_EXPONENT)
    return e.mul_(ratio).round_().int()


def lut_values(luts: Tensor, codes: Tensor) -> Tensor:
    """``luts[k][codes[k]]`` for ``luts`` ``(k, L)`` and int32 ``codes`` ``(k, ...)``."""
    if luts.shape[0] > 1:
        offsets = torch.arange(luts.shape[0], dtype=codes.dtype) * luts.shape[1]
        codes = codes + offsets.view(-1, *([1] * (codes.dim() - 1)))
    return torch.index_select(luts.reshape(-1), 0, codes.reshape(-1)).view(codes.shape)


class _Product(NamedTuple):
    """A scored log candidate kept for reuse: its level key, input counts and ``U = L[C]Ŵᵀ``."""

    key: int
    counts: Tensor
    product: Tensor


class LogInputError:
    """Per-tensor output error of log-quantized layer inputs (post-GELU fc2), scored fast.

    A log candidate (scale s, level table L, code ratio) quantizes ``x̂ = s·L[C] − shift`` with
    ``L`` 0 in the zero state, so ``x̂Ŵᵀ = s·U − shift·Ŵ1`` with ``U = L[C]Ŵᵀ``. The codes ``C``
    are a non-increasing step function of ``log2(x + shift)``, so a candidate is described by its
    *counts* ``p_k`` = number of inputs with code > k (k < N). An FPCS refinement scores children
    that sit close to a survivor of the previous stage: with the same levels, only the inputs whose
    sorted position lies between the two candidates' counts change code, one boundary at a time,
    and ``U`` is updated with a sparse product of those few inputs instead of the full
    ``T·I·O`` matmul. The counts are taken with the very float operations that compute the codes,
    so both paths quantize every input identically; only float summation order differs.

    Each call keeps its ``capacity`` best candidates (the survivors FPCS will refine next) for
    reuse; ``counters`` tallies full and sparse evaluations. ``token_weights`` ``(T,)`` weigh
    each token's squared output error (default: all 1, the reference's plain sum).
    """

    #: Half-width of the exact search window around each approximate count.
    WINDOW = 64

    def __init__(
        self,
        log_x: Tensor,
        target: Tensor,
        w_hat: Tensor,
        shift: float,
        max_changed: float = 0.1,
        memory: int = 2**28,
        token_weights: Tensor | None = None,
    ) -> None:
        tokens, in_f = log_x.shape
        self.root_weights = None if token_weights is None else token_weights.sqrt()[:, None]
        self.log_x = log_x
        self.sorted_log, order = torch.sort(log_x.reshape(-1))
        self.rows, self.cols = order // in_f, order % in_f
        self.w_t = w_hat.T.contiguous()
        self.target = target + shift * w_hat.sum(1)
        self.max_changed = int(max_changed * log_x.numel())
        self.capacity = max(1, memory // (4 * tokens * w_hat.shape[0]))
        self.kept: list[_Product] = []
        self.counters = {"full": 0, "sparse": 0}
        # reused work buffers: fresh multi-MB tensors per candidate cost page faults, not math
        self._exponent = torch.empty_like(log_x)
        self._codes = torch.empty(log_x.shape, dtype=torch.int32)
        self._inputs = torch.empty_like(log_x)
        self._residual = torch.empty_like(self.target)

    def __call__(
        self, levels: Tensor, keys: list[int], scales: Tensor, log_scales: Tensor, ratios: Tensor
    ) -> Tensor:
        """Errors ``(K,)`` (float64, up to a constant) of candidates with level tables ``levels``
        ``(K, N)`` (equal rows must share a key), scales, ``log2`` scales and code ratios."""
        errors, best = [], []
        for k, key in enumerate(keys):
            counts = self._counts(log_scales[k], ratios[k], levels.shape[1])
            product = self._sparse_update(key, counts, levels[k])
            if product is None:
                product = self._full(levels[k], log_scales[k], ratios[k])
            residual = torch.mul(product, scales[k], out=self._residual).sub_(self.target)
            if self.root_weights is not None:
                residual.mul_(self.root_weights)
            error = residual.square_().sum(dtype=torch.float64)
            errors.append(error)
            entry = _Product(key, counts, product)
            best = _keep_best(best, (float(error), k, entry), self.capacity)
        self.kept = [entry for _, _, entry in best]
        return torch.stack(errors)

    def _full(self, levels: Tensor, log_scale: Tensor, ratio: Tensor) -> Tensor:
        self.counters["full"] += 1
        max_code = int(LOG_FLOOR_EXPONENT * float(ratio)) + 1
        table = torch.zeros(max(levels.numel(), max_code + 1), dtype=levels.dtype)
        table[: levels.numel()] = levels
        # log_codes_from_exponent's float steps, into the work buffers
        exponent = torch.sub(log_scale, self.log_x, out=self._exponent)
        exponent.clamp_(0.0, LOG_FLOOR_EXPONENT).mul_(ratio).round_()
        codes = self._codes.copy_(exponent).view(-1)
        torch.index_select(table, 0, codes, out=self._inputs.view(-1))
        return self._inputs @ self.w_t

    def _counts(self, log_scale: Tensor, ratio: Tensor, n_levels: int) -> Tensor:
        """``p_k`` = inputs with code > k, exact: located near the threshold
        ``log s − (k + ½)/ratio`` and settled with the code formula in a small window."""
        n = self.sorted_log.numel()
        k = torch.arange(n_levels)
        thresholds = (log_scale - (k + 0.5) / ratio).to(self.sorted_log.dtype)
        approx = torch.searchsorted(self.sorted_log, thresholds)
        lo = (approx - self.WINDOW).clamp(0, n)
        hi = (approx + self.WINDOW).clamp(0, n)
        index = lo[:, None] + torch.arange(2 * self.WINDOW)
        inside = index < hi[:, None]
        codes = log_codes_from_exponent(self.sorted_log[index.clamp(max=n - 1)], log_scale, ratio)
        counts = lo + ((codes > k[:, None]) & inside).sum(1)
        below = self.sorted_log[(lo - 1).clamp(min=0)]
        above = self.sorted_log[hi.clamp(max=n - 1)]
        left_ok = (lo == 0) | (log_codes_from_exponent(below, log_scale, ratio) > k)
        right_ok = (hi == n) | (log_codes_from_exponent(above, log_scale, ratio) <= k)
        if bool((left_ok & right_ok).all()):
            return counts
        codes = log_codes_from_exponent(self.sorted_log, log_scale, ratio)  # rare: wide tie run
        return torch.searchsorted(-codes, -(k + 1).to(codes.dtype), right=True)

    def _sparse_update(self, key: int, counts: Tensor, levels: Tensor) -> Tensor | None:
        """``U`` from the closest kept candidate with the same levels, or ``None`` if none is
        within ``max_changed`` changed inputs."""
        same = [entry for entry in self.kept if entry.key == key]
        if not same:
            return None
        changed = [int((counts - entry.counts).abs().sum()) for entry in same]
        nearest = min(range(len(same)), key=changed.__getitem__)
        if changed[nearest] > self.max_changed:
            return None
        self.counters["sparse"] += 1
        parent = same[nearest]
        lo, hi = torch.minimum(counts, parent.counts), torch.maximum(counts, parent.counts)
        lengths = hi - lo
        table = torch.cat([levels, levels.new_zeros(1)])
        # crossing boundary k upwards (code k -> k+1) changes the value by L[k+1] - L[k]
        step = (table[1:] - table[:-1]) * torch.sign(counts - parent.counts).to(levels.dtype)
        starts = torch.repeat_interleave(lo - (torch.cumsum(lengths, 0) - lengths), lengths)
        positions = torch.arange(int(lengths.sum())) + starts
        values = torch.repeat_interleave(step, lengths)
        rows, cols = self.rows[positions], self.cols[positions]
        shape = self.log_x.shape
        sparse = torch.sparse_coo_tensor(
            torch.stack([rows, cols]), values, shape, check_invariants=False
        )
        return parent.product + torch.sparse.mm(sparse, self.w_t)


def _keep_best(best: list, item: tuple, capacity: int) -> list:
    """The ``capacity`` lowest-error items of ``best + [item]`` (ties: earlier first)."""
    best = sorted([*best, item], key=lambda entry: (entry[0], entry[1]))
    return best[:capacity]
