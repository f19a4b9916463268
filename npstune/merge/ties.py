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
from npstune.merge.pruning import MagnitudePruner, Pruner
from npstune.taskvector import Chunk


class TiesParams(MethodParams):
    """Trim ratio k, scaling λ, trim scope."""

    k: float = Field(0.2, gt=0, le=1)
    lam: float = Field(1.0, ge=0, le=10)
    scope: Literal["global", "tensor"] = "global"


@dataclass
class TiesCtx:
    pruners: list[Pruner]
    lam: float

    def report(self) -> dict[str, list[int]]:
        return {"kept": [p.kept for p in self.pruners]}


def prepare(inputs: MergeInputs, p: TiesParams) -> TiesCtx:
    """One trim threshold per task (global scope)."""
    return TiesCtx([MagnitudePruner.prepare(inputs, t, p.k, p.scope) for t in range(inputs.tasks)], p.lam)


def disjoint_mean(trimmed: list[torch.Tensor]) -> torch.Tensor:
    """Elect sign = sign(Σ trimmed); mean of the nonzero entries that agree with it."""
    stacked = torch.stack(trimmed)
    elected = torch.sign(stacked.sum(0))
    agree = (torch.sign(stacked) == elected) & (stacked != 0)
    total = torch.where(agree, stacked, torch.zeros((), dtype=stacked.dtype)).sum(0)
    count = agree.sum(0).clamp_min(1)
    return total / count


def trimmed(ctx: TiesCtx, chunk: Chunk) -> list[torch.Tensor]:
    """Each task's chunk with the untrimmed entries zeroed."""
    out = []
    for pr in ctx.pruners:
        mask, values = pr(chunk)
        out.append(torch.where(mask, values, torch.zeros((), dtype=values.dtype)))
    return out


def ties(ctx: TiesCtx, chunk: Chunk) -> torch.Tensor:
    """λ·disjoint_mean(trim(τ_t)) for one chunk."""
    return ctx.lam * disjoint_mean(trimmed(ctx, chunk))


SPEC = MergeSpec(
    "ties", TiesParams, kernel=ties, prepare=prepare,
    whole_tensor=lambda p: p.scope == "tensor",
    paper="https://arxiv.org/abs/2306.01708", summary="trim top-k, elect sign, disjoint mean",
)
