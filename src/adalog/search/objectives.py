"""Error callbacks for the searches (docs/algorithm.md §5.1), written for speed on CPU.

Every callback maps a batch of candidates to squared errors, lower is better. Constant factors
of the reference's reductions (per-image means over equal token counts) are dropped: they do
not change which candidate wins. Candidates are scored in chunks sized to ``MEMORY_BUDGET``.

Algebraic shortcuts keep the reference objectives while avoiding a full layer recompute per
candidate (issue: fast calibration):

* weight searches use the Gram form: with ``R = Y - b - X̂ Wᵀ`` fixed and ``Δ = W - Ŵ``, the
  error of output row o is ``ΣR² + 2 Δ_o·(X̂ᵀR)_o + Δ_o ᵀ (X̂ᵀX̂) Δ_o``; the constant is dropped;
* per-tensor input searches of layers that widen (O > I) use ``‖X̂Ŵᵀ‖² - 2⟨X̂, (Y-b)Ŵ⟩`` with
  the I×I matrix ``ŴᵀŴ``;
* per-tensor *uniform* input searches score exactly in integers: with ``X̂ = s·K`` and
  ``Ŵ = diag(s_w)·K_w`` both integer-coded, ``‖X̂Ŵᵀ‖² = s²·⟨KᵀK, K_wᵀ diag(s_w²) K_w⟩``, where
  ``KᵀK`` is one int8 GEMM with exact int32 accumulation, and the linear term ``⟨X̂, (Y-b)Ŵ⟩``
  is read off float64 prefix sums over the sorted inputs (K is a step function of x);
* input self-error searches read ``Σ(x − x̂)²`` off each group's sorted values and float64
  prefix sums, at a cost independent of the token count;
* FPCS refinement children sit close to a survivor of the previous stage, so most of their
  codes equal the survivor's: the post-GELU log input (:class:`LogInputError`) and the per-head
  matmul operands (:class:`GramOperandError`) update the survivor's product through the few
  codes that changed instead of recomputing it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from adalog.quant import asym_fake_quant
from adalog.search.fpcs import ADALOG_BEAM, UNIFORM_BEAM

#: Floats one candidate chunk may allocate (about 8 MB). Small on purpose: a chunk that stays in
#: the CPU's cache is scored several times faster than one that streams through DRAM.
MEMORY_BUDGET = 2**21
#: −log2 of the 1e-15 floor of the log quantizers (§1.4).
LOG_FLOOR_EXPONENT = 49.82892142331043


def chunk_size(per_candidate: int, budget: int | None = None) -> int:
    return max(1, (budget or MEMORY_BUDGET) // max(1, per_candidate))


def kept_capacity(product_bytes: int, min_kept: int, memory: int, max_memory: int) -> int:
    """How many scored candidates a sparse scorer keeps to seed the next FPCS stage: as many as
    fit in ``memory``, and at least ``min_kept`` (the beam: every survivor) while those fit in
    ``max_memory``. With fewer, most children of a many-token layer (Swin's first stage) find
    no kept parent and fall back to full products."""
    budget = max(memory, min(min_kept * product_bytes, max_memory))
    return max(1, budget // product_bytes)


def int8_gram(codes: Tensor, ones: Tensor, wide: bool = False) -> tuple[Tensor, Tensor]:
    """``codes·codesᵀ`` and the row sums of int8 ``codes`` ``(C, T)``, exact, in float64:
    through ``torch._int_mm`` (int32 accumulation; ``ones`` is an int8 ``(T, 8)`` of ones), or
    with ``wide`` through a float64 GEMM (CUDA's ``_int_mm`` wants padded shapes; float64
    products of integers below 2^7 summed over fewer than 2^39 terms are exact as well)."""
    if wide:
        codes64 = codes.double()
        return codes64 @ codes64.T, codes64.sum(1)
    return torch._int_mm(codes, codes.T).double(), torch._int_mm(codes, ones)[:, 0].double()


def sum_of_squares(values: Tensor, buffer: Tensor) -> Tensor:
    """``Σ v²`` of contiguous ``values``, squared in place in their dtype and summed in float64
    through the float64 ``buffer``, a chunk at a time: ``sum(dtype=float64)`` of a float32
    tensor converts element by element and is about 5x slower on large tensors."""
    flat = values.view(-1)
    total = torch.zeros((), dtype=torch.float64, device=values.device)
    step = buffer.numel()
    for start in range(0, flat.numel(), step):
        part = flat[start : start + step].square_()
        total += buffer[: part.numel()].copy_(part).sum()
    return total


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
    of the last dim (post-LN channel-wise stage, §3).

    Scored from each group's sorted values, at a cost independent of the token count: a
    candidate's code is a step function of x with steps at ``(k − z + ½)·s``, so with prefix sums
    of the sorted group the error is ``Σx² − 2·Σ_c x̂_c·Σ_{code c} x + Σ_c n_c·x̂_c²`` (float64).
    An input that sits on a step has the same error under either code, so locating the steps
    with ``searchsorted`` gives the elementwise error up to float rounding.
    """
    flat = x.reshape(-1, x.shape[-1])
    n_levels = 2**n_bits
    tables: dict[bool, tuple[Tensor, Tensor, Tensor]] = {}

    def sorted_tables(per_channel: bool) -> tuple[Tensor, Tensor, Tensor]:
        if per_channel not in tables:
            groups = flat.T if per_channel else flat.reshape(1, -1)
            values = torch.sort(groups, dim=1).values.contiguous()
            prefix = values.new_zeros(values.shape[0], values.shape[1] + 1, dtype=torch.float64)
            torch.cumsum(values.double(), 1, out=prefix[:, 1:])
            total = values.double().square().sum(1)
            tables[per_channel] = values, prefix, total
        return tables[per_channel]

    def score(scales: Tensor, zps: Tensor) -> Tensor:
        values, prefix, total = sorted_tables(scales.shape[1] > 1)
        groups, n_cands = values.shape[0], scales.shape[0]
        s, zr = scales.double().T[..., None], torch.round(zps.double()).T[..., None]  # (G, K, 1)
        codes = torch.arange(n_levels, dtype=torch.float64, device=zr.device)
        steps = (codes[:-1] + 0.5 - zr) * s
        below = torch.searchsorted(values, steps.reshape(groups, -1).to(values.dtype))
        ends = torch.cat(
            [
                below.new_zeros(groups, n_cands, 1),
                below.reshape(groups, n_cands, -1),
                below.new_full((groups, n_cands, 1), values.shape[1]),
            ],
            -1,
        )  # code c holds the sorted inputs ends[c] .. ends[c + 1]
        sums = prefix.gather(1, ends.reshape(groups, -1)).reshape(ends.shape).diff(dim=-1)
        counts = ends.diff(dim=-1).double()
        levels = (codes - zr) * s  # x̂ of each code
        errors = total[:, None] - (levels * (2 * sums - levels * counts)).sum(-1)
        return errors.T

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
    prefix = flat.new_zeros(flat.numel() + 1, dtype=torch.float64)
    prefix[1:] = torch.cumsum(proj[order].double(), 0)
    x_t = x.T.contiguous()
    offset = n_levels // 2  # codes k - offset fit int8 for up to 8 bits
    rows_per_gemm = max(1, (2**31 - 1) // offset**2)
    steps = torch.arange(n_levels - 1, dtype=torch.float64, device=x.device) + 0.5

    def linear_terms(scales: Tensor, zps: Tensor) -> Tensor:
        """``⟨K, (Y-b)Ŵ⟩`` per candidate: codes are constant between thresholds (c + ½)·s."""
        zr = torch.round(zps.double())
        thresholds = (steps - zr[:, None]) * scales.double()[:, None]
        pos = torch.searchsorted(sorted_x, thresholds.to(sorted_x.dtype).contiguous())
        first, last = torch.zeros_like(pos[:, :1]), torch.full_like(pos[:, :1], flat.numel())
        ends = torch.cat([first, pos, last], 1)
        segments = prefix[ends[:, 1:]] - prefix[ends[:, :-1]]
        values = torch.arange(n_levels, dtype=torch.float64, device=zr.device) - zr[:, None]
        return (segments * values).sum(1)

    # reused work buffers: fresh multi-MB tensors per candidate cost page faults, not math
    shifted = torch.empty_like(x_t)
    codes_t = torch.empty_like(x_t, dtype=torch.int8)
    ones = x_t.new_ones(min(rows_per_gemm, x_t.shape[1]), 8, dtype=torch.int8)

    def code_gram(scale: float, zr: float) -> Tensor:
        """``KᵀK`` of the centred codes ``K = K' + c`` from an int8 GEMM of ``K' = k - offset``:
        ``KᵀK = K'ᵀK' + c(u1ᵀ + 1uᵀ) + c²T`` with ``u`` the column sums of ``K'``, which an
        int8 GEMM against ones also gives exactly (a plain int8 → int64 sum is 20x slower;
        on CUDA a float64 GEMM, see :func:`int8_gram`)."""
        torch.div(x_t, scale, out=shifted).round_().clamp_(-zr, n_levels - 1 - zr)
        codes_t.copy_(shifted.add_(zr - offset))
        gram = x.new_zeros(x.shape[1], x.shape[1], dtype=torch.float64)
        sums = x.new_zeros(x.shape[1], dtype=torch.float64)
        for start in range(0, codes_t.shape[1], rows_per_gemm):
            part = codes_t[:, start : start + rows_per_gemm].contiguous()
            part_gram, part_sums = int8_gram(part, ones[: part.shape[1]], wide=part.is_cuda)
            gram += part_gram
            sums += part_sums
        c = offset - zr
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
    lut = levels.new_zeros(*levels.shape[:-1], max(n, max_code + 1))
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
        offsets = torch.arange(luts.shape[0], dtype=codes.dtype, device=codes.device)
        offsets = offsets * luts.shape[1]
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
    #: Products up to this size take sparse updates of up to ``max_changed`` of the inputs. A
    #: larger product no longer stays in cache, a sparse update's scattered row writes miss it,
    #: and its break-even against a full product falls (measured on two cores: about 7 % of the
    #: inputs for ViT-Tiny's fc2, a 4.8 MB product; under 2 % for a 38.5 MB one of Swin-Tiny's
    #: first stage), so the allowed share shrinks in proportion to the product's size.
    CACHE_BYTES = 2**23

    def __init__(
        self,
        log_x: Tensor,
        target: Tensor,
        w_hat: Tensor,
        shift: float,
        max_changed: float = 0.1,
        memory: int = 2**28,
        token_weights: Tensor | None = None,
        max_memory: int = 2**31,
    ) -> None:
        tokens, in_f = log_x.shape
        self.root_weights = None if token_weights is None else token_weights.sqrt()[:, None]
        self.log_x = log_x
        self.sorted_log, order = torch.sort(log_x.reshape(-1))
        self.rows, self.cols = order // in_f, order % in_f
        self.w_t = w_hat.T.contiguous()
        self.target = target + shift * w_hat.sum(1)
        product_bytes = 4 * tokens * w_hat.shape[0]
        share = max_changed * min(1.0, self.CACHE_BYTES / product_bytes)
        self.max_changed = int(share * log_x.numel())
        self.capacity = kept_capacity(product_bytes, ADALOG_BEAM, memory, max_memory)
        self.kept: list[_Product] = []
        self.counters = {"full": 0, "sparse": 0}
        # reused work buffers: fresh multi-MB tensors per candidate cost page faults, not math
        self._exponent = torch.empty_like(log_x)
        self._codes = torch.empty_like(log_x, dtype=torch.int32)
        self._inputs = torch.empty_like(log_x)
        self._residual = torch.empty_like(self.target)
        self._square_buffer = log_x.new_empty(2**16, dtype=torch.float64)

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
            error = sum_of_squares(residual, self._square_buffer)
            errors.append(error)
            entry = _Product(key, counts, product)
            best = _keep_best(best, (float(error), k, entry), self.capacity)
        self.kept = [entry for _, _, entry in best]
        return torch.stack(errors)

    def _full(self, levels: Tensor, log_scale: Tensor, ratio: Tensor) -> Tensor:
        self.counters["full"] += 1
        max_code = int(LOG_FLOOR_EXPONENT * float(ratio)) + 1
        table = levels.new_zeros(max(levels.numel(), max_code + 1))
        table[: levels.numel()] = levels
        # log_codes_from_exponent's float steps, into the work buffers
        exponent = torch.sub(log_scale, self.log_x, out=self._exponent)
        exponent.clamp_(0.0, LOG_FLOOR_EXPONENT).mul_(ratio).round_()
        codes = self._codes.copy_(exponent).view(-1)
        torch.index_select(table, 0, codes, out=self._inputs.view(-1))
        return self._inputs @ self.w_t

    def _counts(self, log_scale: Tensor, ratio: Tensor, n_levels: int) -> Tensor:
        """``p_k`` = inputs with code > k, near the thresholds ``log s − (k + ½)/ratio``."""
        k = torch.arange(n_levels, device=log_scale.device)
        thresholds = (log_scale - (k + 0.5) / ratio).to(self.sorted_log.dtype)

        def codes_of(values: Tensor, _candidates: slice) -> Tensor:
            return log_codes_from_exponent(values, log_scale, ratio)

        return prefix_counts(self.sorted_log, thresholds[None], codes_of, self.WINDOW)[0]

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
        table = torch.cat([levels, levels.new_zeros(1)])
        # crossing boundary k upwards (code k -> k+1) changes the value by L[k+1] - L[k]
        positions, values = boundary_changes(counts, parent.counts, table[1:] - table[:-1])
        rows, cols = self.rows[positions], self.cols[positions]
        shape = self.log_x.shape
        sparse = torch.sparse_coo_tensor(
            torch.stack([rows, cols]), values, shape, check_invariants=False, device=values.device
        )
        return parent.product + torch.sparse.mm(sparse, self.w_t)


class _Operand:
    """A scored operand candidate kept for reuse: zero point, counts, ``⟨U, Ê⟩`` and
    ``U = ÊG``, the latter held as its parent's plus a few updated rows until first needed."""

    def __init__(self, zero_point: float, counts: Tensor, quad: Tensor, product=None, update=None):
        self.zero_point, self.counts, self.quad = zero_point, counts, quad
        self._product, self._update = product, update  # update: (parent, rows, row values)

    def product(self) -> Tensor:
        if self._product is None:
            parent, rows, delta = self._update
            base = parent.product()
            if delta is None:  # no code changed
                self._product = base
            else:
                self._product = base.clone()
                self._product.view(-1, base.shape[-1]).index_add_(0, rows, delta)
            self._update = None
        return self._product


class GramOperandError:
    """Per-group error of a uniformly quantized matmul operand (§5.7 E/F), scored fast.

    The operand enters as rows ``x`` ``(B, G, R, d)`` (group = head) with, per item, a Gram
    matrix ``G`` ``(B, G, d, d)`` and a projection ``P`` ``(B, G, R, d)`` such that the output
    error of quantized rows ``x̂ = s·Ê`` (``Ê`` the centred integer codes) is
    ``s²·Σ⟨ÊG, Ê⟩ − 2s·⟨Ê, P⟩`` up to a constant. For ``Â @ B̂ ≈ T``: A's rows with
    ``G = B̂B̂ᵀ``, ``P = TB̂ᵀ``; B's columns with ``G = ÂᵀÂ``, ``P = TᵀÂ``.

    The codes are a step function of x, so a candidate is described by its prefix *counts*
    (elements with code > k, in descending order of x), and ``⟨Ê, P⟩`` is read off prefix
    sums of P in that order. An FPCS child with a kept parent's zero point changes the codes of
    only the elements between the two candidates' counts (a few per mille after the first
    refinement, often none); with their sparse change D, ``⟨ÊG, Ê⟩`` grows by
    ``2⟨D, U⟩ + ⟨DG, D⟩`` and ``U = ÊG`` by ``DG`` (rows of D only), instead of a new
    ``R·d·d`` product per item. The counts come from the quantizer's own float steps, so both
    paths code every element as :func:`asym_fake_quant` does; sums run in float64.
    ``counters`` tallies both paths.
    """

    WINDOW = 64

    def __init__(
        self,
        x: Tensor,
        gram: Tensor,
        proj: Tensor,
        n_bits: int,
        max_changed: float = 0.01,
        memory: int = 2**28,
        max_memory: int = 2**31,
    ) -> None:
        self.x = x.transpose(0, 1).contiguous()  # (G, B, R, d)
        self.gram = gram.transpose(0, 1).contiguous()
        self.proj = proj.transpose(0, 1).contiguous()
        self.n_levels = 2**n_bits
        groups, _, self.rows_per_item, self.width = self.x.shape
        per_group = self.x[0].numel()
        self.max_changed = int(max_changed * per_group)
        product_bytes = 4 * per_group * groups
        self.capacity = kept_capacity(product_bytes, UNIFORM_BEAM, memory, max_memory)
        descending = torch.sort(self.x.reshape(groups, -1), dim=1, descending=True)
        self.sorted_neg = (-descending.values).contiguous()  # ascending; codes never increase
        self.order = descending.indices
        proj_sorted = self.proj.reshape(groups, -1).gather(1, self.order)
        self.prefix = self.x.new_zeros(groups, per_group + 1, dtype=torch.float64)
        self.prefix[:, 1:] = torch.cumsum(proj_sorted.double(), 1)
        self.kept: list[list[_Operand]] = [[] for _ in range(groups)]
        self.counters = {"full": 0, "sparse": 0}

    def __call__(self, scales: Tensor, zps: Tensor) -> Tensor:
        """Errors ``(K, G)`` (float64, up to a constant) of candidates ``(K, G)``."""
        zps = torch.round(zps.to(self.x.dtype))
        errors = scales.new_empty(scales.shape, dtype=torch.float64)
        kept = []
        for g in range(scales.shape[1]):
            errors[:, g], best = self._group(g, scales[:, g], zps[:, g])
            kept.append(best)
        self.kept = kept
        return errors

    def _group(self, g: int, scales: Tensor, zps: Tensor) -> tuple[Tensor, list[_Operand]]:
        s64 = scales.double()
        monotone = (s64 > 0) & torch.isfinite(s64)  # code steps rise with x: counts apply
        counts = self._counts(g, scales, zps)
        prefix = self.prefix[g]
        linear = prefix[counts].sum(1) - zps.double() * prefix[-1]  # Σ_k S[p_k] − z·S[n]
        parents = torch.where(monotone, self._parents(g, counts, zps), -1)
        quads = torch.empty_like(s64)
        entries: list[_Operand | None] = [None] * scales.shape[0]
        best: list = []
        for k in torch.nonzero(parents < 0).flatten().tolist():
            codes = self._centred_codes(g, scales[k], zps[k])
            product = torch.bmm(codes, self.gram[g])
            quads[k] = torch.linalg.vecdot(product, codes).sum(dtype=torch.float64)
            if not bool(monotone[k]):  # no monotone steps: the counts do not apply
                linear[k] = (codes * self.proj[g]).sum(dtype=torch.float64)
                continue
            self.counters["full"] += 1
            entry = _Operand(float(zps[k]), counts[k], quads[k], product=product)
            error = float(s64[k] ** 2 * quads[k] - 2 * s64[k] * linear[k])
            best = _keep_best(best, (error, k, entry), self.capacity)
        children = torch.nonzero(parents >= 0).flatten()
        if children.numel():
            self.counters["sparse"] += children.numel()
            quads[children] = self._children(g, children, parents[children], counts, entries)
        errors = s64**2 * quads - 2 * s64 * linear
        for k in children.tolist():
            best = _keep_best(best, (float(errors[k]), k, entries[k]), self.capacity)
        return errors, [entry for _, _, entry in best]

    def _centred_codes(self, g: int, scale: Tensor, zp: Tensor) -> Tensor:
        """``Ê`` with :func:`asym_fake_quant`'s float steps (before its final ``· s``)."""
        out = self.x[g] / scale
        return out.round_().add_(zp).clamp_(0, self.n_levels - 1).sub_(zp)

    def _counts(self, g: int, scales: Tensor, zps: Tensor) -> Tensor:
        """``(K, N-1)`` elements with code > k, i.e. ``round(x/s) + z > k``: near
        ``x = (k − z + ½)·s``, settled with :meth:`_centred_codes`' float steps."""
        k = torch.arange(self.n_levels - 1, dtype=torch.float64, device=scales.device)
        steps = k[None] - zps.double()[:, None] + 0.5
        thresholds = (-steps * scales.double()[:, None]).to(self.x.dtype)

        def codes_of(neg: Tensor, candidates: slice) -> Tensor:
            shape = (-1,) + (1,) * (neg.dim() - 1)
            out = -neg / scales[candidates].view(shape)
            return out.round_().add_(zps[candidates].view(shape)).clamp_(0, self.n_levels - 1)

        return prefix_counts(self.sorted_neg[g], thresholds, codes_of, self.WINDOW)

    def _parents(self, g: int, counts: Tensor, zps: Tensor) -> Tensor:
        """Index into ``kept[g]`` of each candidate's closest kept candidate with its zero
        point, or −1 where none is within ``max_changed`` changed codes."""
        kept = self.kept[g]
        if not kept:
            return counts.new_full((counts.shape[0],), -1)
        kept_counts = torch.stack([entry.counts for entry in kept])
        kept_zps = torch.tensor(
            [entry.zero_point for entry in kept], dtype=zps.dtype, device=zps.device
        )
        changed = (counts[:, None, :] - kept_counts[None]).abs().sum(2)
        changed[zps[:, None] != kept_zps[None]] = self.max_changed + 1
        distance, nearest = changed.min(1)  # ties: the better-ranked parent
        return torch.where(distance <= self.max_changed, nearest, -1)

    def _children(
        self, g: int, children: Tensor, parents: Tensor, counts: Tensor, entries: list
    ) -> Tensor:
        """``⟨ÊG, Ê⟩`` of ``children`` from their kept ``parents``, all at once: each changed
        code adds ±1 to Ê (D), so the parent's value grows by ``2⟨D, U⟩ + ⟨DG, D⟩``. Fills
        ``entries`` with each child's lazily updated ``U``."""
        kept = self.kept[g]
        own, theirs = counts[children], torch.stack([kept[p].counts for p in parents.tolist()])
        steps = self.x.new_ones(own.numel())
        positions, values = boundary_changes(own.flatten(), theirs.flatten(), steps)
        changed = (own - theirs).abs().sum(1)
        child = torch.repeat_interleave(
            torch.arange(children.numel(), device=changed.device), changed
        )
        flat = self.order[g][positions]
        rows, cols = flat // self.width, flat % self.width  # row (b, r) and column j of x[g]
        n_rows = self.x.shape[1] * self.rows_per_item
        touched, local = torch.unique(child * n_rows + rows, return_inverse=True)
        items = rows // self.rows_per_item
        sparse = torch.sparse_coo_tensor(
            torch.stack([local, items * self.width + cols]),
            values,
            (touched.numel(), self.x.shape[1] * self.width),
            check_invariants=False,
            device=values.device,
        )
        delta = torch.sparse.mm(sparse, self.gram[g].reshape(-1, self.width))  # rows of DG
        # ⟨D, U⟩ reads each parent's U at its children's entries (no copy of the products)
        entry_parent = parents[child]
        order = torch.argsort(entry_parent, stable=True)
        sizes = torch.bincount(entry_parent, minlength=len(kept)).tolist()
        above = values.new_empty(flat.numel(), dtype=torch.float64)
        for p, chunk in enumerate(torch.split(order, sizes)):
            if chunk.numel():
                above[chunk] = kept[p].product().reshape(-1)[flat[chunk]].double()
        v64 = values.double()
        gain = 2 * v64 * above + v64 * delta[local, cols].double()
        quads = torch.stack([kept[p].quad for p in parents.tolist()])
        quads = quads.index_add_(0, child, gain)
        starts = torch.arange(children.numel() + 1, device=touched.device) * n_rows
        bounds = torch.searchsorted(touched, starts).tolist()
        for m, k in enumerate(children.tolist()):
            parent, lo, hi = kept[int(parents[m])], bounds[m], bounds[m + 1]
            update = (
                (parent, None, None)
                if lo == hi
                else (parent, touched[lo:hi] - m * n_rows, delta[lo:hi])
            )
            entries[k] = _Operand(parent.zero_point, counts[k], quads[m], update=update)
        return quads


def prefix_counts(
    sorted_values: Tensor,
    thresholds: Tensor,
    codes_of: Callable[[Tensor, slice], Tensor],
    window: int,
) -> Tensor:
    """``(K, L)`` counts ``p_k`` of elements with code > k under K candidates, for codes that
    never increase along the ascending ``sorted_values``: located by ``searchsorted`` at
    ``thresholds`` ``(K, L)`` and settled in a window around it with ``codes_of(values,
    candidates)`` itself (the quantizer's own float steps on ``values`` ``(k, ...)`` for the
    candidates in the slice), so the counts agree with the codes a full recomputation gives."""
    n = sorted_values.numel()
    k = torch.arange(thresholds.shape[-1], device=thresholds.device)
    approx = torch.searchsorted(sorted_values, thresholds.contiguous())
    lo, hi = (approx - window).clamp(0, n), (approx + window).clamp(0, n)
    index = lo[..., None] + torch.arange(2 * window, device=lo.device)
    every = slice(None)
    codes = codes_of(sorted_values[index.clamp(max=n - 1)], every)
    counts = lo + ((codes > k[:, None]) & (index < hi[..., None])).sum(-1)
    left = codes_of(sorted_values[(lo - 1).clamp(min=0)], every)
    right = codes_of(sorted_values[hi.clamp(max=n - 1)], every)
    settled = ((lo == 0) | (left > k)) & ((hi == n) | (right <= k))
    for i in torch.nonzero(~settled.all(1)).flatten().tolist():  # ties wider than the window
        codes = codes_of(sorted_values[None], slice(i, i + 1))[0].to(torch.int64)
        counts[i] = torch.searchsorted(-codes, -(k + 1), right=True)
    return counts


def boundary_changes(counts: Tensor, parent: Tensor, steps: Tensor) -> tuple[Tensor, Tensor]:
    """Sorted positions whose code differs between two candidates with prefix counts ``counts``
    and ``parent``, and the value change of each: crossing boundary k upwards adds
    ``steps[k]``; an element crossing several boundaries appears once per boundary."""
    lo, hi = torch.minimum(counts, parent), torch.maximum(counts, parent)
    lengths = hi - lo
    step = steps * torch.sign(counts - parent).to(steps.dtype)
    starts = torch.repeat_interleave(lo - (torch.cumsum(lengths, 0) - lengths), lengths)
    positions = torch.arange(int(lengths.sum()), device=starts.device) + starts
    return positions, torch.repeat_interleave(step, lengths)


def _keep_best(best: list, item: tuple, capacity: int) -> list:
    """The ``capacity`` lowest-error items of ``best + [item]`` (ties: earlier first)."""
    best = sorted([*best, item], key=lambda entry: (entry[0], entry[1]))
    return best[:capacity]
