"""Choices made on calibration data: λ grids (TA, TIES, ...), DAREx's q, TALL's λ_t.

Every merge here is θ_pre + λ·D with D independent of λ (and DAREx's rescaling is linear
in 1/q), so each grid merges once and rescales D per grid point instead of re-merging.
The scale is the parameter ``scale`` names: ``lam`` (TA, TIES, DARE, PCB, ...) or
``alpha`` (TSV-M, Iso-C, Iso-CTS, whose scalar α multiplies the whole Δ); ``None`` for a
method without one (WUDI), whose Δ is then scaled from the outside.
``score(state) -> float`` is the calibration metric (e.g. mean calibration accuracy over
tasks); ``score_task(state, t)`` scores one task. Grids are the DESIGN §2 defaults.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from npstune.merge.base import run_merge
from npstune.merge.consensus import tall_masks
from npstune.merge.registry import get_method
from npstune.taskvector import MergePlan

State = dict[str, torch.Tensor]
TA_GRID = tuple(round(0.1 * i, 1) for i in range(1, 16))  # 0.1 .. 1.5
TIES_GRID = tuple(round(0.8 + 0.1 * i, 1) for i in range(18))  # 0.8 .. 2.5
TALL_GRID = (0.2, 0.3, 0.4, 0.5, 0.6)


@dataclass
class Choice:
    """The chosen value, its calibration score, and every grid point tried."""

    value: Any
    score: float
    tried: list[tuple[Any, float]] = field(default_factory=list)
    state: State | None = None


def direction(
    plan: MergePlan,
    method: str,
    params: Mapping[str, Any] | None = None,
    scale: str | None = "lam",
) -> State:
    """D = merge(``scale`` = 1) − θ_pre on the delta keys, in float64 (one merge)."""
    p = dict(params or {})
    if scale is not None:
        p[scale] = 1.0
    merged = run_merge(plan, get_method(method), p).state
    assert merged is not None
    return delta_of(plan, merged)


def delta_of(plan: MergePlan, state: Mapping[str, torch.Tensor]) -> State:
    """``state`` − θ_pre on the delta keys, in float64."""
    return {k: state[k].double() - plan.base[k].double() for k in plan.delta_keys}


def scaled(plan: MergePlan, delta: Mapping[str, torch.Tensor], lam: float) -> State:
    """θ_pre + λ·D in the base's dtypes (copy keys from the base)."""
    out: State = {}
    for k in plan.keys:
        b = plan.base[k]
        out[k] = (b.double() + lam * delta[k]).to(b.dtype) if k in delta else b
    return out


def choose_lambda(
    plan: MergePlan,
    method: str,
    score: Callable[[State], float],
    params: Mapping[str, Any] | None = None,
    grid: Sequence[float] | None = None,
    scale: str = "lam",
) -> Choice:
    """Best λ (the parameter ``scale``) on calibration data for ``method`` (default
    grids: TA 0.1..1.5, TIES 0.8..2.5); one merge at ``scale`` = 1."""
    grid = grid or (TIES_GRID if "ties" in method else TA_GRID)
    return choose_scale(plan, direction(plan, method, params, scale), score, grid)


def choose_scale(
    plan: MergePlan,
    d: Mapping[str, torch.Tensor],
    score: Callable[[State], float],
    grid: Sequence[float],
) -> Choice:
    """Best λ of θ_pre + λ·D on calibration data over ``grid`` (D from
    :func:`direction` or :func:`delta_of`)."""
    best: Choice | None = None
    tried = []
    for lam in grid:
        st = scaled(plan, d, lam)
        s = score(st)
        tried.append((lam, s))
        if best is None or s > best.score:
            best = Choice(lam, s, state=st)
    assert best is not None
    best.tried = tried
    return best


def choose_darex_q(
    plan: MergePlan,
    k: float,
    score: Callable[[State], float],
    lam: float = 1.0,
    seed: int = 0,
    coarse: int = 5,
    fine: int = 4,
) -> Choice:
    """DAREx-q: q ∈ [k, 1] by a coarse grid, then a finer grid around the best point."""
    s1 = direction(
        plan, "darex", {"k": k, "q": 1.0, "seed": seed}
    )  # Σ mask·τ (rescale 1)
    tried: dict[float, float] = {}

    def at(q: float) -> float:
        q = round(min(1.0, max(k, q)), 6)
        if q not in tried:
            tried[q] = score(scaled(plan, s1, lam / q))
        return tried[q]

    step = (1.0 - k) / (coarse - 1)
    for i in range(coarse):
        at(k + i * step)
    best_q = max(tried, key=tried.__getitem__)
    for j in range(1, fine + 1):
        for q in (best_q - j * step / (fine + 1), best_q + j * step / (fine + 1)):
            at(q)
    best_q = max(tried, key=tried.__getitem__)
    return Choice(
        best_q, tried[best_q], sorted(tried.items()), scaled(plan, s1, lam / best_q)
    )


def tall_models(
    plan: MergePlan,
    score_task: Callable[[State, int], float],
    mtl: str = "task-arithmetic",
    params: Mapping[str, Any] | None = None,
    grid: Sequence[float] = TALL_GRID,
) -> list[Choice]:
    """TALL masks: per task t, λ_t from ``grid`` by task t's calibration accuracy of
    θ_pre + mask_t ⊙ τ_MTL, with mask_t = |τ_t| ≥ λ_t·|τ_MTL − τ_t|. Returns one
    :class:`Choice` per task (its state is that task's model)."""
    mtl_d = direction(plan, mtl, params)  # τ_MTL: Σ τ_t (TA at λ=1) or the TIES vector
    taus = [tv.to_dict() for tv in plan.task_vectors()]
    out = []
    for t in range(len(plan.models)):
        best: Choice | None = None
        tried = []
        for lam in grid:
            masked = {}
            for k in plan.delta_keys:
                m = tall_masks([taus[t][k].double()], mtl_d[k], [lam])[0]
                masked[k] = torch.where(
                    m, mtl_d[k], torch.zeros((), dtype=torch.float64)
                )
            st = scaled(plan, masked, 1.0)
            s = score_task(st, t)
            tried.append((lam, s))
            if best is None or s > best.score:
                best = Choice(lam, s, state=st)
        assert best is not None
        best.tried = tried
        out.append(best)
    return out
