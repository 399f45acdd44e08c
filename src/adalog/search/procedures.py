"""Per-module calibration procedures (docs/algorithm.md §5.7), on captured tensors and quantizers.

Nothing here knows about timm: a procedure receives FP inputs/outputs, the layer's weight and
bias, and the quantizer modules whose buffers it writes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor

from adalog.quant import (
    ADALOG_R,
    LogQuantizer,
    TwinUniformQuantizer,
    UniformQuantizer,
    adalog_levels,
    adalog_q_candidates,
    asym_codes,
    asym_fake_quant,
    log_fake_quant,
    twin_fake_quant,
)
from adalog.search import naive
from adalog.search.fpcs import (
    best_q,
    exhaustive,
    exhaustive_adalog,
    fpcs_adalog,
    fpcs_uniform,
)
from adalog.search.grids import (
    ACTIVATION_SCALE_FLOOR,
    UniformGrid,
    activation_grid,
    adalog_scale_grid,
    initial_candidate,
    matmul_grid,
    twin_neg_scale,
    twin_pos_candidates,
    weight_grid,
)
from adalog.search.objectives import (
    LOG_FLOOR_EXPONENT,
    GramOperandError,
    LogInputError,
    in_chunks,
    input_self_error,
    linear_input_error,
    log_exponent,
    log_lut,
    uniform_input_error,
    weight_output_error,
    weight_self_error,
)


@dataclass(frozen=True)
class SearchSettings:
    """Search sizes (§2.1): candidates per step, alternating rounds, FPCS on/off and steps.

    ``engine="naive"`` scores every candidate by recomputing the layer output
    (:mod:`adalog.search.naive`, reference-like and slow) instead of the fast closed forms.
    """

    eq_n: int = 128
    rounds: int = 3
    fpcs: bool = True
    steps: int = 6
    zp_cap: int | None = 16
    conv_zp_cap: bool = False
    engine: str = "fast"

    @property
    def naive(self) -> bool:
        return self.engine == "naive"


def _weight_score(settings: SearchSettings, x_hat: Tensor, target: Tensor, rows: Tensor, n: int):
    make = naive.weight_output_error if settings.naive else weight_output_error
    return make(x_hat, target, rows, n)


def _search(
    settings: SearchSettings,
    score: Callable[[Tensor, Tensor], Tensor],
    grid: UniformGrid,
    floor: float | None = None,
):
    if settings.fpcs:
        return fpcs_uniform(score, grid.scales, grid.zero_points, settings.steps, scale_floor=floor)
    return exhaustive(score, grid.scales, grid.zero_points)


# -- linear layers -------------------------------------------------------------------------------


def calibrate_linear(
    x: Tensor,
    y: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    weight_quant: UniformQuantizer,
    input_quant: UniformQuantizer,
    settings: SearchSettings,
) -> None:
    """§5.7(A): weight and per-tensor input, alternating on the layer-output error.

    ``x``: ``(T, I)`` FP inputs; ``y``: ``(T, O)`` FP outputs; ``weight``: ``(O, I)`` (conv
    weights flattened to rows by the caller).
    """
    rows = weight.reshape(weight.shape[0], -1)
    target = y if bias is None else y - bias
    n_w = weight_quant.n_bits
    w_grid = weight_grid(rows, n_w, settings.eq_n, settings.zp_cap)
    _set_rows(weight_quant, _search(settings, weight_self_error(rows, n_w), w_grid))
    a_bits = input_quant.n_bits
    x_grid = activation_grid(x.reshape(1, -1), a_bits, settings.eq_n)
    best = _search(settings, input_self_error(x, a_bits), x_grid, ACTIVATION_SCALE_FLOOR)
    input_quant.set_params(best.scale, best.zero_point)
    for _ in range(settings.rounds):
        score_w = _weight_score(settings, input_quant(x), target, rows, n_w)
        _set_rows(weight_quant, _search(settings, score_w, w_grid))
        score_x = _input_score(settings, x, target, rows, weight_quant, a_bits)
        best = _search(settings, score_x, x_grid, ACTIVATION_SCALE_FLOOR)
        input_quant.set_params(best.scale, best.zero_point)


#: fan-in / fan-out above which the float input score replaces the exact integer one (the
#: int8 GEMMs of the exact score do about 4x the work of a float GEMM per second)
EXACT_INPUT_FAN_RATIO = 4


def _input_score(
    settings: SearchSettings,
    x: Tensor,
    target: Tensor,
    rows: Tensor,
    weight_quant: UniformQuantizer,
    a_bits: int,
) -> Callable[[Tensor, Tensor], Tensor]:
    """Per-tensor uniform input candidates scored on the layer output with the current Ŵ:
    exactly in integers up to 8 bits, else in float. Layers with a fan-in over
    :data:`EXACT_INPUT_FAN_RATIO` times their outputs (a detector's RoI box head, 3x3 convs
    read as linears) are scored in float: the exact score costs an int8 ``I x I`` code Gram per
    candidate, the float one an ``I x O`` product."""
    if settings.naive:
        return naive.uniform_input_error(x, target, weight_quant(rows), a_bits)
    if rows.shape[1] <= EXACT_INPUT_FAN_RATIO * rows.shape[0]:
        zp = torch.round(weight_quant.zero_point)
        w_codes = asym_codes(rows, weight_quant.scale, weight_quant.zero_point, weight_quant.n_bits)
        exact = uniform_input_error(x, target, w_codes - zp, weight_quant.scale[:, 0], a_bits)
        if exact is not None:
            return exact
    w_hat = weight_quant(rows)

    def score_x(scales: Tensor, zps: Tensor) -> Tensor:
        def quantize(inp: Tensor, sl: slice) -> Tensor:
            return asym_fake_quant(inp, scales[sl, :, None], zps[sl, :, None], a_bits)

        return linear_input_error(x, target, w_hat, quantize, scales.shape[0])[:, None]

    return score_x


def _set_rows(quantizer: UniformQuantizer, result) -> None:
    shape = quantizer.scale.shape
    quantizer.set_params(result.scale.reshape(shape), result.zero_point.reshape(shape))


def channelwise_input_search(
    x: Tensor, n_bits: int, settings: SearchSettings
) -> tuple[Tensor, Tensor]:
    """§3 step 1: per-channel (scale, zero point) minimising the per-channel input error."""
    grid = activation_grid(x.reshape(-1, x.shape[-1]).T, n_bits, settings.eq_n)
    best = _search(settings, input_self_error(x, n_bits), grid, ACTIVATION_SCALE_FLOOR)
    return best.scale, best.zero_point


def calibrate_post_gelu_log(
    x: Tensor,
    y: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    weight_quant: UniformQuantizer,
    input_quant: LogQuantizer,
    settings: SearchSettings,
    transplant: bool = True,
    token_norm: bool = False,
) -> None:
    """§5.7(C): fc2 behind GELU with a shifted AdaLog (or log2 / log√2) input quantizer.

    With ``transplant`` (reference) log2/log√2 take the scale found by the AdaLog search
    (§10.8): every round, including its weight search, runs with the AdaLog quantizer, and the
    scale moves into the log2/log√2 quantizer at the end. Otherwise they search their own scale
    over the same range, and the weight searches see their own quantizer. With ``token_norm``
    every search weighs a token's squared output error by ``1 / ‖x_t‖²`` (beyond the reference).
    """
    target = y if bias is None else y - bias
    weights = token_norm_weights(x) if token_norm else None
    root = None if weights is None else weights.sqrt()[:, None]
    weighted_target = target if root is None else target * root  # for the weight searches
    n_w, n_a = weight_quant.n_bits, input_quant.n_bits
    shift = float(input_quant.shift)
    w_grid = weight_grid(weight, n_w, settings.eq_n, settings.zp_cap)
    _set_rows(weight_quant, _search(settings, weight_self_error(weight, n_w), w_grid))
    scale_grid = adalog_scale_grid(x, settings.eq_n, shift)
    log_x = log_exponent(x, shift)
    q_cands = adalog_q_candidates(settings.eq_n, device=x.device)
    scale, q = scale_grid.scales[-2], torch.tensor(37, device=x.device)
    own_kind = input_quant.kind if not transplant else "adalog"
    for _ in range(settings.rounds):
        scorer_type = naive.LogInputScorer if settings.naive else _LogInputScorer
        inputs = x if settings.naive else log_x
        scorer = scorer_type(inputs, target, weight_quant(weight), n_a, shift, weights)
        if own_kind == "adalog":
            search = fpcs_adalog if settings.fpcs else exhaustive_adalog
            kwargs = {"steps": settings.steps} if settings.fpcs else {"eq_n": settings.eq_n}
            fixed_scale = scale

            def score_q(qs: Tensor, sc=scorer, s=fixed_scale) -> Tensor:
                return sc.adalog(s.expand(qs.shape[0]), qs)

            result = search(
                score_q,
                scorer.adalog,
                scale_grid.lo,
                scale_grid.hi,
                q_cands,
                **kwargs,
            )
            scale, q = result.scale, result.q
        else:
            scale = _fixed_base_scale(scorer, own_kind, scale_grid, settings)
        _set_log(input_quant, scale, q)
        if own_kind == input_quant.kind:
            x_hat = input_quant(x)
        else:  # transplant: the round's quantizer is AdaLog (scale, q)
            x_hat = log_fake_quant(x, scale, n_a, "adalog", int(q), shift=shift)
        weighted_x = x_hat if root is None else x_hat * root
        score_w = _weight_score(settings, weighted_x, weighted_target, weight, n_w)
        _set_rows(weight_quant, _search(settings, score_w, w_grid))
    _set_log(input_quant, scale, q)


def token_norm_weights(x: Tensor) -> Tensor:
    """``1 / ‖x_t‖²`` per token (row of ``x``), scaled to mean 1 (which changes no argmin)."""
    weights = x.double().square().sum(1).clamp_min(1e-24).reciprocal()
    return (weights / weights.mean()).to(x.dtype)


def _set_log(quantizer: LogQuantizer, scale: Tensor, q: Tensor) -> None:
    quantizer.set_params(scale=scale, q=q if quantizer.kind == "adalog" else None)


def _fixed_base_scale(scorer, kind: str, scale_grid, settings: SearchSettings) -> Tensor:
    """Scale-only search of a log2/log√2 quantizer over the AdaLog range (option 'own')."""
    scales = scale_grid.scales[:, None]
    zeros = torch.zeros_like(scales)

    def score(s: Tensor, _z: Tensor) -> Tensor:
        return scorer.fixed(s[:, 0], kind)[:, None]

    return _search(settings, score, UniformGrid(scales, zeros)).scale[0]


class _LogInputScorer:
    """Per-tensor layer-output error of log-quantized inputs (post-GELU fc2); see
    :class:`LogInputError` for how refinement candidates reuse their parents' products."""

    #: Level-table keys of the fixed-base kinds (AdaLog uses its q, which is positive).
    FIXED_KEYS = {"log2": -1, "logsqrt2": -2}

    def __init__(self, log_x, target, w_hat, n_bits, shift, token_weights=None) -> None:
        self.n_bits = n_bits
        self.error = LogInputError(log_x, target, w_hat, shift, token_weights=token_weights)

    def adalog(self, scales: Tensor, qs: Tensor) -> Tensor:
        levels = adalog_levels(qs.long(), self.n_bits, dtype=scales.dtype)
        ratios = ADALOG_R / qs.to(scales.dtype)
        return self.error(levels, qs.tolist(), scales, torch.log2(scales), ratios)

    def fixed(self, scales: Tensor, kind: str) -> Tensor:
        n = 2**self.n_bits
        ratio = 1.0 if kind == "log2" else 2.0
        k = torch.arange(n, dtype=scales.dtype, device=scales.device)
        levels = (2.0 ** (-k / ratio)).expand(scales.shape[0], n)
        keys = [self.FIXED_KEYS[kind]] * scales.shape[0]
        return self.error(levels, keys, scales, torch.log2(scales), torch.full_like(scales, ratio))


def calibrate_post_gelu_twin(
    x: Tensor,
    y: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    weight_quant: UniformQuantizer,
    input_quant: TwinUniformQuantizer,
    settings: SearchSettings,
) -> None:
    """§5.7(D): PTQ4ViT twin-uniform post-GELU input, s_pos from 29 powers of two."""
    target = y if bias is None else y - bias
    n_w, n_a = weight_quant.n_bits, input_quant.n_bits
    half = 2 ** (n_a - 1)
    s_neg = torch.tensor(twin_neg_scale(n_a), device=x.device)  # default dtype, as before
    input_quant.set_params(s_pos=x.abs().max() / (half - 0.5), s_neg=s_neg)
    w_grid = weight_grid(weight, n_w, settings.eq_n, settings.zp_cap)
    _set_rows(weight_quant, _search(settings, weight_self_error(weight, n_w), w_grid))
    candidates = twin_pos_candidates(n_a, device=x.device)
    for _ in range(settings.rounds):
        w_hat = weight_quant(weight)

        def quantize(inp: Tensor, sl: slice) -> Tensor:
            return twin_fake_quant(inp, candidates[sl, None, None], s_neg, n_a)

        if settings.naive:
            one = lambda inp, k: quantize(inp, slice(k, k + 1))[0]  # noqa: E731
            errors = naive.input_output_error(x, target, w_hat, one, candidates.numel())
        else:
            errors = linear_input_error(x, target, w_hat, quantize, candidates.numel())
        input_quant.set_params(s_pos=candidates[int(torch.argmin(errors))])
        score_w = _weight_score(settings, input_quant(x), target, weight, n_w)
        _set_rows(weight_quant, _search(settings, score_w, w_grid))


# -- matmuls -------------------------------------------------------------------------------------


def _head_groups(t: Tensor) -> Tensor:
    """``(B, H, ·, ·)`` → ``(H, B·rest)`` for per-head grids."""
    return t.transpose(0, 1).reshape(t.shape[1], -1)


def _per_head(quantizer: UniformQuantizer, result) -> None:
    quantizer.set_params(result.scale.reshape(1, -1, 1, 1), result.zero_point.reshape(1, -1, 1, 1))


def _init_per_head(quantizer: UniformQuantizer, grid: UniformGrid) -> None:
    s, z = initial_candidate(grid.scales, grid.zero_points)
    quantizer.set_params(s.reshape(1, -1, 1, 1), z.reshape(1, -1, 1, 1))


def _operand_a_score(a: Tensor, b_hat: Tensor, target: Tensor, n_bits: int) -> GramOperandError:
    """Per-head error of ``Â @ B̂`` over A candidates: A's rows against the Gram ``B̂B̂ᵀ``."""
    b_t = b_hat.transpose(-1, -2)
    return GramOperandError(a, b_hat @ b_t, target @ b_t, n_bits)


def _operand_b_score(a_hat: Tensor, b: Tensor, target: Tensor, n_bits: int) -> GramOperandError:
    """Per-head error of ``Â @ B̂`` over B candidates: B's columns against the Gram ``ÂᵀÂ``."""
    return GramOperandError(
        b.transpose(-1, -2),
        a_hat.transpose(-1, -2) @ a_hat,
        target.transpose(-1, -2) @ a_hat,
        n_bits,
    )


def _operand_b(settings: SearchSettings):
    return naive.operand_b_error if settings.naive else _operand_b_score


def calibrate_matmul_qk(
    a: Tensor,
    b: Tensor,
    a_quant: UniformQuantizer,
    b_quant: UniformQuantizer,
    settings: SearchSettings,
) -> None:
    """§5.7(E): per-head A (q) and B (kᵀ), alternating on the per-head output error."""
    target = a @ b
    n_b = b_quant.n_bits
    a_grid = matmul_grid(_head_groups(a), n_b, settings.eq_n)
    b_grid = matmul_grid(_head_groups(b), n_b, settings.eq_n)
    _init_per_head(a_quant, a_grid)
    _init_per_head(b_quant, b_grid)
    for _ in range(settings.rounds):
        make_a = naive.operand_a_error if settings.naive else _operand_a_score
        score_a = make_a(a, b_quant(b), target, a_quant.n_bits)
        _per_head(a_quant, _search(settings, score_a, a_grid))
        score_b = _operand_b(settings)(a_quant(a), b, target, n_b)
        _per_head(b_quant, _search(settings, score_b, b_grid))


def calibrate_matmul_av(
    attn: Tensor, v: Tensor, a_quant, b_quant: UniformQuantizer, settings: SearchSettings
) -> None:
    """§5.7(F): post-Softmax A (base search, scale 1) and per-head v."""
    target = attn @ v
    n_b = b_quant.n_bits
    b_grid = matmul_grid(_head_groups(v), n_b, settings.eq_n)
    _init_per_head(b_quant, b_grid)
    if isinstance(a_quant, UniformQuantizer):
        return _calibrate_av_uniform(attn, v, target, a_quant, b_quant, b_grid, settings)
    searches_base = a_quant.kind == "adalog"
    n_s = a_quant.n_bits
    base_error = None if settings.naive else _AvBaseError(attn, target, n_s)
    for _ in range(settings.rounds if searches_base else 1):
        if searches_base:
            v_hat = b_quant(v)
            if base_error is None:
                score_q = naive.post_softmax_base_error(attn, v_hat, target, n_s)
            else:
                score_q = partial(base_error, v_hat=v_hat)
            q_cands = adalog_q_candidates(settings.eq_n, device=attn.device)
            a_quant.set_q(best_q(score_q, q_cands).q)
        score_b = _operand_b(settings)(a_quant(attn), v, target, n_b)
        _per_head(b_quant, _search(settings, score_b, b_grid))


class _AvBaseError:
    """Errors of ``AdaLog_q(attn; scale 1) @ v̂`` for candidate bases q (§5.6).

    With scale 1 the clamped exponent ``-log2 attn`` is the same for every q, so it is computed
    once; each q costs one multiply-round into reused buffers, a table lookup and the matmul.
    """

    def __init__(self, attn: Tensor, target: Tensor, n_bits: int) -> None:
        log_attn = torch.log2(attn.clamp_min(torch.finfo(attn.dtype).tiny))
        # = log_codes_from_exponent(log_attn, 0, ratio) before its multiply: same float steps
        self.exponent = (0.0 - log_attn).clamp_(0.0, LOG_FLOOR_EXPONENT)
        self.target, self.n_bits = target, n_bits
        self._scaled = torch.empty_like(self.exponent)
        self._codes = torch.empty(attn.shape, dtype=torch.int32, device=attn.device)
        self._values = torch.empty_like(attn)

    def __call__(self, qs: Tensor, v_hat: Tensor) -> Tensor:
        return torch.stack([self._error(int(q), v_hat) for q in qs])

    def _error(self, q: int, v_hat: Tensor) -> Tensor:
        device = self.exponent.device
        ratio = torch.tensor(ADALOG_R / q, device=device)  # default dtype, as it always was
        torch.mul(self.exponent, ratio, out=self._scaled).round_()
        codes = self._codes.copy_(self._scaled).view(-1)
        max_code = int(LOG_FLOOR_EXPONENT * ADALOG_R / q) + 1
        q_t = torch.tensor(q, dtype=torch.int64, device=device)
        levels = adalog_levels(q_t, self.n_bits, dtype=self._values.dtype)
        lut = log_lut(levels, torch.ones((), dtype=levels.dtype, device=device), 0.0, max_code)
        torch.index_select(lut, 0, codes, out=self._values.view(-1))
        return (self._values @ v_hat - self.target).square_().sum()


def _calibrate_av_uniform(attn, v, target, a_quant, b_quant, b_grid, settings) -> None:
    """Uniform post-Softmax ablation: per-tensor A and per-head v, alternating."""
    a_grid = matmul_grid(attn.reshape(1, -1), b_quant.n_bits, settings.eq_n)
    for _ in range(settings.rounds):
        v_hat = b_quant(v)

        def score_a(scales: Tensor, zps: Tensor, v_hat: Tensor = v_hat) -> Tensor:
            def part(sl: slice) -> Tensor:
                s, z = scales[sl].reshape(-1, 1, 1, 1, 1), zps[sl].reshape(-1, 1, 1, 1, 1)
                a_hat = asym_fake_quant(attn[None], s, z, a_quant.n_bits)
                return (a_hat @ v_hat - target).square_().sum((1, 2, 3, 4))[:, None]

            return in_chunks(scales.shape[0], 2 * attn.numel(), part)

        best = _search(settings, score_a, a_grid)
        a_quant.set_params(best.scale.reshape(1), best.zero_point.reshape(1))
        score_b = _operand_b(settings)(a_quant(attn), v, target, b_quant.n_bits)
        _per_head(b_quant, _search(settings, score_b, b_grid))


# -- conv ---------------------------------------------------------------------------------------


def calibrate_conv_weight(
    patches: Tensor,
    y: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    weight_quant: UniformQuantizer,
    settings: SearchSettings,
) -> None:
    """§5.7(G): one FPCS of the per-out-channel weight on the conv output, FP input.

    ``patches``: unfolded input ``(T, C·kh·kw)``; ``y``: outputs ``(T, O)``.
    """
    rows = weight.reshape(weight.shape[0], -1)
    target = y if bias is None else y - bias
    zp_cap = settings.zp_cap if settings.conv_zp_cap else None  # reference: uncapped (§10.10)
    grid = weight_grid(rows, weight_quant.n_bits, settings.eq_n, zp_cap=zp_cap)
    score = _weight_score(settings, patches, target, rows, weight_quant.n_bits)
    _set_rows(weight_quant, _search(settings, score, grid))
