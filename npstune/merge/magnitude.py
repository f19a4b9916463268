"""Magnitude pruning: keep the top-k |τ_t| of each task vector, then θ_pre + λ·Σ_t.

Scope: global over all included tensors (default) or per tensor; exact top-k rule of
DESIGN §2 (⌈k·n⌉ kept, ties to the earlier position). CLI defaults k = 0.05, λ = 1.
"""

from __future__ import annotations

from pydantic import Field

from npstune.merge.base import MergeInputs, MergeSpec, MethodParams, Scope
from npstune.merge.pruning import MagnitudePruner, PruneAdd, prune_add_kernel


class MagnitudeParams(MethodParams):
    """Keep ratio k, scaling λ, ranking scope."""

    k: float = Field(0.05, gt=0, le=1)
    lam: float = Field(1.0, ge=0, le=10)
    scope: Scope = "global"


def prepare(inputs: MergeInputs, p: MagnitudeParams) -> PruneAdd:
    """One streaming threshold per task (global scope)."""
    pruners = MagnitudePruner.prepare_all(inputs, p.k, p.scope)
    return PruneAdd(pruners, p.lam)


SPEC = MergeSpec(
    "magnitude",
    MagnitudeParams,
    kernel=prune_add_kernel,
    prepare=prepare,
    whole_tensor=lambda p: p.scope == "tensor",
    summary="top-k |τ_t| per task, then θ_pre + λ·Σ",
)
