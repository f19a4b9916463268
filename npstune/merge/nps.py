"""NPS with fixed subspace weights: prune each τ_t by NPS, then θ_pre + λ·Σ_t τ̂_t.

Paper: Neural Parameter Search, https://arxiv.org/abs/2505.18713. Rank |τ_t| (global by
default, or per tensor), split the ranks into M equal subspaces, multiply subspace m by
w_m, keep the top-k of the reweighted magnitudes, τ̂ = mask ⊙ τ'. With w = 1 this is
magnitude pruning. Weights: M values shared by every task, or T·M values task-major.
The search (``npstune.search``) finds w; this method applies given weights.
"""

from __future__ import annotations

from pydantic import Field

from npstune.merge.base import MergeInputs, MergeSpec, MethodParams, Scope
from npstune.merge.pruning import NpsPruner, PruneAdd, prune_add_kernel
from npstune.sparsify import DEFAULT_SUBSPACES, task_weight_rows


class NpsParams(MethodParams):
    """Keep ratio, scaling, scope, subspace count and weights (None: all 1)."""

    k: float = Field(0.05, gt=0, le=1)
    lam: float = Field(1.0, ge=0, le=10)
    scope: Scope = "global"
    subspaces: int = Field(DEFAULT_SUBSPACES, ge=1, le=255)
    weights: list[float] | None = None


def prepare(inputs: MergeInputs, p: NpsParams) -> PruneAdd:
    """Partition and reweighted threshold per task (3 joint streaming passes,
    global scope)."""
    rows = task_weight_rows(p.weights, inputs.tasks, p.subspaces)
    return PruneAdd(
        NpsPruner.prepare_all(inputs, p.k, p.scope, rows, p.subspaces), p.lam
    )


SPEC = MergeSpec(
    "nps",
    NpsParams,
    kernel=prune_add_kernel,
    prepare=prepare,
    whole_tensor=lambda p: p.scope == "tensor",
    paper="https://arxiv.org/abs/2505.18713",
    summary="NPS: reweight M rank subspaces by w, top-k, then θ_pre + λ·Σ",
)
