"""Tests for adalog.search: grids (§5.2), percentiles (§5.2c/e) and FPCS (§5.4-§5.6)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from adalog.search import (
    ACTIVATION_SCALE_FLOOR,
    POST_GELU_SHIFT,
    SearchTrace,
    activation_grid,
    adalog_q_candidates,
    adalog_scale_grid,
    best_q,
    coarse_spacing,
    dense_scale_grid,
    exhaustive,
    exhaustive_adalog,
    fpcs_adalog,
    fpcs_uniform,
    initial_candidate,
    linear_quantile,
    matmul_grid,
    positive_nearest_rank,
    twin_neg_scale,
    twin_pos_candidates,
    weight_grid,
)

# --------------------------------------------------------------------------------------------
# Grids


def _conv_grid(x: torch.Tensor, b: int):
    return weight_grid(x, b, zp_cap=None)


GENERATORS = {
    "linear_weight": lambda x, b: weight_grid(x, b),
    "conv_weight": _conv_grid,
    "activation": lambda x, b: activation_grid(x, b),
    "matmul": lambda x, b: matmul_grid(x, b),
}

# §5.2 "Resulting sizes" table: (Z, S, first zp, last zp).
SIZES = {
    "linear_weight": {3: (4, 32, 2, 5), 4: (8, 16, 4, 11), 6: (16, 8, 24, 39)},
    "conv_weight": {3: (4, 32, 2, 5), 4: (8, 16, 4, 11), 6: (32, 4, 16, 47)},
    "activation": {3: (8, 16, 0, 7), 4: (16, 8, 0, 15), 6: (16, 8, 24, 39)},
    "matmul": {3: (4, 32, 2, 5), 4: (8, 16, 4, 11), 6: (16, 8, 24, 39)},
}
CASES = [(name, b, *SIZES[name][b]) for name in SIZES for b in (3, 4, 6)]


@pytest.mark.parametrize(("name", "b", "n_zp", "n_scales", "zp_lo", "zp_hi"), CASES)
def test_grid_sizes_match_spec_table(name, b, n_zp, n_scales, zp_lo, zp_hi):
    torch.manual_seed(b)
    x = torch.randn(3, 200)
    scales, zps = GENERATORS[name](x, b)
    assert scales.shape == zps.shape == (128, 3)
    assert n_zp * n_scales == 128 and (128 // 16) * 16 == 128  # eq_n = Z*S = K*M
    assert zp_hi - zp_lo + 1 == n_zp
    k = torch.arange(128)
    # zero point outer, scale inner
    assert torch.equal(zps, (zp_lo + k // n_scales).float()[:, None].expand(128, 3))
    assert torch.equal(scales, scales[k % n_scales])
    assert all(scales[:n_scales, g].unique().numel() == n_scales for g in range(3))


def test_weight_grid_scale_formula_by_hand():
    # row 0 = [0, 1, 3, 7, 15]: q0.1 = 0.4, q0.9 = 7 + 0.6*8 = 11.8 -> R_lo = 11.4, R_hi = 15
    # row 1 = 2 * row 0 -> R_lo = 22.8, R_hi = 30.  b = 3: N - 1 = 7, Z = 4, S = 32.
    row = torch.tensor([0.0, 1.0, 3.0, 7.0, 15.0], dtype=torch.float64)
    scales, zps = weight_grid(torch.stack([row, 2 * row]), 3)
    j = torch.arange(32, dtype=torch.float64)
    expected0 = (11.4 + j / 31 * (15 - 11.4)) / 7
    torch.testing.assert_close(scales[:32, 0], expected0)
    torch.testing.assert_close(scales[:32, 1], 2 * expected0)
    torch.testing.assert_close(
        coarse_spacing(scales), torch.tensor([3.6, 7.2]) / (31 * 7), check_dtype=False
    )
    s0, z0 = initial_candidate(scales, zps)  # candidate 126: largest zp, second-largest scale
    torch.testing.assert_close(s0, scales[30])
    assert z0.tolist() == [5.0, 5.0]


def test_activation_grid_clamps_and_spacing_after_clamp():
    # group 0: R_lo = 0, R_hi = 1; b = 4: Z = 16, S = 8, s_j = j/7/15, so s_0 = 0 -> 1e-4
    # group 1: tiny values -> every scale clamped, Δ = 0
    x = torch.zeros(2, 101, dtype=torch.float64)
    x[0, -1] = 1.0
    x[1] = torch.linspace(0, 1e-4, 101, dtype=torch.float64)
    scales, _ = activation_grid(x, 4)
    assert scales.min() >= ACTIVATION_SCALE_FLOOR
    assert scales[0, 0].item() == ACTIVATION_SCALE_FLOOR
    assert scales[1, 0].item() == pytest.approx(1 / 7 / 15)
    assert torch.all(scales[:, 1] == ACTIVATION_SCALE_FLOOR)
    delta = coarse_spacing(scales)
    assert delta[0].item() == pytest.approx(1 / 7 / 15 - 1e-4)
    assert delta[1].item() == 0.0


def test_matmul_grid_has_no_clamp_and_uses_b_bits():
    x = torch.zeros(1, 101, dtype=torch.float64)
    x[0, -1] = 1.0
    scales, _ = matmul_grid(x, 4)  # Z = 8, S = 16, divisor 15
    assert scales[0, 0].item() == 0.0
    assert scales[1, 0].item() == pytest.approx(1 / 15 / 15)


@pytest.mark.parametrize(("b", "eq_n"), [(8, 128), (4, 100)])
def test_conv_grid_refuses_degenerate_sizes(b, eq_n):
    with pytest.raises(ValueError):
        weight_grid(torch.randn(2, 10), b, eq_n=eq_n, zp_cap=None)


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 5), st.integers(5, 60), st.sampled_from([3, 4, 5, 6]), st.integers(0, 99))
def test_grid_layout_property(groups, length, b, seed):
    x = torch.randn(groups, length, generator=torch.Generator().manual_seed(seed))
    for make in GENERATORS.values():
        scales, zps = make(x, b)
        n_scales = 128 // zps[:, 0].unique().numel()
        k = torch.arange(128)
        assert torch.equal(scales, scales[k % n_scales])
        assert torch.equal(zps, zps[(k // n_scales) * n_scales])
        assert torch.all(scales[1:n_scales] >= scales[: n_scales - 1])


# --------------------------------------------------------------------------------------------
# Percentiles


def test_linear_quantile_matches_torch():
    x = torch.randn(5, 7, 3)
    q = torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0])
    torch.testing.assert_close(linear_quantile(x, q), torch.quantile(x.flatten(), q))
    for dim in (0, 1, 2):
        torch.testing.assert_close(linear_quantile(x, q, dim=dim), torch.quantile(x, q, dim=dim))


@pytest.mark.parametrize(
    ("n", "limit", "sizes"), [(100, 25, [25] * 4), (100, 50, [50] * 2), (101, 30, [26, 25, 25, 25])]
)
def test_linear_quantile_chunk_average(n, limit, sizes):
    x = torch.randn(n, dtype=torch.float64) ** 3
    q = torch.tensor([0.0, 0.1, 0.9, 1.0], dtype=torch.float64)
    chunks = torch.split(x, sizes)
    expected = torch.stack([torch.quantile(c, q) for c in chunks]).mean(0)
    torch.testing.assert_close(linear_quantile(x, q, max_elements=limit), expected)
    assert not torch.allclose(expected, torch.quantile(x, q))  # really a different number
    # per-group reductions chunk each group on its own
    rows = torch.stack([x, -x])
    out = linear_quantile(rows, q, dim=1, max_elements=limit)
    torch.testing.assert_close(out[:, 0], expected)
    torch.testing.assert_close(out[:, 1], linear_quantile(-x, q, max_elements=limit))


def test_activation_grid_uses_chunked_quantiles():
    x = torch.randn(1, 1000, dtype=torch.float64) ** 3
    q0, q10, q90, q100 = linear_quantile(x[0], [0.0, 0.1, 0.9, 1.0], max_elements=300)
    scales, _ = activation_grid(x, 6, max_elements=300)
    torch.testing.assert_close(scales[0, 0], torch.clamp((q90 - q10) / 63, min=1e-4))
    torch.testing.assert_close(scales[7, 0], (q100 - q0) / 63)


def test_positive_nearest_rank_by_hand():
    x = torch.tensor([-3.0, 0.0, 5.0, 1.0, 4.0, 2.0, 3.0, -1.0, 0.0, 10.0])
    # positives sorted: 1 2 3 4 5 10 (count 6)
    assert positive_nearest_rank(x, 0.9).item() == 10.0  # ceil(5.4) - 1 = 5
    assert positive_nearest_rank(x, 0.5).item() == 3.0  # ceil(3.0) - 1 = 2
    assert positive_nearest_rank(x, 1.0).item() == 10.0
    y = torch.cat([torch.arange(1.0, 21.0).flip(0), -torch.ones(7)])
    assert positive_nearest_rank(y, 0.9).item() == 18.0  # ceil(18) - 1 = 17
    with pytest.raises(ValueError):
        positive_nearest_rank(-torch.ones(4), 0.9)


def test_adalog_scale_grid_and_twin_candidates():
    y = torch.cat([torch.arange(1.0, 21.0), -torch.ones(7)])
    lo, hi, scales = adalog_scale_grid(y, 128)
    assert lo.item() == pytest.approx(18 + POST_GELU_SHIFT)
    assert hi.item() == pytest.approx(20 + POST_GELU_SHIFT)
    assert scales.shape == (128,)
    assert scales[126].item() == pytest.approx(lo.item() + 2 * 126 / 127)  # initial scale §5.3
    pos = twin_pos_candidates(4)
    assert pos.shape == (29,)
    assert twin_neg_scale(4) == POST_GELU_SHIFT / 8
    assert pos[0].item() == pytest.approx(POST_GELU_SHIFT / 8 / 32)
    assert pos[-1].item() == pytest.approx(POST_GELU_SHIFT / 8 * 2**23)
    torch.testing.assert_close(pos[1:] / pos[:-1], torch.full((28,), 2.0))
    assert adalog_q_candidates().tolist() == list(range(10, 138))


# --------------------------------------------------------------------------------------------
# FPCS, uniform


def _problem(groups: int = 3, b: int = 4):
    """Weight grid with a known per-group optimum (s*, z*) inside it; errors in float64."""
    torch.manual_seed(0)
    spread = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)[:groups, None]
    rows = torch.randn(groups, 64, dtype=torch.float64) * spread
    scales, zps = weight_grid(rows, b)
    lo, hi = scales.min(0).values, scales.max(0).values
    s_star = lo + torch.tensor([0.3141, 0.7777, 0.05])[:groups] * (hi - lo)
    z_star = zps[0] + torch.tensor([5.0, 0.0, 3.0])[:groups]
    # weighting (z - z*)^2 by (2Δ)^2 keeps several zero points alive in the beam
    zp_weight = (2 * coarse_spacing(scales)) ** 2

    def score(s, z):
        return (s - s_star) ** 2 + zp_weight * (z - z_star) ** 2

    return scales, zps, s_star, z_star, score


def test_fpcs_uniform_beam_offsets_shrink_and_cost():
    scales, zps, s_star, z_star, score = _problem()
    trace = SearchTrace()
    result = fpcs_uniform(score, scales, zps, trace=trace)
    assert trace.evaluations == 768
    assert [st.kept.shape[0] for st in trace.stages] == [16, 16, 16, 16, 16, 1]
    coarse_zps = set(zps.flatten().tolist())
    survivors = trace.stages[0].others.gather(0, trace.stages[0].kept)
    assert all(survivors[:, g].unique().numel() >= 2 for g in range(3))
    delta = coarse_spacing(scales)
    offsets = torch.arange(8, dtype=torch.float64) / 7 - 0.5
    for prev, stage in zip(trace.stages, trace.stages[1:], strict=False):
        torch.testing.assert_close(stage.delta, delta)
        parents = prev.scales.gather(0, prev.kept)
        kids = stage.scales.reshape(16, 8, 3)
        torch.testing.assert_close(
            kids - parents[:, None], (offsets[None, :, None] * delta).expand_as(kids)
        )
        gaps = kids[:, 1:] - kids[:, :-1]  # ±Δ/2 in 7 equal intervals
        torch.testing.assert_close(gaps, (delta / 7).expand_as(gaps))
        assert torch.equal(
            stage.others.reshape(16, 8, 3),
            prev.others.gather(0, prev.kept)[:, None].expand(16, 8, 3),
        )
        assert set(stage.others.flatten().tolist()) <= coarse_zps
        delta = delta / 7.5
    last = trace.stages[-1]
    torch.testing.assert_close(result.scale, last.scales.gather(0, last.errors.argmin(0)[None])[0])
    torch.testing.assert_close(result.error, last.errors.min(0).values)
    assert torch.equal(result.zero_point, z_star)
    final_spacing = coarse_spacing(scales) / 7.5**4 / 7
    assert torch.all((result.scale - s_star).abs() <= final_spacing / 2)


def _reference_fpcs(score, scales, zps, steps=6, beam=16):
    """Plain-Python transcription of §5.4 for one group (stable sort, survivor-major)."""
    cands = list(zip(scales.tolist(), zps.tolist(), strict=True))
    m = len(cands) // beam
    delta = cands[1][0] - cands[0][0]
    for t in range(steps):
        errs = [score(s, z) for s, z in cands]
        order = sorted(range(len(cands)), key=lambda i: errs[i])
        keep = [cands[i] for i in order[: beam if t < steps - 1 else 1]]
        if t == steps - 1:
            return keep[0]
        cands = [(s + (i / (m - 1) - 0.5) * delta, z) for s, z in keep for i in range(m)]
        delta = delta / (m - 0.5)
    raise AssertionError


def test_fpcs_uniform_matches_plain_transcription_and_groups_are_independent():
    scales, zps, s_star, z_star, score = _problem()
    joint = fpcs_uniform(score, scales, zps)
    for g in range(3):

        def score_g(s, z, g=g):
            return score(s.expand(-1, 3), z.expand(-1, 3))[:, g : g + 1]

        alone = fpcs_uniform(score_g, scales[:, g : g + 1], zps[:, g : g + 1])
        assert alone.scale.item() == joint.scale[g].item()
        assert alone.zero_point.item() == joint.zero_point[g].item()

        def score_py(s, z, g=g):
            return score(torch.full((1, 3), s, dtype=torch.float64), torch.full((1, 3), z))[0, g]

        ref = _reference_fpcs(score_py, scales[:, g], zps[:, g])
        assert joint.scale[g].item() == pytest.approx(ref[0], rel=1e-12, abs=0)
        assert joint.zero_point[g].item() == ref[1]


def test_fpcs_ties_keep_lowest_index():
    scales, zps, *_ = _problem()
    trace = SearchTrace()
    result = fpcs_uniform(lambda s, z: torch.zeros_like(s), scales, zps, trace=trace)
    for stage in trace.stages:
        k = stage.kept.shape[0]
        assert torch.equal(stage.kept, torch.arange(k)[:, None].expand(k, 3))
    expected, delta = scales[0].clone(), coarse_spacing(scales)
    for _ in range(5):  # always child 0 of survivor 0
        expected, delta = expected - 0.5 * delta, delta / 7.5
    torch.testing.assert_close(result.scale, expected)
    assert torch.equal(result.zero_point, zps[0])
    ex = exhaustive(lambda s, z: torch.zeros_like(s), scales, zps)
    assert torch.equal(ex.scale, scales[0]) and torch.equal(ex.zero_point, zps[0])


def test_fpcs_zero_delta_group_and_floor():
    x = torch.zeros(3, 101, dtype=torch.float64)
    x[0] = torch.linspace(-1, 1, 101)
    x[1] = torch.linspace(0, 1e-4, 101)  # fully clamped: Δ = 0
    x[2, -1] = 1.0  # only s_0 clamped; children of the floor candidate reach below it
    scales, zps = activation_grid(x, 4)
    target = torch.tensor([0.12, 0.0, 0.0], dtype=torch.float64)

    def score(s, z):
        return (s - target) ** 2 + 1e-6 * (z - 8) ** 2

    trace = SearchTrace()
    result = fpcs_uniform(score, scales, zps, scale_floor=ACTIVATION_SCALE_FLOOR, trace=trace)
    assert all(st.scales.min() >= ACTIVATION_SCALE_FLOOR for st in trace.stages)
    assert result.scale[1:].tolist() == [ACTIVATION_SCALE_FLOOR] * 2
    assert result.zero_point.tolist() == [8.0] * 3
    assert result.scale[0].item() == pytest.approx(0.12, abs=1e-6)


def test_exhaustive_scores_the_grid_once():
    scales, zps, s_star, z_star, score = _problem()
    trace = SearchTrace()
    result = exhaustive(score, scales, zps, trace=trace)
    assert trace.evaluations == 128
    errors = score(scales, zps)
    best = errors.argmin(0)
    assert torch.equal(result.scale, scales.gather(0, best[None])[0])
    assert torch.equal(result.zero_point, z_star)


def test_fpcs_validates_geometry():
    scales, zps, *_ = _problem()
    with pytest.raises(ValueError):
        fpcs_uniform(lambda s, z: s, scales, zps, beam=12)  # 128 % 12 != 0
    with pytest.raises(ValueError):
        fpcs_uniform(lambda s, z: s, scales, zps, beam=128)  # M = 1
    with pytest.raises(ValueError):
        fpcs_uniform(lambda s, z: s[:, 0], scales, zps)  # wrong score shape


# --------------------------------------------------------------------------------------------
# FPCS, AdaLog


Q_STAR, S_STAR, LO, HI = 40, 1.2345678, 1.0, 2.5


def _adalog_scores():
    def score_q(q):
        return (q - Q_STAR).double() ** 2

    def score_joint(s, q):
        return (s.double() - S_STAR) ** 2 + 1e-3 * (q - Q_STAR).double() ** 2

    return score_q, score_joint


def test_fpcs_adalog_structure_and_result():
    score_q, score_joint = _adalog_scores()
    q_cands = adalog_q_candidates()
    trace = SearchTrace()
    result = fpcs_adalog(
        score_q,
        score_joint,
        torch.tensor(LO, dtype=torch.float64),
        torch.tensor(HI, dtype=torch.float64),
        q_cands,
        trace=trace,
    )
    assert trace.evaluations == 896
    assert [st.kept.shape[0] for st in trace.stages] == [8, 32, 32, 32, 32, 32, 1]
    # base pre-selection in score order, ties by lower q
    kept_q = [40, 39, 41, 38, 42, 37, 43, 36]
    assert q_cands[trace.stages[0].kept[:, 0]].tolist() == kept_q
    coarse = trace.stages[1]
    grid = dense_scale_grid(torch.tensor(LO, dtype=torch.float64), HI, 16)
    assert torch.equal(coarse.scales[:, 0], grid.repeat(8))
    assert coarse.others[:, 0].tolist() == [q for q in kept_q for _ in range(16)]
    delta = torch.tensor([(HI - LO) / 15], dtype=torch.float64)
    offsets = torch.arange(4, dtype=torch.float64) / 3 - 0.5
    for prev, stage in zip(trace.stages[1:], trace.stages[2:], strict=False):
        torch.testing.assert_close(stage.delta, delta)
        parents = prev.scales.gather(0, prev.kept)
        kids = stage.scales.reshape(32, 4, 1)
        torch.testing.assert_close(
            kids - parents[:, None], (offsets[None, :, None] * delta).expand_as(kids)
        )
        assert set(stage.others.flatten().tolist()) <= set(kept_q)
        delta = delta / 3.5
    assert result.q.item() == Q_STAR
    final_spacing = (HI - LO) / 15 / 3.5**4 / 3
    assert abs(result.scale.item() - S_STAR) <= final_spacing / 2
    last = trace.stages[-1]
    assert result.error.item() == last.errors.min().item()


def test_exhaustive_adalog_and_best_q():
    score_q, score_joint = _adalog_scores()
    q_cands = adalog_q_candidates()
    trace = SearchTrace()
    result = exhaustive_adalog(score_q, score_joint, LO, HI, q_cands, trace=trace)
    assert trace.evaluations == 256
    grid = dense_scale_grid(LO, HI, 128)
    assert result.q.item() == Q_STAR
    assert result.scale.item() == grid[(grid.double() - S_STAR).abs().argmin()].item()
    assert best_q(score_q, q_cands).q.item() == Q_STAR
    assert best_q(lambda q: torch.zeros(q.shape), q_cands).q.item() == 10  # ties: lowest index


def test_fpcs_adalog_validates():
    score_q, score_joint = _adalog_scores()
    with pytest.raises(ValueError):
        fpcs_adalog(score_q, score_joint, LO, HI, adalog_q_candidates(4))  # base_num 8 > 4
    with pytest.raises(ValueError):
        fpcs_adalog(score_q, score_joint, LO, HI, adalog_q_candidates(), beam=128)  # M = 1
