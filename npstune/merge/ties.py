"""TIES-merging: trim, elect sign, disjoint mean.

Paper: Yadav et al., https://arxiv.org/abs/2306.01708. Trim each τ_t to its top-k |τ_t|
(k = 0.2; scope global by default, as the reference code ranks the whole flattened
vector); elected sign = sign(Σ_t trimmed τ_t); merged τ = mean over t of the trimmed
entries whose sign equals the elected one (zeros ignored); θ = θ_pre + λ·τ (λ = 1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import Field

from npstune.merge.base import MergeInputs, MergeSpec, MethodParams
from npstune.merge.masks import KernelOut
from npstune.merge.pruning import MagnitudePruner, Pruner
from npstune.taskvector import Chunk


class TiesParams(MethodParams):
    """Trim ratio k, scaling λ, trim scope."""

    k: float = Field(0.2, gt=0, le=1)
    lam: float = Field(1.0, ge=0, le=10)
    scope: Literal["global", "tensor"] = "global"


@dataclass
class TiesCtx:
    """One trim pruner per task (plan order) and λ."""

    pruners: list[Pruner]
    lam: float


def prepare(inputs: MergeInputs, p: TiesParams) -> TiesCtx:
    """One trim threshold per task (global scope)."""
    return TiesCtx(MagnitudePruner.prepare_all(inputs, p.k, p.scope), p.lam)


def disjoint_mean(trimmed: list[torch.Tensor]) -> torch.Tensor:
    """Elect sign = sign(Σ trimmed); mean of the nonzero entries that agree with it.

    Sums run left to right in task order (as a loop over the tasks would; torch's
    stacked ``sum(0)`` agrees for up to three tasks and may round differently beyond).

    Computed without stacking the tasks: ``v_t = max(trimmed_t · elected, 0)`` is
    ``|trimmed_t|`` where it agrees (same sign, nonzero; multiplying by ±1 or 0 is exact)
    and 0 elsewhere, so the mean is ``elected · Σ v_t / #{v_t > 0}``, bit for bit the
    direct formula's (agreeing entries share a sign, and fl(−a − b) = −fl(a + b)).
    Consumes ``trimmed`` (the tensors are reused in place)."""
    total = trimmed[0].clone()
    for t in trimmed[1:]:
        total += t
    elected = torch.sign(total)
    del total
    num = trimmed[0].mul_(elected).clamp_min_(0)  # Σ v_t, accumulated in v_0
    count = (num > 0).to(num.dtype)
    for t in trimmed[1:]:
        v = t.mul_(elected).clamp_min_(0)
        num += v
        count += v > 0
    return num.mul_(elected).div_(count.clamp_min_(1))


def trimmed(ctx: TiesCtx, chunk: Chunk) -> tuple[list[torch.Tensor], tuple[torch.Tensor, ...]]:
    """Each task's chunk with the untrimmed entries zeroed, and each task's trim mask."""
    out, masks = [], []
    for pr in ctx.pruners:
        mask, values = pr(chunk)
        out.append(torch.where(mask, values, torch.zeros((), dtype=values.dtype)))
        masks.append(mask)
    return out, tuple(masks)


def ties(ctx: TiesCtx, chunk: Chunk) -> KernelOut:
    """λ·disjoint_mean(trim(τ_t)) for one chunk, with each task's trim mask."""
    kept, masks = trimmed(ctx, chunk)
    merged = disjoint_mean(kept)
    return KernelOut(merged if ctx.lam == 1.0 else merged.mul_(ctx.lam), masks)


SPEC = MergeSpec(
    "ties", TiesParams, kernel=ties, prepare=prepare,
    whole_tensor=lambda p: p.scope == "tensor",
    paper="https://arxiv.org/abs/2306.01708", summary="trim top-k, elect sign, disjoint mean",
)
