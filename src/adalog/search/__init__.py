"""Model-agnostic calibration search: candidate grids, percentiles and FPCS
(docs/algorithm.md §5)."""

from adalog.quant import adalog_q_candidates
from adalog.search.fpcs import (
    AdaLogResult,
    BaseResult,
    SearchTrace,
    StageRecord,
    UniformResult,
    best_q,
    exhaustive,
    exhaustive_adalog,
    fpcs_adalog,
    fpcs_uniform,
)
from adalog.search.grids import (
    ACTIVATION_SCALE_FLOOR,
    POST_GELU_SHIFT,
    ZERO_POINT_CAP,
    AdaLogScaleGrid,
    UniformGrid,
    activation_grid,
    adalog_scale_grid,
    coarse_spacing,
    dense_scale_grid,
    initial_candidate,
    matmul_grid,
    twin_neg_scale,
    twin_pos_candidates,
    weight_grid,
)
from adalog.search.percentile import (
    QUANTILE_MAX_ELEMENTS,
    linear_quantile,
    positive_nearest_rank,
)

__all__ = [
    "ACTIVATION_SCALE_FLOOR",
    "POST_GELU_SHIFT",
    "QUANTILE_MAX_ELEMENTS",
    "ZERO_POINT_CAP",
    "AdaLogResult",
    "AdaLogScaleGrid",
    "BaseResult",
    "SearchTrace",
    "StageRecord",
    "UniformGrid",
    "UniformResult",
    "activation_grid",
    "adalog_q_candidates",
    "adalog_scale_grid",
    "best_q",
    "coarse_spacing",
    "dense_scale_grid",
    "exhaustive",
    "exhaustive_adalog",
    "fpcs_adalog",
    "fpcs_uniform",
    "initial_candidate",
    "linear_quantile",
    "matmul_grid",
    "positive_nearest_rank",
    "twin_neg_scale",
    "twin_pos_candidates",
    "weight_grid",
]
