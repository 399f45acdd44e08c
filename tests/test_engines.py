"""The fast search engine must select the parameters of the straightforward one.

"The same" allows a last-ulp difference in a scale: FPCS children of different parents can lie
within one float32 ulp of each other, and the two engines' rounding then breaks that exact tie
differently. Weights are compared after fake quantization, row by row: a weight row may have
two (scale, zero point) candidates whose errors agree to float32 rounding (seen: 0.00249486021
vs 0.00249485951 on a 10-token head), and batched scoring may then pick the other one. At most
one such row per layer is tolerated; everything else must match.
"""

import pytest
import timm
import torch

import adalog
from adalog.config import AdaLogConfig
from adalog.quant import (
    ADALOG_R,
    LogQuantizer,
    UniformQuantizer,
    adalog_levels,
    asym_fake_quant,
    log_fake_quant,
)
from adalog.search import naive
from adalog.search.objectives import (
    GramOperandError,
    LogInputError,
    input_self_error,
    kept_capacity,
    log_exponent,
    sum_of_squares,
)
from adalog.search.procedures import SearchSettings, calibrate_linear, calibrate_post_gelu_log

# Narrow enough that tokens outnumber the features of qkv/proj/fc1/fc2 (the Gram forms run).
NARROW_VIT = {"depth": 1, "img_size": 64, "patch_size": 16, "embed_dim": 32, "num_heads": 2}
SMALL_SWIN = (
    "swin_tiny_patch4_window7_224",
    {"img_size": 64, "window_size": 4, "depths": (1, 1), "num_heads": (1, 2), "embed_dim": 24},
)
SMALL = AdaLogConfig.w4a4(eq_n=32, search_rounds=2, fpcs_steps=3, calib_batch_size=16)


def _quantized_state(
    config: AdaLogConfig, name: str, kwargs: dict, dtype: torch.dtype = torch.float32
) -> dict:
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **kwargs).eval().to(dtype)
    images = torch.randn(10, 3, 64, 64, generator=torch.Generator().manual_seed(3)).to(dtype)
    adalog.quantize(model, images, config, progress=False)
    state = {k: v for k, v in model.state_dict().items() if "weight_quant" not in k}
    for name, module in model.named_modules():
        if hasattr(module, "quantized_weight"):
            state[f"{name}.quantized_weight"] = module.quantized_weight().detach()
    return state


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"w_bits": 3, "a_bits": 3, "s_bits": 3},
        {"post_gelu": "twin", "post_softmax": "uniform"},
        {"post_gelu": "logsqrt2", "log_scale_search": "own", "post_softmax": "log2"},
    ],
)
def test_fast_engine_selects_the_naive_engines_parameters(overrides):
    config = SMALL.with_overrides(**overrides)
    fast = _quantized_state(config, "vit_tiny_patch16_224", NARROW_VIT)
    slow = _quantized_state(
        config.with_overrides(search_engine="naive"), "vit_tiny_patch16_224", NARROW_VIT
    )
    assert fast.keys() == slow.keys()
    for key in fast:
        if key.endswith("quantized_weight"):
            rows = [not _close(a, b) for a, b in zip(fast[key], slow[key], strict=True)]
            assert sum(rows) <= 1, f"{key}: {sum(rows)} of {len(rows)} rows differ"
        else:
            _assert_same(fast[key], slow[key], key)


@pytest.mark.parametrize("name,kwargs", [("vit_tiny_patch16_224", NARROW_VIT), SMALL_SWIN])
def test_engines_select_the_same_parameters_in_float64(name, kwargs):
    """In float64 neither engine's rounding can reorder near-equal candidates, so every
    parameter of the whole model agrees to a few float64 ulps (a tie between FPCS children that
    reach one scale from two parents may pick either rounding of it)."""
    states = [
        _quantized_state(SMALL.with_overrides(search_engine=engine), name, kwargs, torch.float64)
        for engine in ("fast", "naive")
    ]
    assert states[0].keys() == states[1].keys()
    for key, fast in states[0].items():
        assert fast.dtype == states[1][key].dtype, key
        if fast.is_floating_point():
            assert fast.dtype == torch.float64, key
        torch.testing.assert_close(fast, states[1][key], rtol=2e-15, atol=0, msg=key)


def _close(fast: torch.Tensor, slow: torch.Tensor) -> bool:
    atol = 1e-6 * float(slow.abs().max())
    return torch.allclose(fast, slow, rtol=3e-7, atol=atol)


def _assert_same(fast: torch.Tensor, slow: torch.Tensor, name: str = "") -> None:
    atol = 1e-6 * float(slow.abs().max()) if slow.is_floating_point() else 0
    torch.testing.assert_close(fast, slow, rtol=3e-7, atol=atol, msg=name or None)


def test_engines_agree_on_a_larger_linear_and_fc2_layer():
    """Hundreds of tokens: int8-GEMM input scoring, Gram weight scoring and the log-input scorer
    against recomputation."""
    g = torch.Generator().manual_seed(7)
    x, weight, bias, y = _linear_data(g, 600)
    h = torch.nn.functional.gelu(torch.randn(600, 96, generator=g) * 2)
    weight2 = torch.randn(48, 96, generator=g) / 10
    y2 = h @ weight2.T
    params = {}
    for engine in ("fast", "naive"):
        settings = SearchSettings(eq_n=64, rounds=2, steps=4, engine=engine)
        params[engine] = _calibrated_linear(x, weight, bias, y, 4, settings)
        w2_quant, h_quant = UniformQuantizer(4, (48, 1)), LogQuantizer(4, "adalog", shift=0.17)
        calibrate_post_gelu_log(h, y2, weight2, None, w2_quant, h_quant, settings)
        params[engine] += [w2_quant.scale, w2_quant.zero_point, h_quant.scale, h_quant.q]
    for fast, slow in zip(params["fast"], params["naive"], strict=True):
        _assert_same(fast, slow)


def test_engines_agree_on_an_8bit_input_in_float64():
    """8-bit input codes go through the offset int8 GEMM. The input candidates then differ by
    less than float32 resolves in the total output error, so both engines run in float64."""
    g = torch.Generator().manual_seed(7)
    data = [t.double() for t in _linear_data(g, 300)]
    params = {}
    for engine in ("fast", "naive"):
        settings = SearchSettings(eq_n=128, rounds=1, steps=3, engine=engine)
        params[engine] = _calibrated_linear(*data, 8, settings, dtype=torch.float64)
    for fast, slow in zip(params["fast"], params["naive"], strict=True):
        _assert_same(fast, slow)


def _linear_data(g: torch.Generator, tokens: int) -> tuple[torch.Tensor, ...]:
    x = torch.randn(tokens, 48, generator=g) * torch.rand(48, generator=g) * 3
    weight = torch.randn(96, 48, generator=g) / 7
    bias = torch.randn(96, generator=g)
    return x, weight, bias, x @ weight.T + bias


def _calibrated_linear(x, weight, bias, y, a_bits, settings, dtype=torch.float32) -> list:
    w_quant = UniformQuantizer(4, (96, 1)).to(dtype)
    x_quant = UniformQuantizer(a_bits, (1,)).to(dtype)
    calibrate_linear(x, y, weight, bias, w_quant, x_quant, settings)
    return [w_quant.scale, w_quant.zero_point, x_quant.scale, x_quant.zero_point]


def test_log_input_error_updates_parents_sparsely_and_exactly():
    """Refinement children reuse a kept parent's product through the few inputs whose code
    changed; their errors equal a full recomputation with the model's own fake quantizer."""
    g = torch.Generator().manual_seed(5)
    x = torch.nn.functional.gelu(torch.randn(400, 64, generator=g) * 2)
    weight = torch.randn(24, 64, generator=g) / 8
    target = x @ weight.T + 0.01 * torch.randn(400, 24, generator=g)
    shift, q, n_bits = 0.17, 30, 4
    objective = LogInputError(log_exponent(x, shift), target, weight, shift, max_changed=0.05)
    levels = adalog_levels(torch.tensor(q), n_bits)

    def score(scales: torch.Tensor) -> torch.Tensor:
        ratios = torch.full_like(scales, ADALOG_R / q)
        table = levels.expand(scales.numel(), -1)
        return objective(table, [q] * scales.numel(), scales, torch.log2(scales), ratios)

    def recomputed(scales: torch.Tensor) -> torch.Tensor:
        out = [log_fake_quant(x, s, n_bits, "adalog", q, shift=shift) @ weight.T for s in scales]
        return torch.stack([(o.double() - target.double()).square().sum() for o in out])

    parents = torch.tensor([1.5, 3.0, 6.0])
    children = (parents[:, None] * torch.tensor([0.99, 1.003, 1.02])).reshape(-1)
    far = torch.tensor([2.2])  # a third of a code step from every parent: full recomputation
    torch.testing.assert_close(score(parents), recomputed(parents), rtol=2e-6, atol=0)
    torch.testing.assert_close(score(children), recomputed(children), rtol=2e-6, atol=0)
    assert objective.counters == {"full": 3, "sparse": 9}
    torch.testing.assert_close(score(far), recomputed(far), rtol=2e-6, atol=0)
    assert objective.counters == {"full": 4, "sparse": 9}


def test_fc2_token_norm_engines_agree_and_spare_the_ordinary_tokens():
    """With a few massive-activation tokens, the token-normalised fc2 search picks the same
    parameters in both engines and a grid that serves the other tokens better than the plain
    sum (which the massive tokens dominate)."""
    g = torch.Generator().manual_seed(3)
    h = torch.nn.functional.gelu(torch.randn(600, 96, generator=g) * 2)
    h[:6] *= 300.0
    weight = torch.randn(48, 96, generator=g) / 10
    y = h @ weight.T

    def calibrate(engine: str, token_norm: bool) -> tuple[list, float]:
        settings = SearchSettings(eq_n=64, rounds=2, steps=4, engine=engine)
        w_quant, h_quant = UniformQuantizer(4, (48, 1)), LogQuantizer(4, "adalog", shift=0.17)
        calibrate_post_gelu_log(
            h, y, weight, None, w_quant, h_quant, settings, token_norm=token_norm
        )
        out = h_quant(h[6:]) @ w_quant(weight).T
        ordinary = float((out - y[6:]).square().sum() / y[6:].square().sum())
        return [w_quant.scale, w_quant.zero_point, h_quant.scale, h_quant.q], ordinary

    fast, fast_error = calibrate("fast", True)
    slow, _ = calibrate("naive", True)
    for a, b in zip(fast, slow, strict=True):
        _assert_same(a, b)
    plain, plain_error = calibrate("fast", False)
    assert not torch.equal(plain[2], fast[2])
    assert fast_error < 0.7 * plain_error


def test_matmul_operand_error_updates_parents_sparsely_and_exactly():
    """Per-head matmul operand candidates: children near a kept parent (same zero point) are
    scored from it through the few codes that changed, or none; every error equals the
    recomputed ``‖Â B̂ − T‖²`` minus the constant ``‖T‖²``, for the A and the B operand."""
    g = torch.Generator().manual_seed(11)
    a = torch.randn(2, 3, 40, 8, generator=g) * torch.tensor([1.0, 2.0, 0.5])[:, None, None]
    b = torch.randn(2, 3, 8, 40, generator=g)
    target = a @ b + 0.1 * torch.randn(2, 3, 40, 40, generator=g)
    n_bits = 4
    b_t = b.transpose(-1, -2)
    operands = {
        "a": (GramOperandError(a, b @ b_t, target @ b_t, n_bits, max_changed=0.05), a),
        "b": (
            GramOperandError(
                b_t, a.transpose(-1, -2) @ a, target.transpose(-1, -2) @ a, n_bits, 0.05
            ),
            b,
        ),
    }
    for name, (objective, operand) in operands.items():
        naive_error = (naive.operand_a_error if name == "a" else naive.operand_b_error)(
            *((operand, b, target) if name == "a" else (a, operand, target)), n_bits
        )

        def recomputed(scales, zps, naive_error=naive_error):
            return naive_error(scales, zps).double() - target.double().square().sum((0, 2, 3))

        zps = torch.full((3, 3), 7.0)
        parents = torch.tensor([[0.2, 0.4, 0.1], [0.3, 0.5, 0.15], [0.25, 0.6, 0.12]])
        children = (parents[:, None, :] * torch.tensor([0.999, 1.0, 1.004])[:, None]).reshape(9, 3)
        child_zps = zps.repeat_interleave(3, 0)
        torch.testing.assert_close(
            objective(parents, zps), recomputed(parents, zps), rtol=1e-5, atol=1e-3
        )
        torch.testing.assert_close(
            objective(children, child_zps), recomputed(children, child_zps), rtol=1e-5, atol=1e-3
        )
        assert objective.counters == {"full": 9, "sparse": 27}, name
        grandchildren = children * 1.002  # parents: the children's lazily updated products
        torch.testing.assert_close(
            objective(grandchildren, child_zps),
            recomputed(grandchildren, child_zps),
            rtol=1e-5,
            atol=1e-3,
        )
        assert objective.counters == {"full": 9, "sparse": 54}, name
        other_zp = torch.full((1, 3), 6.0)  # no parent with this zero point: recomputed in full
        torch.testing.assert_close(
            objective(parents[:1], other_zp),
            recomputed(parents[:1], other_zp),
            rtol=1e-5,
            atol=1e-3,
        )
        assert objective.counters == {"full": 12, "sparse": 54}, name


@pytest.mark.parametrize("n_bits", [3, 4, 8])
def test_input_self_error_from_sorted_prefix_sums_equals_the_fake_quantizer(n_bits):
    """Per tensor and per channel, the sorted-prefix-sum form gives the elementwise
    ``Σ (x − Q(x))²`` of :func:`asym_fake_quant`, including candidates that clamp most inputs
    and zero points outside the code range."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(300, 6, generator=g) * torch.tensor([0.1, 1.0, 3.0, 0.5, 2.0, 8.0])
    x[:, 2] = x[:, 2].abs()  # a one-signed channel, like post-LayerNorm ones after the fold
    n_cands = 7
    scales = torch.rand(n_cands, 6, generator=g) * 0.4 + 1e-3
    zps = torch.randint(-3, 2**n_bits + 3, (n_cands, 6), generator=g).float() + 0.4
    score = input_self_error(x, n_bits)
    x64 = x.double()

    def elementwise(s: torch.Tensor, z: torch.Tensor, dims) -> torch.Tensor:
        return (asym_fake_quant(x64, s.double(), z.double(), n_bits) - x64).square().sum(dims)

    per_channel = torch.stack([elementwise(scales[k], zps[k], 0) for k in range(n_cands)])
    torch.testing.assert_close(score(scales, zps), per_channel, rtol=1e-9, atol=1e-9)
    per_tensor = torch.stack([elementwise(scales[k, 0], zps[k, 0], (0, 1)) for k in range(n_cands)])
    torch.testing.assert_close(
        score(scales[:, :1], zps[:, :1]), per_tensor[:, None], rtol=1e-9, atol=1e-9
    )


def test_sum_of_squares_is_float64_across_chunks():
    values = torch.randn(3 * 1024 + 5, generator=torch.Generator().manual_seed(4)) * 1e3
    want = values.square().double().sum()  # squares in the input's dtype, as documented
    got = sum_of_squares(values.clone(), torch.empty(1024, dtype=torch.float64))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)


def test_sparse_scorers_keep_a_whole_beam_and_shrink_sparse_updates_for_large_products():
    """A many-token layer still keeps one product per FPCS survivor (within ``max_memory``),
    and allows sparse updates of a smaller share of its inputs once its product outgrows the
    cache."""
    assert kept_capacity(10**6, 32, memory=2**28, max_memory=2**31) == 268
    assert kept_capacity(40 * 10**6, 32, memory=2**28, max_memory=2**31) == 32
    assert kept_capacity(10**9, 32, memory=2**28, max_memory=2**31) == 2
    g = torch.Generator().manual_seed(5)
    x = torch.nn.functional.gelu(torch.randn(400, 64, generator=g))
    weight = torch.randn(24, 64, generator=g)
    log_x = log_exponent(x, 0.17)
    product_bytes = 4 * 400 * 24
    roomy = LogInputError(log_x, x @ weight.T, weight, 0.17, memory=1)
    assert roomy.capacity == 32 and roomy.max_changed == int(0.1 * x.numel())
    tight = LogInputError(log_x, x @ weight.T, weight, 0.17, memory=1, max_memory=product_bytes * 3)
    assert tight.capacity == 3
    LogInputError.CACHE_BYTES, before = product_bytes // 4, LogInputError.CACHE_BYTES
    try:
        small = LogInputError(log_x, x @ weight.T, weight, 0.17)
    finally:
        LogInputError.CACHE_BYTES = before
    assert small.max_changed == int(0.025 * x.numel())
