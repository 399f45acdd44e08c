"""Tests for the quantizer math (docs/algorithm.md §1, §10 items 4/5/26, §11.1, §12 items 1/2/9)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from adalog.quant import (
    ADALOG_R,
    GELU_SHIFT,
    LogQuantizer,
    TwinUniformQuantizer,
    UniformQuantizer,
    adalog_denominator,
    adalog_dequant_table,
    adalog_levels,
    adalog_lut_numerators,
    adalog_q_candidates,
    adalog_tables,
    asym_codes,
    asym_fake_quant,
    check_n_bits,
    log_codes,
    log_dequant,
    log_fake_quant,
    logsqrt2_dequant,
    twin_fake_quant,
)

Q_ALL = list(range(10, 138))

# §1.6 test vectors: (b, q) -> (T1, D·T2)
SPEC_VECTORS = {
    (3, 37): ([0, 1, 2, 3, 4, 5, 6, 7], [14] * 8),
    (3, 25): ([0, 0, 1, 2, 2, 3, 4, 4], [14, 9, 11, 14, 9, 11, 13, 8]),
    (3, 18): ([0, 0, 0, 1, 1, 2, 2, 3], [14, 10, 7, 10, 7, 10, 7, 11]),
    (4, 25): (
        [0, 0, 1, 2, 2, 3, 4, 4, 5, 6, 6, 7, 8, 8, 9, 10],
        [30, 19, 24, 29, 18, 23, 29, 18, 23, 28, 18, 22, 28, 17, 22, 27],
    ),
    (4, 18): (
        [0, 0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7],
        [30, 21, 15, 22, 16, 22, 16, 23, 16, 23, 16, 24, 17, 24, 17, 24],
    ),
}


def _positive_inputs(n_bits: int, scale: float, n: int = 4096, seed: int = 0) -> torch.Tensor:
    """Positive values spanning every code of a b-bit log quantizer and beyond (both ends)."""
    g = torch.Generator().manual_seed(seed)
    octaves = torch.rand(n, generator=g) * (1.3 * 2**n_bits) - 1.0
    return scale * torch.exp2(-octaves)


# ---------------------------------------------------------------------------------------------
# AdaLog tables (§1.6, §11.1, §12.2)


def test_q_candidates_and_denominators() -> None:
    q = adalog_q_candidates()
    assert q.dtype == torch.int64 and q[0] == 10 and q[-1] == 137 and len(q) == 128
    assert [adalog_denominator(b) for b in (3, 4, 6)] == [14, 30, 126]


@pytest.mark.parametrize(("n_bits", "q"), sorted(SPEC_VECTORS))
def test_adalog_tables_match_spec_vectors(n_bits: int, q: int) -> None:
    t1_ref, num_ref = SPEC_VECTORS[(n_bits, q)]
    t1, t2 = adalog_tables(q, n_bits)
    assert t1.dtype == torch.int64 and t2.dtype == torch.float32
    assert t1.tolist() == t1_ref
    assert adalog_lut_numerators(q, n_bits).tolist() == num_ref
    assert torch.equal(t2, torch.tensor(num_ref, dtype=torch.float32) / adalog_denominator(n_bits))


def test_adalog_tables_batched_rows_equal_single() -> None:
    qs = torch.tensor([18, 25, 37])
    t1, t2 = adalog_tables(qs, 4)
    assert t1.shape == t2.shape == (3, 16)
    for row, q in enumerate(qs.tolist()):
        s1, s2 = adalog_tables(q, 4)
        assert torch.equal(t1[row], s1) and torch.equal(t2[row], s2)


def test_worked_example_b3_q25_code1() -> None:
    s = 2.5
    x = torch.tensor([0.626 * s])
    codes, valid = log_codes(x, s, 3, "adalog", q=25)
    assert codes.item() == 1 and valid.item()
    y = log_fake_quant(x, s, 3, "adalog", q=25)
    assert y.item() == pytest.approx(s * 9 / 14, rel=1e-7)
    exact = log_fake_quant(x, s, 3, "adalog", q=25, form="exact")
    assert exact.item() == pytest.approx(s * 2 ** (-25 / 37), rel=1e-6)


@pytest.mark.parametrize("n_bits", [3, 4, 6])
def test_table_within_rounding_bound_of_exact_power(n_bits: int) -> None:
    d = adalog_denominator(n_bits)
    q = torch.tensor(Q_ALL)
    t1, _ = adalog_tables(q, n_bits)
    num = adalog_lut_numerators(q, n_bits).double()
    iq = q[:, None] * torch.arange(2**n_bits)
    frac = torch.exp2(-(iq % ADALOG_R).double() / ADALOG_R)
    assert torch.equal(t1, iq // ADALOG_R)
    assert ((num - frac * d).abs() <= 0.5).all()
    assert ((num >= d / 2) & (num <= d)).all()
    # float32 levels, rescaled by 2^T1 where they are normal numbers: |T2 - exact| <= 1/(2D)
    levels = adalog_levels(q, n_bits).double()
    normal = t1 <= 100
    rescaled = (levels * torch.exp2(t1.double()))[normal]
    assert ((rescaled - frac[normal]).abs() <= 1 / (2 * d) + 1e-7).all()


@pytest.mark.parametrize("n_bits", [3, 4, 6])
def test_table_form_equals_120_entry_search_lut(n_bits: int) -> None:
    d = adalog_denominator(n_bits)
    lut = torch.round(2 ** (-torch.arange(120, dtype=torch.float32) / 37) * d) / d
    q = torch.tensor(Q_ALL)
    kq = q[:, None] * torch.arange(2**n_bits)
    search = lut[kq % 37] * torch.exp2(-(kq // 37).float())
    levels = adalog_levels(q, n_bits)
    assert torch.equal(torch.round(lut * d).long()[kq % 37], adalog_lut_numerators(q, n_bits))
    torch.testing.assert_close(levels, search, rtol=1.2e-7, atol=1e-44)  # ≤1 ulp (§12.2)
    # end to end: table-form fake quant == search LUT gathered by code, for every q
    s = 1.7
    x = _positive_inputs(n_bits, s, n=512)[None]
    codes, valid = log_codes(x, s, n_bits, "adalog", q=q[:, None])
    y = log_fake_quant(x, s, n_bits, "adalog", q=q[:, None])
    ref = torch.where(valid, s * search.gather(1, codes.long()), 0.0)
    torch.testing.assert_close(y, ref, rtol=1.2e-7, atol=1e-44)


# ---------------------------------------------------------------------------------------------
# Log2 / Log-√2 / AdaLog relations (§1.4, §1.5, §1.6)


@pytest.mark.parametrize("n_bits", [3, 4, 6])
def test_adalog_q37_equals_log2_exactly(n_bits: int) -> None:
    s = 0.83
    x = torch.cat([_positive_inputs(n_bits, s), torch.tensor([0.0, -1.0, s, 5 * s])])
    c_log2, v_log2 = log_codes(x, s, n_bits, "log2")
    c_ada, v_ada = log_codes(x, s, n_bits, "adalog", q=37)
    assert torch.equal(c_log2, c_ada) and torch.equal(v_log2, v_ada)
    # both paths exercised; at 6 bits the 1e-15 floor caps Log2 codes at 50 < 64 (§10 item 26)
    assert v_log2.any() and ((~v_log2).any() or n_bits == 6)
    y_log2 = log_fake_quant(x, s, n_bits, "log2")
    assert torch.equal(y_log2, log_fake_quant(x, s, n_bits, "adalog", q=37))
    assert torch.equal(y_log2, log_fake_quant(x, s, n_bits, "adalog", q=37, form="exact"))
    # Log2 grid: s·2^-k exactly
    assert torch.equal(y_log2[v_log2], s * torch.exp2(-c_log2[v_log2]))


@pytest.mark.parametrize("n_bits", [2, 3, 4, 6, 8])
def test_logsqrt2_eval_form_equals_exact_form(n_bits: int) -> None:
    s = torch.tensor(1.3)
    x = _positive_inputs(n_bits, 1.3)
    table = log_fake_quant(x, s, n_bits, "logsqrt2", form="table")
    exact = log_fake_quant(x, s, n_bits, "logsqrt2", form="exact")
    torch.testing.assert_close(table, exact, rtol=2e-7, atol=1e-44)
    codes = torch.arange(2**n_bits, dtype=torch.float32)
    valid = torch.ones_like(codes, dtype=torch.bool)
    ref = torch.tensor([1.3 * 2 ** (-k / 2) for k in range(2**n_bits)], dtype=torch.float32)
    torch.testing.assert_close(log_dequant(codes, valid, s, n_bits, "logsqrt2"), ref)


def test_log_code_rounding_and_saturation() -> None:
    s = 2.0
    x = torch.tensor([4.0, 2.0, 1.0, 2 * 2**-2.4, 2 * 2**-2.6, 2 * 2**-7.4, 2 * 2**-7.6])
    codes, valid = log_codes(x, s, 3, "log2")
    assert codes.tolist() == [0, 0, 1, 2, 3, 7, 7]
    assert valid.tolist() == [True] * 6 + [False]
    y = log_fake_quant(x, s, 3, "log2")
    assert y.tolist() == [2.0, 2.0, 1.0, 0.5, 0.25, 2 * 2**-7, 0.0]


# ---------------------------------------------------------------------------------------------
# Zeros and the 1e-15 floor (§10 item 26, §12 items 1/9)


def test_zero_survives_at_6_bits_for_q_at_least_30() -> None:
    s = 3.0
    x = torch.tensor([0.0, -0.5])
    for q in Q_ALL:
        y = log_fake_quant(x, s, 6, "adalog", q=q)
        if q <= 29:
            assert (y == 0).all(), q
        else:
            assert ((y > 1e-16 * s) & (y < 1e-14 * s)).all(), q
    assert torch.equal(log_fake_quant(x, s, 6, "log2"), torch.full((2,), s * 2.0**-50))
    assert (log_fake_quant(x, s, 6, "logsqrt2") == 0).all()


def test_zero_at_3_and_4_bits() -> None:
    x = torch.tensor([0.0, -2.0])
    for kind in ("log2", "logsqrt2"):
        for n_bits in (3, 4):
            assert (log_fake_quant(x, 1.0, n_bits, kind) == 0).all()
    for q in Q_ALL:
        assert (log_fake_quant(x, 1.0, 3, "adalog", q=q) == 0).all()
        y4 = log_fake_quant(x, 1.0, 4, "adalog", q=q)
        # §10 item 26 says "every 3/4-bit case gives exactly 0"; at 4 bits that holds only for
        # q <= 118: round(49.83·37/q) < 16 once q >= 119, leaving ≈1e-15·s as at 6 bits.
        assert (y4 == 0).all() if q <= 118 else (y4 > 0).all(), q


# ---------------------------------------------------------------------------------------------
# Shift (§1.7, §4)


def test_shift_folded_and_unfolded() -> None:
    s = 1.5
    x = torch.linspace(-0.17, 1.3, 101)
    plain = log_fake_quant(x + GELU_SHIFT, s, 4, "adalog", q=25)
    unfolded = log_fake_quant(x, s, 4, "adalog", q=25, shift=GELU_SHIFT)
    folded = log_fake_quant(x, s, 4, "adalog", q=25, shift=GELU_SHIFT, shift_folded=True)
    assert torch.equal(folded, plain)
    assert torch.equal(unfolded, plain - GELU_SHIFT)
    as_tensors = log_fake_quant(
        x, s, 4, "adalog", q=25, shift=torch.tensor(GELU_SHIFT), shift_folded=torch.tensor(True)
    )
    assert torch.equal(as_tensors, folded)


def test_gelu_minimum_maps_to_minus_shift() -> None:
    gelu = torch.nn.functional.gelu
    xs = torch.linspace(-0.7518 - 1e-3, -0.7518 + 1e-3, 11)
    gelu_min = gelu(xs).min()
    assert gelu_min.item() == pytest.approx(-0.1699712, abs=1e-6)
    for x in (gelu_min, torch.tensor(-GELU_SHIFT)):
        x = x.reshape(1)
        codes, valid = log_codes(x + GELU_SHIFT, 2.0, 4, "adalog", q=37)
        assert not valid.item()
        y = log_fake_quant(x, 2.0, 4, "adalog", q=37, shift=GELU_SHIFT)
        assert y.item() == pytest.approx(-GELU_SHIFT, abs=1e-7)
    # GELU(0) = 0 sits at 0.17 in the shifted domain and comes back close to 0
    y0 = log_fake_quant(torch.zeros(1), 2.0, 4, "adalog", q=37, shift=GELU_SHIFT)
    assert y0.item() == pytest.approx(2.0 * 2**-4 - GELU_SHIFT, abs=1e-7)


# ---------------------------------------------------------------------------------------------
# Uniform quantizers (§1.2, §1.3)


@pytest.mark.parametrize("n_bits", [2, 3, 4, 6, 8])
def test_uniform_grid_round_trip(n_bits: int) -> None:
    n = 2**n_bits
    s, z = 0.037, float(n // 2 - 1)
    grid = (torch.arange(n, dtype=torch.float32) - z) * s
    codes = asym_codes(grid, torch.tensor(s), torch.tensor(z), n_bits)
    assert codes.tolist() == list(range(n))
    assert torch.equal(asym_fake_quant(grid, torch.tensor(s), torch.tensor(z), n_bits), grid)
    # clipping range [-z·s, (N-1-z)·s]
    out = asym_fake_quant(torch.tensor([-1e6, 1e6]), torch.tensor(s), torch.tensor(z), n_bits)
    assert out.tolist() == [grid[0].item(), grid[-1].item()]


def test_uniform_rounds_before_adding_zero_point() -> None:
    s = torch.tensor(1.0)
    # x/s = 0.5 rounds to 0 (half to even) before z = 3 is added; round(3.5) would give 4.
    assert asym_codes(torch.tensor([0.5]), s, torch.tensor(3.0), 4).item() == 3
    # a non-integer stored zero point is rounded: z = 2.6 acts as 3, on both sides
    x = torch.tensor([0.3, 1.0, -2.0])
    assert asym_codes(x, s, torch.tensor(2.6), 4).tolist() == [3, 4, 1]
    assert asym_fake_quant(x, s, torch.tensor(2.6), 4).tolist() == [0.0, 1.0, -2.0]
    # half-to-even on x/s: 1.5 -> 2, 2.5 -> 2
    assert asym_codes(torch.tensor([1.5, 2.5]), s, torch.tensor(0.0), 4).tolist() == [2, 2]


def test_twin_uniform_levels() -> None:
    n_bits, s_pos, s_neg = 3, torch.tensor(0.5), torch.tensor(GELU_SHIFT / 4)
    x = torch.tensor([10.0, 1.24, 0.26, 0.0, -0.03, -0.1699, -5.0])
    y = twin_fake_quant(x, s_pos, s_neg, n_bits)
    expected = [1.5, 1.0, 0.5, 0.0, -s_neg.item(), -4 * s_neg.item(), -4 * s_neg.item()]
    torch.testing.assert_close(y, torch.tensor(expected))


# ---------------------------------------------------------------------------------------------
# Candidate batching (§5.8)


def test_candidate_batching_matches_loop() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 9, 6, generator=g) * 2
    k = 5
    scales = torch.rand(k, 1, 1, generator=g) + 0.05
    zps = torch.randint(4, 12, (k, 1, 1), generator=g).float()
    qs = torch.tensor([12, 25, 37, 60, 137]).view(k, 1, 1)
    batched = {
        "uniform": asym_fake_quant(x, scales, zps, 4),
        "twin": twin_fake_quant(x, scales, scales / 8, 4),
        "log2": log_fake_quant(x, scales, 4, "log2"),
        "adalog": log_fake_quant(x.abs(), scales, 4, "adalog", q=qs, shift=0.1),
        "adalog_scale_only": log_fake_quant(x.abs(), scales, 4, "adalog", q=25),
    }
    for i in range(k):
        s, z, q = scales[i], zps[i], int(qs[i])
        assert torch.equal(batched["uniform"][i], asym_fake_quant(x[0], s, z, 4))
        assert torch.equal(batched["twin"][i], twin_fake_quant(x[0], s, s / 8, 4))
        assert torch.equal(batched["log2"][i], log_fake_quant(x[0], s, 4, "log2"))
        single = log_fake_quant(x[0].abs(), s, 4, "adalog", q=q, shift=0.1)
        assert torch.equal(batched["adalog"][i], single)
        single25 = log_fake_quant(x[0].abs(), s, 4, "adalog", q=25)
        assert torch.equal(batched["adalog_scale_only"][i], single25)
    # the search fast path: precomputed (K, N) levels gathered against (K, ...) codes
    codes, valid = log_codes(x.abs(), scales, 4, "adalog", q=qs)
    fast = adalog_dequant_table(codes, valid, scales, adalog_levels(qs.view(-1), 4))
    assert torch.equal(fast, log_fake_quant(x.abs(), scales, 4, "adalog", q=qs))


def test_candidate_q_must_vary_along_leading_dim() -> None:
    with pytest.raises(ValueError, match="leading dimension"):
        q = torch.tensor([20, 30]).view(1, 2, 1)
        log_fake_quant(torch.ones(1, 2, 4), 1.0, 4, "adalog", q=q)


def test_argument_validation() -> None:
    x = torch.ones(3)
    with pytest.raises(ValueError, match="kind"):
        log_fake_quant(x, 1.0, 4, "log10")
    with pytest.raises(ValueError, match="needs the base parameter q"):
        log_fake_quant(x, 1.0, 4, "adalog")
    with pytest.raises(ValueError, match="form='exact'"):
        log_fake_quant(x, 1.0, 4, "adalog", q=25, ste=True)
    with pytest.raises(ValueError, match="form"):
        log_fake_quant(x, 1.0, 4, "adalog", q=25, form="lut")


# ---------------------------------------------------------------------------------------------
# Property tests: no NaN/Inf, codes in range, valid flag consistent


FINITE_F32 = st.floats(width=32, allow_nan=False, allow_infinity=False)
SPECIALS = torch.tensor([0.0, -0.0, 1e-45, -1e-45, 1e-38, 3.4e38, -3.4e38, 1e30, -1e30])
ARRAYS = hnp.arrays(
    np.float32, hnp.array_shapes(min_dims=1, max_dims=2, max_side=8), elements=FINITE_F32
)
SCALES = st.floats(float(np.float32(1e-6)), 1e3, width=32)
BITS = st.sampled_from([2, 3, 4, 6, 8])


def _input(arr: np.ndarray) -> torch.Tensor:
    return torch.cat([torch.from_numpy(arr.copy()).reshape(-1), SPECIALS])


@settings(max_examples=150, deadline=None)
@given(arr=ARRAYS, scale=SCALES, n_bits=BITS, data=st.data())
def test_uniform_property(arr: np.ndarray, scale: float, n_bits: int, data) -> None:
    n = 2**n_bits
    zp = float(data.draw(st.integers(0, n - 1)))
    x, s, z = _input(arr), torch.tensor(scale), torch.tensor(zp)
    codes = asym_codes(x, s, z, n_bits)
    assert ((codes >= 0) & (codes <= n - 1)).all() and torch.equal(codes, codes.round())
    y = asym_fake_quant(x, s, z, n_bits)
    assert torch.isfinite(y).all()
    assert (y >= -zp * s - 1e-6 * s).all() and (y <= (n - 1 - zp) * s * (1 + 1e-6)).all()
    y_twin = twin_fake_quant(x, s, s / 3, n_bits)
    assert torch.isfinite(y_twin).all()
    assert torch.equal(asym_fake_quant(x, s, z, n_bits, ste=True), y)


@settings(max_examples=200, deadline=None)
@given(
    arr=ARRAYS,
    scale=SCALES,
    n_bits=BITS,
    kind=st.sampled_from(["log2", "logsqrt2", "adalog"]),
    q=st.integers(10, 137),
    form=st.sampled_from(["table", "exact"]),
    shift=st.sampled_from([0.0, GELU_SHIFT]),
)
def test_log_property(arr, scale, n_bits, kind, q, form, shift) -> None:
    n = 2**n_bits
    x = _input(arr)
    codes, valid = log_codes(x + shift, scale, n_bits, kind, q=q)
    assert ((codes >= 0) & (codes <= n - 1)).all() and torch.equal(codes, codes.round())
    assert (codes[~valid] == n - 1).all()  # invalid codes were >= N before clamping
    y = log_fake_quant(x, scale, n_bits, kind, q=q, form=form, shift=shift)
    assert torch.isfinite(y).all()
    folded = y + shift
    assert (folded[~valid] == 0).all()
    assert (folded >= 0).all() and (folded <= scale * (1 + 1e-6) + shift * 1e-6).all()
    y_ste = log_fake_quant(x, scale, n_bits, kind, q=q, form="exact", shift=shift, ste=True)
    assert torch.isfinite(y_ste).all()


# ---------------------------------------------------------------------------------------------
# Straight-through estimator (§0.2, §1.2, §10 item 20)


def test_uniform_ste_gradients() -> None:
    s, z = torch.tensor(0.25, requires_grad=True), torch.tensor(8.0)
    # codes 8, 4, 13, then exactly on the bounds 15 and 0, then two clipped elements
    x = torch.tensor([0.1, -0.9, 1.3, 1.8, -1.95, -5.0, 5.0], requires_grad=True)
    asym_fake_quant(x, s, z, 4, ste=True).sum().backward()
    assert x.grad.tolist() == [1.0] * 5 + [0.0, 0.0]  # closed range keeps the bounds
    v = x.detach() / 0.25
    inside = (torch.round(v) - v)[:5].sum()
    clipped = (0 - 8) + (15 - 8)  # (c - z) for the clipped elements
    assert s.grad.item() == pytest.approx(inside.item() + clipped, abs=1e-5)


def test_round_ste_survives_overflow() -> None:
    x = torch.tensor([3e38], requires_grad=True)
    y = asym_fake_quant(x, torch.tensor(1e-6), torch.tensor(0.0), 4, ste=True)
    y.sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()


def test_log_ste_scale_gradient_only_from_saturated_elements() -> None:
    s = torch.tensor(1.0, requires_grad=True)
    x = torch.tensor([0.9, 0.3, 0.05, 1.5, 3.0, 1e-9], requires_grad=True)
    y = log_fake_quant(x, s, 4, "adalog", q=25, form="exact", ste=True)
    y.sum().backward()
    assert s.grad.item() == pytest.approx(2.0, abs=1e-5)  # the two elements >= s
    # non-saturated, valid elements: d x̂/dx = x̂/x; saturated and invalid ones: 0
    ref = torch.cat([(y[:3] / x[:3]).detach(), torch.zeros(3)])
    torch.testing.assert_close(x.grad, ref)


# ---------------------------------------------------------------------------------------------
# Modules


def test_check_n_bits() -> None:
    for good in (2, 3, 4, 6, 8, 32, np.int64(4)):
        assert check_n_bits(good) == int(good)
    for bad in (1, 9, 16, 0, -4, 4.0, True, "4"):
        with pytest.raises(ValueError, match="n_bits must be an integer in 2..8"):
            check_n_bits(bad)
    with pytest.raises(ValueError):
        UniformQuantizer(9)
    with pytest.raises(ValueError):
        LogQuantizer(1)
    with pytest.raises(ValueError, match="kind"):
        LogQuantizer(4, kind="log3")


def test_identity_quantizers() -> None:
    x = torch.randn(4, 5)
    for quant in (UniformQuantizer(32), TwinUniformQuantizer(32), LogQuantizer(32)):
        assert quant.n_bits == 32 and quant(x) is x
        with pytest.raises(RuntimeError, match="identity"):
            quant.quantize(x)


def test_uniform_module_per_row_and_resize() -> None:
    w = torch.randn(4, 10)
    quant = UniformQuantizer(4, shape=(4, 1)).eval()
    scale = w.abs().amax(1, keepdim=True) / 7
    quant.set_params(scale, torch.full((4, 1), 8.0))
    assert torch.equal(quant(w), asym_fake_quant(w, scale, torch.tensor(8.0), 4))
    codes = quant.quantize(w)
    assert codes.dtype == torch.int64 and torch.equal(quant.dequantize(codes), quant(w))
    # per-row -> per-tensor switch resizes the buffers; a state dict carries the new shape
    quant.set_params(torch.tensor([0.2]), torch.tensor([7.0]))
    assert quant.scale.shape == (1,) and quant.zero_point.shape == (1,)
    fresh = UniformQuantizer(4, shape=(4, 1))
    fresh.load_state_dict(quant.state_dict())
    assert fresh.scale.shape == (1,) and torch.equal(fresh.eval()(w), quant(w))
    assert "n_bits=4" in repr(quant)


def test_twin_module_codes() -> None:
    quant = TwinUniformQuantizer(4).eval()
    quant.set_params(s_pos=0.5, s_neg=GELU_SHIFT / 8)
    x = torch.tensor([-1.0, -0.05, 0.0, 0.6, 2.0, 100.0])
    codes = quant.quantize(x)
    assert codes.tolist() == [-8, -2, 0, 1, 4, 7]
    assert torch.equal(quant.dequantize(codes), quant(x))


def test_log_module_state_dict_round_trip() -> None:
    quant = LogQuantizer(4, kind="adalog", shift=GELU_SHIFT).eval()
    quant.set_params(scale=1.7, q=25)
    assert quant.t1.tolist() == SPEC_VECTORS[(4, 25)][0]
    fresh = LogQuantizer(4, kind="adalog", shift=GELU_SHIFT).eval()
    assert fresh.q.item() == 37 and fresh.t1.tolist() == list(range(16))
    fresh.load_state_dict(quant.state_dict())
    assert fresh.q.item() == 25 and fresh.scale.item() == pytest.approx(1.7)
    assert torch.equal(fresh.t1, quant.t1) and torch.equal(fresh.t2, quant.t2)
    x = torch.linspace(-0.2, 2.0, 200)
    assert torch.equal(fresh(x), quant(x))
    # q is authoritative: stale tables in a checkpoint are rebuilt on load
    state = quant.state_dict()
    state["q"] = torch.tensor(18)
    fresh.load_state_dict(state)
    assert fresh.t1.tolist() == SPEC_VECTORS[(4, 18)][0]
    assert "q=18" in repr(fresh)


def test_log_module_q_changes_rebuild_tables() -> None:
    quant = LogQuantizer(3)
    quant.set_q(18)
    assert adalog_lut_numerators(18, 3).tolist() == (quant.t2 * 14).round().long().tolist()
    for bad in (0, 2.5):
        with pytest.raises(ValueError, match="positive integer"):
            quant.set_q(bad)
    with pytest.raises(ValueError, match="only for kind='adalog'"):
        LogQuantizer(4, kind="log2").set_params(q=25)


@pytest.mark.parametrize("kind", ["log2", "logsqrt2", "adalog"])
def test_log_module_quantize_dequantize(kind: str) -> None:
    quant = LogQuantizer(4, kind=kind, shift=GELU_SHIFT).eval()
    quant.set_params(scale=2.0)
    if kind == "adalog":
        quant.set_q(25)
    x = torch.cat([torch.tensor([-GELU_SHIFT, 0.0, 5.0]), torch.rand(100) * 2])
    codes = quant.quantize(x)
    assert codes.dtype == torch.int64 and codes[0].item() == 16  # zero state is coded as N
    assert ((codes >= 0) & (codes <= 16)).all()
    assert torch.equal(quant.dequantize(codes), quant(x))
    quant.set_shift_folded()
    assert torch.equal(quant(x), quant.dequantize(codes))
    assert quant(x)[0].item() == 0.0


def test_log_module_train_mode_uses_exact_power() -> None:
    quant = LogQuantizer(3)
    quant.set_params(scale=1.0, q=25)
    x = torch.tensor([0.626])
    assert quant.eval()(x).item() == pytest.approx(9 / 14, rel=1e-7)  # table (eval)
    assert quant.train()(x).item() == pytest.approx(2 ** (-25 / 37), rel=1e-6)  # exact (train)
    quant.scale.requires_grad_(True)
    quant(torch.tensor([0.3, 2.0])).sum().backward()
    assert quant.scale.grad.item() == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("n_bits,q", [(3, 29), (4, 41), (4, 137), (6, 50)])
def test_adalog_tables_follow_the_module_dtype_exactly(n_bits: int, q: int):
    """Cast to float64, T2 is (D·T2)/D rounded in float64, not the float32 T2 widened; cast
    back, it is bit-identical to the float32 tables."""
    quant = LogQuantizer(n_bits, "adalog")
    quant.set_q(q)
    numerators = adalog_lut_numerators(torch.tensor(q), n_bits)
    d = adalog_denominator(n_bits)
    double = quant.double()
    assert double.t2.dtype == torch.float64
    assert torch.equal(double.t2, numerators.double() / d)
    assert not torch.equal(double.t2, (numerators.float() / d).double())  # float32 rounding gone
    assert torch.equal(double.float().t2, adalog_tables(torch.tensor(q), n_bits)[1])
    double = double.double()
    double.set_q(q + 1)  # a search setting q on a float64 model keeps float64 tables
    t2 = adalog_lut_numerators(torch.tensor(q + 1), n_bits).double() / d
    assert torch.equal(double.t2, t2)
    levels = adalog_levels(q + 1, n_bits, dtype=torch.float64)
    assert torch.equal(double.levels(), levels)
    assert torch.equal(levels, t2 * torch.exp2(-double.t1.double()))


def test_logsqrt2_table_form_is_exact_in_float64():
    codes = torch.arange(16, dtype=torch.float64)
    valid = torch.ones_like(codes, dtype=torch.bool)
    table = logsqrt2_dequant(codes, valid, 1.0, "table")
    exact = logsqrt2_dequant(codes, valid, 1.0, "exact")
    assert table.dtype == torch.float64
    torch.testing.assert_close(table, exact, rtol=1e-15, atol=0)
