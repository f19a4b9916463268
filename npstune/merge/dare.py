"""DARE and DAREx-q: drop each entry of τ_t with probability 1−k, rescale the kept ones.

DARE (Yu et al., https://arxiv.org/abs/2311.03099) rescales by 1/k; DAREx-q
(Deng et al., https://arxiv.org/abs/2410.09344) rescales by 1/q, q ∈ [k, 1] chosen on
calibration data (see ``npstune.merge.calibrate``; the CLI default is q = k). Masks are
drawn per (seed, task name, tensor key, fixed block of elements): a task's mask does not
depend on its position among the models nor on the read chunk size
(:mod:`npstune.sparsify.random`). Then θ_pre + λ·Σ_t. Scope: per entry.
"""

from __future__ import annotations

from pydantic import Field, model_validator

from npstune.merge.base import MergeInputs, MergeSpec, MethodParams
from npstune.merge.pruning import PruneAdd, Pruner, RandomPruner, prune_add_kernel


class DareParams(MethodParams):
    """Keep probability k, scaling λ, seed."""

    k: float = Field(0.1, gt=0, le=1)
    lam: float = Field(1.0, ge=0, le=10)
    seed: int = Field(0, ge=0)


class DarexParams(DareParams):
    """As DARE, plus the rescaling denominator q (default: k)."""

    q: float | None = Field(None, gt=0, le=1)

    @model_validator(mode="after")
    def _q_at_least_k(self) -> DarexParams:
        if self.q is not None and self.q < self.k:
            raise ValueError(f"q must be in [k, 1] = [{self.k}, 1], got {self.q}")
        return self


def prepare_dare(inputs: MergeInputs, p: DareParams) -> PruneAdd:
    """No global pass: one seeded Bernoulli pruner per task (keyed by the task's name),
    rescale 1/k (or 1/q)."""
    q = getattr(p, "q", None) or p.k
    pruners: list[Pruner] = [
        RandomPruner(task=t, k=p.k, rescale=q, seed=p.seed, name=name)
        for t, name in enumerate(inputs.plan.task_names)
    ]
    return PruneAdd(pruners, p.lam)


SPEC = MergeSpec(
    "dare",
    DareParams,
    kernel=prune_add_kernel,
    prepare=prepare_dare,
    paper="https://arxiv.org/abs/2311.03099",
    summary="random keep k, rescale 1/k",
)
DAREX_SPEC = MergeSpec(
    "darex",
    DarexParams,
    kernel=prune_add_kernel,
    prepare=prepare_dare,
    paper="https://arxiv.org/abs/2410.09344",
    summary="random keep k, rescale 1/q",
)
