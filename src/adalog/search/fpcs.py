"""FPCS beam searches and their exhaustive counterparts (docs/algorithm.md §5.4-§5.7).

The engine knows nothing about layers. A search runs over ``G`` independent groups and asks a
caller-supplied callback for the *error* (lower is better) of ``K`` candidates per group at once:

* uniform: ``score(scales[K, G], zero_points[K, G]) -> errors[K, G]``;
* AdaLog: ``score_q(q[K]) -> errors[K]`` (scale fixed by the caller) and
  ``score_joint(scales[K], q[K]) -> errors[K]`` (a single, per-tensor group).

The reference maximises ``-error`` and orders survivors by descending score. Here survivors are
ordered by a *stable* ascending sort of the error, so ties keep the lower candidate index first, and
child ``i`` of survivor rank ``r`` gets index ``r * M + i`` (§12, "FPCS tie-breaking"). Bounding
memory (chunking candidates) is the callback's job.

Pass a :class:`SearchTrace` to observe every scored stage; without one nothing is recorded.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import Tensor

from adalog.search.grids import coarse_spacing, dense_scale_grid

#: Survivors per group of a uniform FPCS stage, and of the joint AdaLog stage (§5.4, §5.5).
UNIFORM_BEAM = 16
ADALOG_BEAM = 32

UniformScore = Callable[[Tensor, Tensor], Tensor]
BaseScore = Callable[[Tensor], Tensor]
JointScore = Callable[[Tensor, Tensor], Tensor]


@dataclass
class StageRecord:
    """One scored batch of candidates.

    ``others`` holds zero points (uniform) or base exponents q (AdaLog). ``scales`` is ``None`` for
    the AdaLog base pre-selection, where the scale is fixed inside the callback. ``kept`` are the
    indices of the survivors, best first. ``delta`` is the Δ that spaced these children (``None``
    for a grid that was not derived from survivors).
    """

    scales: Tensor | None
    others: Tensor
    errors: Tensor
    kept: Tensor
    delta: Tensor | None


@dataclass
class SearchTrace:
    """Optional record of a search: candidates scored in total and every stage, in order."""

    evaluations: int = 0
    stages: list[StageRecord] = field(default_factory=list)


class UniformResult(NamedTuple):
    """Best (scale, zero point) per group and its error, each ``(G,)``."""

    scale: Tensor
    zero_point: Tensor
    error: Tensor


class BaseResult(NamedTuple):
    """Best AdaLog base exponent q and its error (0-d tensors)."""

    q: Tensor
    error: Tensor


class AdaLogResult(NamedTuple):
    """Best AdaLog (scale, q) and its error (0-d tensors)."""

    scale: Tensor
    q: Tensor
    error: Tensor


def _rank(errors: Tensor, keep: int) -> Tensor:
    """Indices of the ``keep`` lowest errors along dim 0, ties broken by lower index."""
    return torch.sort(errors, dim=0, stable=True).indices[:keep]


def _checked(errors: Tensor, expected: torch.Size) -> Tensor:
    if errors.shape != expected:
        raise ValueError(f"score returned shape {tuple(errors.shape)}, expected {tuple(expected)}")
    return errors


def _record(
    trace: SearchTrace | None,
    scales: Tensor | None,
    others: Tensor,
    errors: Tensor,
    kept: Tensor,
    delta: Tensor | None,
) -> None:
    if trace is not None:
        trace.evaluations += others.shape[0]
        trace.stages.append(StageRecord(scales, others, errors, kept, delta))


def _stage(
    score: UniformScore,
    scales: Tensor,
    others: Tensor,
    keep: int,
    delta: Tensor | None,
    trace: SearchTrace | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Score ``(K, G)`` candidates and return the ``keep`` best per group, best first."""
    errors = _checked(score(scales, others), scales.shape)
    kept = _rank(errors, keep)
    _record(trace, scales, others, errors, kept, delta)
    return scales.gather(0, kept), others.gather(0, kept), errors.gather(0, kept)


def _children(parents: Tensor, delta: Tensor, n_children: int, floor: float | None) -> Tensor:
    """Child i of parent r (index r*M + i) sits at ``s + (i/(M-1) - 1/2) * Δ`` (§5.4)."""
    steps = torch.arange(n_children, dtype=torch.float64, device=parents.device)
    steps = steps / (n_children - 1) - 0.5
    offsets = steps.to(dtype=parents.dtype, device=parents.device)
    kids = (parents[:, None, :] + offsets[None, :, None] * delta).reshape(-1, parents.shape[1])
    return kids if floor is None else kids.clamp_min(floor)


def _check_beam(n_candidates: int, beam: int, steps: int) -> int:
    """Validate the beam geometry and return M, the children per survivor."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if beam < 1 or n_candidates % beam != 0:
        raise ValueError(f"{n_candidates} candidates cannot be split into beams of {beam}")
    n_children = n_candidates // beam
    if steps > 1 and n_children < 2:
        raise ValueError(f"{n_candidates} candidates / beam {beam} leaves < 2 children each")
    return n_children


def _beam_search(
    score: UniformScore,
    scales: Tensor,
    others: Tensor,
    delta: Tensor,
    steps: int,
    beam: int,
    floor: float | None,
    trace: SearchTrace | None,
) -> UniformResult:
    """Shared core of §5.4 and §5.5 steps 2-3: coarse grid, then ``steps - 1`` refinements.

    ``others`` (zero point or q) is inherited by every child and never refined. Δ shrinks by
    ``M - 1/2`` per refinement. The last stage keeps only its own best child, even if an earlier
    stage scored a better candidate (the reference writes the last stage's winner).
    """
    n_children = _check_beam(scales.shape[0], beam, steps)
    s, o, e = _stage(score, scales, others, beam if steps > 1 else 1, None, trace)
    for t in range(1, steps):
        kids = _children(s, delta, n_children, floor)
        kid_others = o.repeat_interleave(n_children, dim=0)
        s, o, e = _stage(score, kids, kid_others, beam if t < steps - 1 else 1, delta, trace)
        delta = delta / (n_children - 0.5)
    return UniformResult(s[0], o[0], e[0])


def fpcs_uniform(
    score: UniformScore,
    scales: Tensor,
    zero_points: Tensor,
    steps: int = 6,
    beam: int = UNIFORM_BEAM,
    scale_floor: float | None = None,
    trace: SearchTrace | None = None,
) -> UniformResult:
    """FPCS for asymmetric uniform quantizers (§5.4).

    Args:
        score: error of ``(K, G)`` candidates (lower is better).
        scales, zero_points: the coarse grid, ``(K, G)`` (see :mod:`adalog.search.grids`).
        steps: total stages T including the coarse one (configs use 6, §10 item 28).
        beam: survivors per group; ``M = K // beam`` children each.
        scale_floor: clamp for children scales (activations: 1e-4, §5.2c); ``None`` for weights
            and matmul operands.

    Δ starts as the grid's own spacing (after any clamp, §12 item 3); a group with Δ = 0 just
    re-scores identical children. Costs ``steps * K`` evaluations (768 by default).
    """
    if scales.dim() != 2 or scales.shape != zero_points.shape:
        raise ValueError("scales and zero_points must both be (K, G)")
    delta = coarse_spacing(scales)
    return _beam_search(score, scales, zero_points, delta, steps, beam, scale_floor, trace)


def exhaustive(
    score: UniformScore,
    scales: Tensor,
    zero_points: Tensor,
    trace: SearchTrace | None = None,
) -> UniformResult:
    """The no-FPCS path: score the coarse grid once and keep the best per group (§5.7)."""
    if scales.dim() != 2 or scales.shape != zero_points.shape:
        raise ValueError("scales and zero_points must both be (K, G)")
    s, z, e = _stage(score, scales, zero_points, 1, None, trace)
    return UniformResult(s[0], z[0], e[0])


def _rank_q(
    score_q: BaseScore, q_candidates: Tensor, keep: int, trace: SearchTrace | None
) -> tuple[Tensor, Tensor]:
    """Score every q with the scale fixed; return the ``keep`` best q and errors, best first."""
    errors = _checked(score_q(q_candidates), q_candidates.shape)
    kept = _rank(errors, keep)
    _record(trace, None, q_candidates[:, None], errors[:, None], kept[:, None], None)
    return q_candidates[kept], errors[kept]


def best_q(
    score_q: BaseScore, q_candidates: Tensor, trace: SearchTrace | None = None
) -> BaseResult:
    """Exhaustive base search (§5.6 post-softmax; also the no-FPCS post-GELU path)."""
    q, err = _rank_q(score_q, q_candidates, 1, trace)
    return BaseResult(q[0], err[0])


def fpcs_adalog(
    score_q: BaseScore,
    score_joint: JointScore,
    lo: float | Tensor,
    hi: float | Tensor,
    q_candidates: Tensor,
    base_num: int = 8,
    scale_num: int = 16,
    beam: int = ADALOG_BEAM,
    steps: int = 6,
    trace: SearchTrace | None = None,
) -> AdaLogResult:
    """Joint AdaLog (scale, q) FPCS for the per-tensor post-GELU quantizer (§5.5).

    1. ``score_q`` (the caller holds the current scale fixed) ranks all q; keep ``base_num``.
    2. Coarse joint grid of ``scale_num`` scales over [lo, hi] x the kept q in score order
       (candidate k: scale k % scale_num, q k // scale_num); Δ = (hi - lo) / (scale_num - 1).
    3. ``steps - 1`` refinements with ``M = scale_num * base_num // beam`` children, Δ / (M - 1/2).

    q is never refined past step 1; scales are not clamped. Defaults cost 128 + 128 + 5*128 = 896
    evaluations.
    """
    if not 1 <= base_num <= q_candidates.numel():
        raise ValueError(f"base_num={base_num} out of range for {q_candidates.numel()} q values")
    kept_q, _ = _rank_q(score_q, q_candidates, base_num, trace)
    grid = dense_scale_grid(lo, hi, scale_num)
    scales = grid.repeat(base_num)[:, None]
    qs = kept_q.to(grid.device).repeat_interleave(scale_num)[:, None]
    lo_t = torch.as_tensor(lo, dtype=grid.dtype, device=grid.device)
    hi_t = torch.as_tensor(hi, dtype=grid.dtype, device=grid.device)
    delta = ((hi_t - lo_t) / (scale_num - 1)).reshape(1)

    def joint(s: Tensor, q: Tensor) -> Tensor:
        return score_joint(s[:, 0], q[:, 0])[:, None]

    s, q, e = _beam_search(joint, scales, qs, delta, steps, beam, None, trace)
    return AdaLogResult(s[0], q[0], e[0])


def exhaustive_adalog(
    score_q: BaseScore,
    score_joint: JointScore,
    lo: float | Tensor,
    hi: float | Tensor,
    q_candidates: Tensor,
    eq_n: int = 128,
    trace: SearchTrace | None = None,
) -> AdaLogResult:
    """The no-FPCS AdaLog round of §5.7(C): best q with the scale fixed, then best of the dense
    ``eq_n``-point scale grid over [lo, hi] with that q (``score_joint`` sees a constant q)."""
    q, _ = best_q(score_q, q_candidates, trace)
    scales = dense_scale_grid(lo, hi, eq_n)
    qs = q.to(scales.device).expand(eq_n)
    errors = _checked(score_joint(scales, qs), scales.shape)
    kept = _rank(errors, 1)
    _record(trace, scales[:, None], qs[:, None], errors[:, None], kept[:, None], None)
    return AdaLogResult(scales[kept[0]], q, errors[kept[0]])
